"""The bundled model (synthetic/assets/model): it knows its benchmark unpruned, and transformers' PyTorch LLaVA reads
the shipped files to the same answers as ours."""
import numpy as np
import pytest

from svdprune_jax.synthetic.bundled import MODEL_DIR, SCENES
from svdprune_jax.synthetic.benchmark import load_test_set
from svdprune_jax.inference.pipeline import Pipeline, expand

N_ACCURACY = 300  # the fixed test subset: the first 300 test-split seeds
N_TRANSFORMERS = 12
BATCH = 50


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(MODEL_DIR)


@pytest.fixture(scope="module")
def test_set():
    return load_test_set(N_ACCURACY, SCENES["bundled"])


def test_shipped_files_fit_the_budget():
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 2**20


@pytest.fixture(scope="module")
def unpruned_hits(pipe, test_set):
    texts = []
    for i in range(0, len(test_set), BATCH):
        answers, _ = pipe.answer(test_set.images[i:i + BATCH], test_set.questions[i:i + BATCH], method="full",
                                 max_new_tokens=3)
        texts += [a.text for a in answers]
    hits = np.array(texts) == np.array(test_set.answers)
    return hits, {f: hits[test_set.families == f].mean().round(3) for f in sorted(set(test_set.families))}


def test_unpruned_accuracy_at_least_90_percent(unpruned_hits):
    """Issue 5's target (issue 21 asks 0.92 on the whole test split; see docs/training.md for the measured figures)."""
    hits, by_family = unpruned_hits
    assert hits.mean() >= 0.9, (hits.mean(), by_family)


def test_every_family_learnt(unpruned_hits):
    """A regression guard per family (60 questions each): the first shipped model held 0.79 overall with its quadrant
    families at chance, which an overall threshold alone would not catch."""
    _, by_family = unpruned_hits
    assert min(by_family.values()) >= 0.75, by_family


def test_transformers_answers_equal_ours(pipe, test_set):
    torch = pytest.importorskip("torch")
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR).eval()
    images, questions = test_set.images[:N_TRANSFORMERS], test_set.questions[:N_TRANSFORMERS]
    ours, _ = pipe.answer(images, questions, method="full", max_new_tokens=3)
    n = pipe.num_image_tokens
    for image, question, answer in zip(images, questions, ours):
        ids = torch.tensor([expand(pipe.prompt_ids(question), pipe.config.image_token_id, n)])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              pixel_values=torch.from_numpy(pipe.pixel_values([image])), max_new_tokens=3,
                              do_sample=False)
        assert out[0, ids.shape[1]:].tolist() == answer.token_ids, question
    assert np.mean([a.text == t for a, t in zip(ours, test_set.answers)]) > 0.5  # the answers compared mean something


BRACKET_SEEDS = 3


def test_oracle_clearly_above_random_at_11_tokens(pipe, test_set):
    """The yardstick's bracket, on the fixed subset: keeping the evidence each answer needs (the oracle) must beat
    keeping random patches by at least 20 points (issue 21's bar) at 11 of 196 tokens (the paper's 32/576), so the
    benchmark ranks what the kept tokens hold. Random: the mean over seeds."""
    from tqdm import tqdm

    from svdprune_jax.inference.methods import parse
    from svdprune_jax.synthetic.benchmark import ORACLE, evaluate_run

    run = lambda method, seed=0: evaluate_run(pipe, test_set, parse(method, [method]), "11", 11, seed=seed,
                                              batch=BATCH, max_new_tokens=3, bar=tqdm(disable=True)).correct.mean()
    oracle = run(ORACLE)
    random = np.mean([run("random", s) for s in range(BRACKET_SEEDS)])
    assert oracle - random >= 0.20, (oracle, random)
