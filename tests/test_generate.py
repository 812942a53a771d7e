"""Generation against transformers' `generate` (greedy, float32, left-padded batch), EOS, sampling,
pruned and FastV generation, compilation count within a prompt-length bucket, bad input."""
import jax
import numpy as np
import pytest
import torch
from jax import monitoring

from hf_reference import from_hf, pixels, prompts, tiny
from svdprune_jax.models.generate import generate
from svdprune_jax.models.llama import FastV
from svdprune_jax.models.llava import Pruning

M = 20


@pytest.fixture(scope="module")
def base():
    hf = tiny()
    model, graphdef, state = from_hf(hf)
    cfg = model.config
    ids, mask = prompts(cfg.image_token_id, (cfg.num_image_tokens + 11, cfg.num_image_tokens + 5), cfg.num_image_tokens)
    return hf, graphdef, state, cfg, pixels(cfg, 2), ids, mask


def _hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=M,
                          do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].numpy()


class _Compiles:
    """Counts XLA compilations of jitted functions whose name contains `name`."""

    def __init__(self, name):
        self.name, self.count = name, 0

    def __call__(self, event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and self.name in kw.get("fun_name", ""):
            self.count += 1


@pytest.fixture(scope="module")
def compiles():
    counter = _Compiles("_generate")
    monitoring.register_event_duration_secs_listener(counter)
    yield counter
    monitoring.unregister_event_duration_listener(counter)


def test_greedy_equals_transformers_generate(base):
    hf, graphdef, state, cfg, px, ids, mask = base
    want = _hf_generate(hf, ids, mask, pixel_values=torch.as_tensor(px), eos_token_id=None)
    out = generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None)
    assert out.tokens.shape == (2, M) and out.kept is None and out.kept_columns is None
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, [M, M])


def test_eos_stops_rows_like_transformers(base):
    hf, graphdef, state, cfg, px, ids, mask = base
    free = generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None).tokens
    eos = int(free[0, 4])  # row 0 stops at step 4 (or earlier if that token came before)
    want = _hf_generate(hf, ids, mask, pixel_values=torch.as_tensor(px), eos_token_id=eos)
    out = generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=eos, pad_token_id=0)
    got = np.asarray(out.tokens)
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)  # HF stops early once every row is done
    assert (got[:, want.shape[1]:] == 0).all()
    first = [list(r).index(eos) + 1 if eos in r else M for r in np.asarray(free)]
    np.testing.assert_array_equal(out.lengths, first)


def test_no_recompile_within_a_bucket(base, compiles):
    _, graphdef, state, cfg, px, _, _ = base
    n = cfg.num_image_tokens

    def run(*lengths, seed=0):
        ids, mask = prompts(cfg.image_token_id, lengths, n, seed)
        generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None, bucket=64)

    run(n + 11, n + 5)
    before = compiles.count
    for seed, lengths in enumerate([(n + 3, n + 2), (n + 40, n + 20), (64, n + 1)]):  # widths 19..64: one bucket
        run(*lengths, seed=seed)
    assert compiles.count == before
    run(70, 40)  # the next bucket: exactly one new program
    assert compiles.count == before + 1


def test_sampling_is_keyed_and_top_p_limits_it(base, compiles):
    _, graphdef, state, cfg, px, ids, mask = base
    before = compiles.count
    run = lambda key, **kw: np.asarray(generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None,
                                                key=key, **kw).tokens)
    a = run(jax.random.key(1), temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(a, run(jax.random.key(1), temperature=1.0, top_p=0.9))
    assert (a != run(jax.random.key(2), temperature=1.0, top_p=0.9)).any()
    greedy = run(None)
    np.testing.assert_array_equal(run(jax.random.key(3), temperature=1.0, top_p=1e-6), greedy)  # nucleus of one
    assert compiles.count == before  # temperature, top_p, key are traced: one program


def test_pruned_generate_equals_transformers_on_kept_features(base):
    """Pruned (svd, k=5), timed stages: same tokens as HF generate fed the kept features via inputs_embeds."""
    hf, graphdef, state, cfg, px, _, _ = base
    k = 5
    ids, mask = prompts(cfg.image_token_id, (k + 12, k + 7), k)
    out = generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None, pruning=Pruning("svd", k),
                   timed=True)
    assert set(out.timings) == {"encode", "prefill", "decode"}
    kept = np.array(out.kept)
    with torch.no_grad():
        feats = hf.model.vision_tower(torch.as_tensor(px), output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = torch.gather(feats, 1, torch.tensor(kept)[..., None].expand(-1, -1, feats.shape[-1]))
        embeds = hf.model.language_model.embed_tokens(torch.as_tensor(ids))
        embeds[torch.as_tensor(ids == cfg.image_token_id)] = hf.model.multi_modal_projector(feats).reshape(-1, embeds.shape[-1])
        want = hf.generate(inputs_embeds=embeds, attention_mask=torch.as_tensor(mask), max_new_tokens=M,
                           do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
    np.testing.assert_array_equal(out.tokens, want)


def test_fastv_keeping_every_image_token_equals_unpruned(base):
    """FastV with keep = n runs the two-segment cache yet must reproduce plain greedy decoding exactly."""
    hf, graphdef, state, cfg, px, ids, mask = base
    n = cfg.num_image_tokens
    want = generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None).tokens
    out = generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None, fastv=FastV(n, 1))
    np.testing.assert_array_equal(out.tokens, want)
    assert out.kept_columns.shape == (2, 64)  # bucketed prompt, all columns kept


def test_bad_input(base):
    _, graphdef, state, cfg, px, ids, mask = base
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens \+ 240 new tokens exceeds the context of 256"):
        generate(graphdef, state, px, ids, mask, max_new_tokens=240, eos_token_id=None)
    with pytest.raises(ValueError, match="need an explicit key"):
        generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None, temperature=0.5)
    with pytest.raises(ValueError, match="image budget 4"):
        generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None, pruning=Pruning("random", 4))
    with pytest.raises(ValueError, match="top_p"):
        generate(graphdef, state, px, ids, mask, max_new_tokens=M, eos_token_id=None, top_p=0.0)
