"""Trains the bundled tiny LLaVA (`svdprune_jax.synthetic.bundled`) on the synthetic benchmark with our `models/` code, in stages.

  stage 1  the vision tower alone, densely supervised: linear heads on its feature layer (the one LLaVA reads)
           predict every patch's colour, shape, colour-shape binding, glyph, object-centre kind (the binding of
           the object centred there, or none) and row/column, and CLS predicts the count of every colour-shape
           pair; background patches are weighted down. A stand-in for a pretrained encoder, and the cheap stage.
  stage 2+ the tower frozen and its features cached (float16) for the training images; projector + a fresh
           decoder (carried from stage to stage) learn VQA in LLaVA's multi-turn format ("USER: <image>\\n
           {question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>..."): the sample's own
           question, then follow-ups about the same image (see `Stage.turns`, `Stage.by_quadrant`,
           `Stage.need_quadrant`), every answer and </s> in the loss.
Validation always reads the full grid and asks only the sample's own question, as the test does.
Then the test split is scored once, with generation (never used for training or model selection), and the
model is exported in transformers' LLaVA format.

Reproducible from the recipe's seed: parameter init, the training images (generated once into a cache under
OUT/data) and their order (a pure function of seed, stage and step), so a checkpoint of params + optimiser
state + stage + step resumes exactly. OUT/recipe.json is the run's recipe (written on the first run, read on
every resume: edit it to lengthen a stage). OUT holds log.txt, history.jsonl, curves.png, checkpoint.npz,
stage{N}.npz (each stage's end) and results.json.

    python -m svdprune_jax.synthetic.train [--out runs/bundled] [--recipe bundled] [--until {N,export}] [--max-steps N]
"""
import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util
from jaxtyping import Array, Float, Int, UInt8
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import GenerationConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from svdprune_jax.synthetic.bundled import MODEL_DIR, PRESETS, SCENES
from svdprune_jax.synthetic.scene import COLOURS, GLYPHS, SHAPES, SceneConfig
from svdprune_jax.synthetic.benchmark import oracle_scores
from svdprune_jax.synthetic.token_subsets import apply_subsets, draw_subset, object_labels, uniform_subset
from svdprune_jax.synthetic.samples import (ANSWERS, FAMILIES, all_questions, follow_ups, make_sample, split_seeds,
                           training_questions)
from svdprune_jax.synthetic.vocab import EOS, IMAGE_TOKEN, PAD, build_tokenizer, follow_up, prompt, save_processor_files
from svdprune_jax.convert import export_checkpoint, load_model, save_params
from svdprune_jax.convert.checkpoint import UNUSED
from svdprune_jax.convert.hf_config import write_config
from svdprune_jax.convert.keymap import RULES
from svdprune_jax.convert.safetensors_io import write_file
from svdprune_jax.models.generate import Decoding, generate
from svdprune_jax.models.llava import Llava, LlavaConfig, positions

log = logging.getLogger("svdprune_jax.synthetic.train")

PAIRS = len(COLOURS) * len(SHAPES)
COUNT_CLASSES = 5  # 0..4 objects of one colour-shape pair (the generator never puts more in a scene)
MAX_BYTES = 20 * 2**20  # the exported model.safetensors must stay under 20 MB
VAL_BUDGETS = (22, 11)  # validation token budgets of subset-trained recipes (64/576 and 32/576 of 196 tokens)


@dataclasses.dataclass(frozen=True)
class Stage:
    steps: int
    batch: int
    lr: float  # peak of warmup + cosine decay (to 1% of the peak at `steps`)
    warmup: int
    weight_decay: float = 0.05
    # Question-answer turns per sequence (1: the sample's own question only). One answer per image and forward
    # pass is little signal for the decoder's retrieval; follow-up turns give several per image for ~2x the tokens.
    turns: int = 1
    # Follow-ups: first up to `by_quadrant` quadrant-only questions (svdprune_jax.synthetic.samples.quadrant_questions), then up
    # to `need_quadrant` colour/shape questions whose named attribute also occurs in another quadrant
    # (svdprune_jax.synthetic.samples.scene_questions), then a spread over the families. The quadrant-only kind is
    # what taught a fresh decoder to use position (docs/training.md).
    need_quadrant: int = 0
    by_quadrant: int = 0
    # Length of the warmup + cosine schedule when it differs from `steps`: a stage stopped part-way along its
    # schedule (where the bundled recipe's stages were cut, and why: docs/training.md).
    decay_steps: int = 0
    # Share of training sequences whose image tokens are a random subset of the grid (`svdprune_jax.synthetic.token_subsets`: size
    # log-uniform in [min_tokens, N], its shape drawn from `subset_shapes`), so the decoder reads pruned sequences.
    subsets: float = 0.0
    min_tokens: int = 4
    subset_shapes: tuple[str, ...] = ("uniform", "regions")


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: str  # key of svdprune_jax.synthetic.bundled.PRESETS and SCENES
    seed: int
    n_train: int
    n_val: int
    n_test: int
    stages: tuple[Stage, ...]  # stage 1 dense tower training, then VQA stages
    background_weight: float = 0.1  # stage-1 loss weight of background / no-glyph / no-centre patches
    position_weight: float = 0.1  # stage-1 loss weight of the row and column heads
    eval_every: int = 250
    ckpt_every: int = 100
    log_every: int = 10
    # Start from the weights of an exported LLaVA directory ("bundled": the shipped model) instead of an init;
    # stages with 0 steps are skipped, so a fine-tuning recipe lists stage 1 as Stage(0, ...).
    init: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        stage = lambda s: Stage(**{**s, "subset_shapes": tuple(s.get("subset_shapes", Stage.subset_shapes))})
        return cls(**{**d, "stages": tuple(map(stage, d["stages"]))})


RECIPES = {
    # The shipped model's recipe; what each stage reached, and why it is built so: docs/training.md.
    "bundled": Recipe("bundled", seed=0, n_train=30_000, n_val=500, n_test=1000,
                      stages=(Stage(1300, 32, 1e-3, 150),
                              Stage(1850, 32, 1e-3, 100, turns=9, need_quadrant=2, by_quadrant=2, decay_steps=3000),
                              Stage(2000, 32, 5e-4, 50, turns=9, need_quadrant=1),
                              Stage(1500, 32, 5e-4, 100, turns=9, need_quadrant=1, decay_steps=3000)),
                      eval_every=250, ckpt_every=50),
    # The `bundled` recipe's decoder fine-tuned to read pruned sequences (issue 21; shipped since 2026-12-06):
    # its tower and training images unchanged, 3 of 4 sequences read a token subset (`Stage.subsets`), the rest
    # the full grid. It started from the model then shipped, the `bundled` recipe's export: to reproduce it, pass
    # that export's directory as init (init="bundled" now reads this recipe's own result).
    "bundled_subsets": Recipe("bundled", seed=1, n_train=30_000, n_val=500, n_test=1000, init="bundled",
                              stages=(Stage(0, 32, 1e-3, 0),
                                      Stage(1000, 32, 3e-4, 100, turns=9, need_quadrant=1, subsets=0.75)),
                              eval_every=200, ckpt_every=50),
    # `bundled_subsets` fine-tuned further with whole-object subsets in the mix (`token_subsets.object_subset`):
    # on the shipped reader the oracle's object-only sequences left counting at chance (docs/results.md).
    "bundled_objects": Recipe("bundled", seed=2, n_train=30_000, n_val=500, n_test=1000, init="bundled",
                              stages=(Stage(0, 32, 1e-3, 0),
                                      Stage(600, 32, 2e-4, 50, turns=9, need_quadrant=1, subsets=0.75,
                                            subset_shapes=("uniform", "regions", "objects"))),
                              eval_every=200, ckpt_every=50),
    # seconds-long end-to-end run for tests: few samples so a few steps already fit them
    "tiny": Recipe("tiny", seed=0, n_train=16, n_val=10, n_test=10,
                   stages=(Stage(8, 8, 3e-3, 1), Stage(8, 8, 3e-3, 1, turns=4, need_quadrant=1, by_quadrant=1)),
                   eval_every=4, ckpt_every=4, log_every=1),
}


# ---------------------------------------------------------------------------------------------------- data

def pixel_values(images: UInt8[Array, "B H W 3"]) -> Float[Array, "B 3 H W"]:
    """What transformers' CLIP image processor makes of images already at the model's size: rescale, normalise."""
    x = images.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(OPENAI_CLIP_MEAN)) / jnp.asarray(OPENAI_CLIP_STD)).transpose(0, 3, 1, 2)


def _record(args: tuple[int, SceneConfig]) -> tuple:
    seed, scene = args
    s = make_sample(seed, scene)
    if s.targets["counts"].max() >= COUNT_CLASSES:
        raise ValueError(f"seed {seed}: {s.targets['counts'].max()} objects of one kind; counts head has {COUNT_CLASSES} classes")
    centre = np.zeros((scene.grid, scene.grid), np.int8)  # 0, or 1 + binding of the object centred on the patch
    for o in s.scene.objects:
        centre[o.cy // scene.patch_size, o.cx // scene.patch_size] = 1 + o.colour * len(SHAPES) + o.shape
    dense = {k: s.targets[k].astype(np.int8) for k in ("colour", "shape", "glyph", "counts")}
    return s.image, {**dense, "centre": centre}, s.question, s.answer, s.family


def dataset(out: Path, split: str, n: int, scene: SceneConfig, workers: int = 2) -> dict:
    """`split_seeds(split, n)` rendered once into OUT/data (images as a .npy memory map, the rest .npz).

    Returns image (n, H, W, 3) uint8, colour/shape/glyph/centre (n, g, g) int8, counts (n, colours, shapes)
    int8, question/answer/family (n,) str."""
    key = repr(scene)
    stem = out / "data" / f"{split}_{n}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    images_path, meta_path = stem.with_suffix(".images.npy"), stem.with_suffix(".npz")
    if not meta_path.exists():
        stem.parent.mkdir(parents=True, exist_ok=True)
        tmp_images = stem.with_suffix(".tmp.npy")
        images = np.lib.format.open_memmap(tmp_images, "w+", np.uint8, (n, scene.image_size, scene.image_size, 3))
        cols = {}
        jobs = ((seed, scene) for seed in split_seeds(split, n))
        with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
            records = pool.imap(_record, jobs, chunksize=32) if pool else map(_record, jobs)
            for i, (image, dense, *text) in enumerate(tqdm(records, total=n, desc=f"render {split}")):
                images[i] = image
                names = ("question", "answer", "family")
                for k, v in {**dense, **dict(zip(names, text))}.items():
                    cols.setdefault(k, []).append(v)
        images.flush()
        del images
        os.replace(tmp_images, images_path)
        tmp_meta = stem.with_suffix(".tmp.npz")
        np.savez(tmp_meta, **{k: np.array(v) for k, v in cols.items()})
        os.replace(tmp_meta, meta_path)
    meta = np.load(meta_path)
    return {"image": np.load(images_path, mmap_mode="r"), **{k: meta[k] for k in meta.files}}


def sequence_length(n_image: int, turns: int = 1) -> int:
    """Tokens of the longest "prompt answer </s>" (then turns - 1 times "follow-up answer </s>") any seed can
    ask, with the image expanded to n_image."""
    tok = build_tokenizer()
    longest = lambda texts: max(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    first = 1 + longest([prompt(q) for q in all_questions()]) + n_image - 1 + 2
    return first + (turns - 1) * (longest([follow_up(q) for q in training_questions()]) + 2)


def vqa_ids(questions, answers, n_image: int, follow=None, turns: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded (n, sequence_length) ids of "<s> prompt answer </s>" with the image token repeated n_image
    times, then up to turns - 1 of each sample's `follow` (question, answer) pairs as
    "follow-up answer </s>"; the attention mask; labels: the id at every answer and </s>, else -1. Every
    answer is one token, so in one-turn rows column -2 is the answer and -1 is </s>."""
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    length = sequence_length(n_image, turns)
    shape = (len(questions), length)
    ids, mask, labels = np.full(shape, vocab[PAD], np.int32), np.zeros(shape, np.int32), np.full(shape, -1, np.int32)
    follow = [()] * len(questions) if follow is None else follow
    for i, (q, a, more) in enumerate(zip(questions, answers, follow)):
        p = tok.encode(prompt(q)).ids
        if p.count(vocab[IMAGE_TOKEN]) != 1:
            raise ValueError(f"prompt of {q!r} has no single image token")
        j = p.index(vocab[IMAGE_TOKEN])
        seq, lab = p[:j] + [vocab[IMAGE_TOKEN]] * n_image + p[j + 1:], []
        for question, ans in [(None, a), *more[:turns - 1]]:
            if question is not None:
                seq += tok.encode(follow_up(question), add_special_tokens=False).ids
            word = tok.encode(ans, add_special_tokens=False).ids
            if len(word) != 1:
                raise ValueError(f"answer {ans!r} is not one token")
            lab += [len(seq), len(seq) + 1]
            seq += word + [vocab[EOS]]
        start = length - len(seq)
        ids[i, start:], mask[i, start:] = seq, 1
        at = [start + t for t in lab]
        labels[i, at] = ids[i, at]
    return ids, mask, labels


def order(seed: int, stage: int, step: int, batch: int, n: int) -> np.ndarray:
    """Sample indices of a step: one seeded permutation of the n samples per epoch, read batch by batch."""
    pos = np.arange(step * batch, (step + 1) * batch)
    return np.concatenate([_permutation(seed, stage, e, n)[pos[pos // n == e] % n] for e in np.unique(pos // n)])


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, stage: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stage, int(epoch)]).permutation(n)


# ---------------------------------------------------------------------------------------------------- model

class PatchHeads(nnx.Module):
    """Stage-1 linear heads (after a LayerNorm) on the tower's feature layer: per patch, and counts on CLS."""
    def __init__(self, dim: int, grid: int, *, rngs: nnx.Rngs):
        self.sizes = (("colour", len(COLOURS) + 1), ("shape", len(SHAPES) + 1), ("binding", PAIRS + 1),
                      ("glyph", len(GLYPHS) + 1), ("centre", PAIRS + 1), ("row", grid), ("column", grid))
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.patch = nnx.Linear(dim, sum(n for _, n in self.sizes), rngs=rngs)
        self.counts = nnx.Linear(dim, PAIRS * COUNT_CLASSES, rngs=rngs)

    def __call__(self, feats: Float[Array, "B T D"]) -> dict[str, Float[Array, "B ... C"]]:
        x = self.norm(feats)
        splits = np.cumsum([n for _, n in self.sizes])[:-1]
        out = dict(zip((k for k, _ in self.sizes), jnp.split(self.patch(x[:, 1:]), splits, axis=-1)))
        return {**out, "counts": self.counts(x[:, 0]).reshape(-1, PAIRS, COUNT_CLASSES)}


class Trainee(nnx.Module):
    def __init__(self, model: Llava, heads: PatchHeads):
        self.model, self.heads = model, heads


GROUPS = {  # parameter groups; a stage trains some of them, each with a learning-rate multiplier
    "tower": lambda path, _: path[:2] == ("model", "vision_tower"),
    "lm": lambda path, _: path[0] == "model" and path[1] != "vision_tower",
    "heads": lambda path, _: path[0] == "heads",
}


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """(1 + grid^2, dim) 2-D sine-cosine table (CLS row zero): the position embedding's initial value, so that
    attention can find a patch's neighbours from the first step (a plain ViT has no other locality prior)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    y, x = np.divmod(np.arange(grid * grid), grid)
    table = np.concatenate([f(c[:, None] * omega) for c in (y, x) for f in (np.sin, np.cos)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], 0).astype(np.float32)


def build(recipe: Recipe) -> tuple[nnx.GraphDef, dict[str, nnx.State]]:
    cfg, scene = PRESETS[recipe.model], SCENES[recipe.model]
    if cfg.vision.hidden_size % 4:
        raise ValueError(f"vision width {cfg.vision.hidden_size} is not a multiple of 4 (sin-cos positions)")
    rngs = nnx.Rngs(recipe.seed)
    trainee = Trainee(Llava(cfg, rngs=rngs), PatchHeads(cfg.vision.hidden_size, scene.grid, rngs=rngs))
    trainee.model.vision_tower.embeddings.position_embedding.embedding[...] = sincos_positions(
        scene.grid, cfg.vision.hidden_size)
    # Decoder init: unit-scale token embeddings and zero residual-branch outputs, so every layer starts as the
    # identity. With the default init (embeddings ~0.09 RMS, attention outputs ~1), the first layer overwrote each
    # question word with an average of image tokens, and the decoder sat at the per-family answer prior.
    lm = trainee.model.language_model
    lm.embed_tokens.embedding[...] = jax.random.normal(jax.random.key(recipe.seed), lm.embed_tokens.embedding.shape)
    for proj in (lm.layers.self_attn.o_proj, lm.layers.mlp.down_proj):
        proj.kernel[...] = jnp.zeros_like(proj.kernel[...])
    if recipe.init:
        loaded = load_model(MODEL_DIR if recipe.init == "bundled" else recipe.init)
        if loaded.config != cfg:
            raise ValueError(f"init {recipe.init!r} is not a {recipe.model!r} model: {loaded.config}")
        nnx.update(trainee.model, nnx.state(loaded, nnx.Param))
    graphdef, *states = nnx.split(trainee, *GROUPS.values())
    return graphdef, dict(zip(GROUPS, states))


def merge(graphdef: nnx.GraphDef, states: dict[str, nnx.State]) -> Trainee:
    return nnx.merge(graphdef, *(states[g] for g in GROUPS))


# ---------------------------------------------------------------------------------------------------- losses

def _dense_targets(batch: dict) -> dict[str, Int[Array, "B ..."]]:
    flat = lambda a: a.reshape(a.shape[0], -1).astype(jnp.int32)
    colour, shape = flat(batch["colour"]), flat(batch["shape"])
    on = colour < len(COLOURS)
    grid = batch["colour"].shape[-1]
    row, column = jnp.divmod(jnp.arange(grid * grid), grid)
    return {"colour": colour, "shape": shape, "binding": jnp.where(on, colour * len(SHAPES) + shape, PAIRS),
            "glyph": flat(batch["glyph"]), "centre": flat(batch["centre"]),
            "row": jnp.broadcast_to(row, colour.shape), "column": jnp.broadcast_to(column, colour.shape),
            "counts": flat(batch["counts"])}


def _foreground(targets: dict) -> dict[str, Array]:
    """Per head, the patches that carry its signal (the rest are weighted down in the loss)."""
    on = targets["colour"] < len(COLOURS)
    every = jnp.ones_like(on)
    return {"colour": on, "shape": on, "binding": on, "glyph": targets["glyph"] < len(GLYPHS),
            "centre": targets["centre"] > 0, "row": every, "column": every, "counts": jnp.ones_like(targets["counts"], bool)}


def dense_loss(trainee: Trainee, batch: dict, background_weight: float, position_weight: float):
    model = trainee.model
    feats = model.vision_tower(pixel_values(batch["image"]), model.config.vision_feature_layer)
    logits, targets = trainee.heads(feats), _dense_targets(batch)
    loss = 0.0
    for k, fg in _foreground(targets).items():
        w = jnp.where(fg, 1.0, background_weight) * (position_weight if k in ("row", "column") else 1.0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[k], targets[k])
        loss += (w * ce).sum() / jnp.where(fg, 1.0, background_weight).sum()
    return loss, (logits, targets)


def dense_stats(logits: dict, targets: dict) -> dict[str, tuple[Array, Array]]:
    """(correct, total) per stage-1 metric: each head on its foreground patches, plus the background rate of
    the colour head and the false-centre rate on patches without a centre."""
    fg = _foreground(targets)
    hit = {k: jnp.argmax(logits[k], -1) == targets[k] for k in targets}
    stats = {k: ((hit[k] & fg[k]).sum(), fg[k].sum()) for k in targets}
    bg = ~fg["colour"]
    stats["background"] = ((hit["colour"] & bg).sum(), bg.sum())
    no_centre = ~fg["centre"]
    stats["false_centre"] = (((jnp.argmax(logits["centre"], -1) > 0) & no_centre).sum(), no_centre.sum())
    return stats


def vqa_loss(trainee: Trainee, batch: dict):
    """Mean cross-entropy over the labelled tokens, and the logits (B, 2, V) predicting the last two columns
    (in one-turn rows: the answer and </s>)."""
    model = trainee.model
    if "features" in batch:  # VQA stages: cached tower features
        image_embeds = model.multi_modal_projector(batch["features"].astype(jnp.float32))
    else:
        image_embeds, _ = model.encode_images(pixel_values(batch["image"]))
    inp, valid = batch["ids"][:, :-1], batch["mask"][:, :-1].astype(bool)
    h, _, _ = model.language_model(model.embed(inp, image_embeds), positions(valid), valid)
    logits, labels = model.logits(h), batch["labels"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return jnp.sum(jnp.where(labels >= 0, ce, 0.0)) / jnp.sum(labels >= 0), logits[:, -2:]


# ---------------------------------------------------------------------------------------------------- training

def optimizer(stage: Stage, scales: dict[str, float]) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, one per parameter group (learning rate x its scale)."""
    def adamw(scale):
        lr = optax.warmup_cosine_decay_schedule(0.0, stage.lr * scale, stage.warmup, stage.decay_steps or stage.steps,
                                                 stage.lr * scale / 100)
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b2=0.98, weight_decay=stage.weight_decay))
    return optax.multi_transform({g: adamw(s) for g, s in scales.items()}, {g: g for g in scales})


def trained_groups(stage: int) -> dict[str, float]:
    """Parameter groups a stage trains, with their learning-rate multipliers."""
    return {"tower": 1.0, "heads": 1.0} if stage == 1 else {"lm": 1.0}


@functools.partial(jax.jit, static_argnames=("graphdef", "stage", "spec", "scales", "weights"),
                   donate_argnames=("train", "opt_state"))
def train_step(train: dict, opt_state, frozen: dict, batch: dict, *, graphdef: nnx.GraphDef, stage: int, spec: Stage,
               scales: tuple[tuple[str, float], ...], weights: tuple[float, float]):
    """One optimiser step on the `train` groups. Module-level jit keyed on static hashables only, so every run
    of one recipe in a process shares one compiled step per stage."""
    def f(train):
        trainee = merge(graphdef, {**train, **frozen})
        return (dense_loss(trainee, batch, *weights) if stage == 1 else vqa_loss(trainee, batch))[0]
    loss, grads = jax.value_and_grad(f)(train)
    updates, opt_state = optimizer(spec, dict(scales)).update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames="graphdef")
def dense_eval(states: dict, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
    return dense_stats(*dense_loss(merge(graphdef, states), batch, 1.0, 1.0)[1])


@functools.partial(jax.jit, static_argnames="graphdef")
def vqa_eval(states: dict, batch: dict, *, graphdef: nnx.GraphDef) -> Float[Array, "B 2 V"]:
    """Logits of the answer and </s> columns."""
    return vqa_loss(merge(graphdef, states), batch)[1]


@functools.partial(jax.jit, static_argnames="graphdef")
def tower_features(states: dict, images: UInt8[Array, "B H W 3"], *, graphdef: nnx.GraphDef) -> Float[Array, "B N Dv"]:
    return merge(graphdef, states).model.image_features(pixel_values(images))[0]


def _flat(prefix: str, tree: dict) -> dict[str, np.ndarray]:
    return {f"{prefix}/{'/'.join(map(str, k))}": np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def save_checkpoint(path: Path, states: dict, opt_state, stage: int, step: int, seconds: float):
    arrays = {k: v for g, s in states.items() for k, v in _flat(f"params/{g}", nnx.to_pure_dict(s)).items()}
    if opt_state is not None:
        arrays.update({f"opt/{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(opt_state))})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, stage=stage, step=step, seconds=seconds, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: Path, states: dict) -> tuple[int, int, float, list[np.ndarray] | None]:
    """Fills `states` in place; returns (stage, step, seconds, optimiser leaves or None)."""
    ckpt = np.load(path)
    for g, s in states.items():
        prefix = f"params/{g}/"
        flat = {tuple(k[len(prefix):].split("/")): jnp.asarray(ckpt[k]) for k in ckpt.files if k.startswith(prefix)}
        nnx.replace_by_pure_dict(s, traverse_util.unflatten_dict(flat))
    opt = sorted(k for k in ckpt.files if k.startswith("opt/"))
    return int(ckpt["stage"]), int(ckpt["step"]), float(ckpt["seconds"]), [ckpt[k] for k in opt] or None


class History:
    """history.jsonl: one record per logged train loss or evaluation; `truncate` drops what a resume redoes."""

    def __init__(self, path: Path):
        self.path = path
        self.records = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

    def truncate(self, stage: int, step: int):
        self.records = [r for r in self.records if (r["stage"], r["step"]) <= (stage, step)]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def add(self, **record):
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Run:
    def __init__(self, recipe: Recipe, out: Path, workers: int = 2):
        self.recipe, self.out = recipe, out
        self.cfg: LlavaConfig = PRESETS[recipe.model]
        self.scene = SCENES[recipe.model]
        self.graphdef, self.states = build(recipe)
        self.train = dataset(out, "train", recipe.n_train, self.scene, workers)
        self.val = dataset(out, "validation", recipe.n_val, self.scene, workers)
        self.val["ids"], self.val["mask"], self.val["labels"] = vqa_ids(self.val["question"], self.val["answer"],
                                                                         self.cfg.num_image_tokens)
        self.history = History(out / "history.jsonl")
        self.ckpt = out / "checkpoint.npz"
        self._vqa_inputs: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ---- evaluation
    def _batches(self, data: dict, keys: tuple[str, ...], size: int = 50):
        for i in range(0, len(data["question"]), size):
            yield {k: jnp.asarray(data[k][i:i + size]) for k in keys}

    def eval_dense(self) -> dict[str, float]:
        totals = {}
        for batch in self._batches(self.val, ("image", "colour", "shape", "glyph", "centre", "counts")):
            for k, (c, n) in dense_eval(self.states, batch, graphdef=self.graphdef).items():
                totals[k] = totals.get(k, np.zeros(2)) + (int(c), int(n))
        return {k: c / max(n, 1) for k, (c, n) in totals.items()}

    def eval_vqa(self) -> dict[str, float]:
        """Full-grid accuracy per family; for recipes that train on subsets also the overall accuracy at the
        `VAL_BUDGETS` with uniform random subsets and with the oracle's (the asked object's patches first)."""
        metrics = family_accuracy(self._val_hits(self.val, "image"), self.val["family"])
        if any(s.subsets for s in self.recipe.stages):
            n, grid = len(self.val["question"]), self.scene.grid
            rng = np.random.default_rng(0)
            oracle = np.argsort(-self.val_oracle_scores, axis=1, kind="stable")
            for k in VAL_BUDGETS:
                for name, kept in (("random", [uniform_subset(rng, grid, k) for _ in range(n)]),
                                   ("oracle", [np.sort(o[:k]) for o in oracle])):
                    rows = [np.array(a) for a in (self.val_features, self.val["ids"], self.val["mask"], self.val["labels"])]
                    apply_subsets(rows, dict(enumerate(kept)), *self._special_ids)
                    data = dict(zip(("features", "ids", "mask", "labels"), rows), question=self.val["question"])
                    metrics[f"{name}{k}"] = float(self._val_hits(data, "features").mean())
        return metrics

    def _val_hits(self, data: dict, source: str) -> np.ndarray:
        batches = self._batches(data, (source, "ids", "mask", "labels"))
        pred = np.concatenate([np.argmax(vqa_eval(self.states, b, graphdef=self.graphdef)[:, 0], -1) for b in batches])
        return pred == data["ids"][:, -2]

    @functools.cached_property
    def val_features(self) -> np.ndarray:
        """The frozen tower's features of the validation images (VQA stages only: the tower is trained before)."""
        images = self.val["image"]
        return np.concatenate([np.asarray(tower_features(self.states, jnp.asarray(images[i:i + 50]), graphdef=self.graphdef))
                               for i in range(0, len(images), 50)])

    @functools.cached_property
    def val_oracle_scores(self) -> np.ndarray:
        samples = [make_sample(seed, self.scene) for seed in split_seeds("validation", self.recipe.n_val)]
        return oracle_scores(*(np.stack([getattr(s, a).ravel() for s in samples]) for a in ("mask", "coverage", "points")))

    # ---- stages
    def batch(self, stage: int, step: int, idx: np.ndarray) -> dict:
        idx = np.sort(idx)  # sequential reads of the memory maps
        if stage == 1:
            keys = ("image", "colour", "shape", "glyph", "centre", "counts")
            return {k: jnp.asarray(self.train[k][idx]) for k in keys}
        spec = self.recipe.stages[stage - 1]
        rows = [np.array(self.features[idx]), *(a[idx] for a in self.vqa_inputs(spec))]
        if spec.subsets:  # a pure function of (seed, stage, step): resumes draw the same subsets
            rng = np.random.default_rng([self.recipe.seed, stage, step, 1])
            chosen = np.flatnonzero(rng.random(len(idx)) < spec.subsets)
            objects = (self.object_labels(idx[chosen]) if "objects" in spec.subset_shapes
                       else [None] * len(chosen))
            apply_subsets(rows, {i: draw_subset(rng, self.scene.grid, spec.min_tokens, spec.subset_shapes, o)
                                 for i, o in zip(chosen, objects)}, *self._special_ids)
        return dict(zip(("features", "ids", "mask", "labels"), map(jnp.asarray, rows)))

    def object_labels(self, idx: np.ndarray) -> list[np.ndarray]:
        """The objects of training images `idx` (`token_subsets.object_labels` of their colour-shape bindings)."""
        binding = self.train["colour"][idx].astype(int) * (len(SHAPES) + 1) + self.train["shape"][idx]
        background = len(COLOURS) * (len(SHAPES) + 1) + len(SHAPES)
        return [object_labels(b, background) for b in binding]

    @property
    def _special_ids(self) -> tuple[int, int]:
        return self.cfg.image_token_id, build_tokenizer().token_to_id(PAD)

    def vqa_inputs(self, spec: Stage) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids, mask, labels of the training samples for the turns and follow-ups of a stage (built
        once per run: a per-instance cache, so a finished Run's arrays are not kept alive by a class-level one)."""
        key = spec.turns, spec.need_quadrant, spec.by_quadrant
        if key not in self._vqa_inputs:
            seeds = split_seeds("train", self.recipe.n_train)
            follow = None if spec.turns == 1 else [follow_ups(s, spec.turns - 1, spec.need_quadrant, spec.by_quadrant)
                                                   for s in seeds]
            self._vqa_inputs[key] = vqa_ids(self.train["question"], self.train["answer"], self.cfg.num_image_tokens,
                                             follow, spec.turns)
        return self._vqa_inputs[key]

    @functools.cached_property
    def features(self) -> np.ndarray:
        """The frozen tower's features of every training image, (n, N, Dv) float16, cached in OUT."""
        path = self.out / "features_train.npy"
        if not path.exists():
            images = self.train["image"]
            tmp = path.with_name(path.stem + ".tmp.npy")
            shape = (len(images), self.cfg.num_image_tokens, self.cfg.vision.hidden_size)
            feats = np.lib.format.open_memmap(tmp, "w+", np.float16, shape)
            for i in tqdm(range(0, len(images), 64), desc="cache tower features"):
                feats[i:i + 64] = np.asarray(tower_features(self.states, jnp.asarray(images[i:i + 64]), graphdef=self.graphdef))
            feats.flush()
            del feats
            os.replace(tmp, path)
        return np.load(path, mmap_mode="r")

    def run_stage(self, stage: int, start: int, seconds: float, opt_leaves, max_steps: int | None) -> tuple[bool, float]:
        """Trains `stage` from `start`; (finished, or stopped early by max_steps; training seconds so far)."""
        r, spec = self.recipe, self.recipe.stages[stage - 1]
        scales = trained_groups(stage)
        opt = optimizer(spec, scales)
        train = {g: self.states[g] for g in scales}
        frozen = {g: s for g, s in self.states.items() if g not in scales}
        opt_state = opt.init(train)
        if opt_leaves is not None:
            treedef = jax.tree.structure(opt_state)
            if treedef.num_leaves != len(opt_leaves):
                raise ValueError(f"checkpoint has {len(opt_leaves)} optimiser arrays; stage {stage} needs {treedef.num_leaves}")
            opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in opt_leaves])
        step_fn = functools.partial(train_step, graphdef=self.graphdef, stage=stage, spec=spec,
                                    scales=tuple(scales.items()), weights=(r.background_weight, r.position_weight))
        stop = spec.steps if max_steps is None else min(spec.steps, start + max_steps)
        losses, t0, n = [], time.perf_counter(), len(self.train["question"])
        with tqdm(total=spec.steps, initial=start, desc=f"stage {stage}", unit="step", dynamic_ncols=True) as bar:
            for step in range(start, stop):
                batch = self.batch(stage, step, order(r.seed, stage, step, spec.batch, n))
                train, opt_state, loss = step_fn(train, opt_state, frozen, batch)
                self.states.update(train)
                losses.append(loss)
                bar.update()
                done = step + 1
                if done % r.log_every == 0 or done == stop:
                    mean = float(np.mean(jax.device_get(losses)))
                    now = time.perf_counter()
                    seconds, t0, rate = seconds + now - t0, now, len(losses) * spec.batch / (now - t0)
                    bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{rate:.1f}")
                    self.history.add(stage=stage, step=done, kind="train", loss=mean, seconds=seconds, rate=rate)
                    losses = []
                if done % r.eval_every == 0 or done == spec.steps:
                    self.evaluate(stage, done, seconds)
                    t0 = time.perf_counter()  # evaluation time is not training time
                if done % r.ckpt_every == 0 or done == stop:
                    save_checkpoint(self.ckpt, self.states, opt_state if done < spec.steps else None, stage, done, seconds)
        return stop == spec.steps, seconds

    def evaluate(self, stage: int, step: int, seconds: float):
        metrics = self.eval_dense() if stage == 1 else self.eval_vqa()
        self.history.add(stage=stage, step=step, kind="val", seconds=seconds, **metrics)
        log.info("stage %d step %d (%.0f s) val: %s", stage, step, seconds,
                 " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        plot_curves(self.history.records, self.out / "curves.png")

    def run(self, until: str = "export", max_steps: int | None = None, export_dir: Path | None = None):
        stage, step, seconds, opt_leaves = 1, 0, 0.0, None
        if self.ckpt.exists():
            stage, step, seconds, opt_leaves = load_checkpoint(self.ckpt, self.states)
            log.info("resumed from %s: stage %d step %d (%.0f s trained)", self.ckpt, stage, step, seconds)
        self.history.truncate(stage, step)
        last = len(self.recipe.stages) if until == "export" else int(until)
        if not 1 <= last <= len(self.recipe.stages):
            raise ValueError(f"--until {until}: recipe {self.recipe.model!r} has stages 1-{len(self.recipe.stages)}")
        for s in range(1, last + 1):
            spec = self.recipe.stages[s - 1]
            if s < stage or (s == stage and step >= spec.steps) or spec.steps == 0:
                continue
            if s > stage:
                step, seconds, opt_leaves = 0, 0.0, None
            finished, seconds = self.run_stage(s, step, seconds, opt_leaves, max_steps)
            if not finished:
                return
            save_checkpoint(self.out / f"stage{s}.npz", self.states, None, s, spec.steps, seconds)
            stage, step = s, spec.steps
        if until == "export":
            self.finish(export_dir or self.out / "hf")

    # ---- test score and export
    def finish(self, export_dir: Path):
        model = merge(self.graphdef, self.states).model
        test = dataset(self.out, "test", self.recipe.n_test, self.scene, workers=1)
        hit = np.array(answer(model, test["image"], test["question"])) == test["answer"]
        scores = family_accuracy(hit, test["family"])
        log.info("TEST (%d samples, generation): %s", len(hit), " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        export(model, self.scene, export_dir)
        size = (export_dir / "model.safetensors").stat().st_size
        (self.out / "results.json").write_text(json.dumps({"test": scores, "n_test": len(hit),
                                                           "params": n_params(model), "bytes": size}, indent=1))
        log.info("exported %s (%.1f MB, %d params)", export_dir, size / 2**20, n_params(model))


def family_accuracy(hit: np.ndarray, family: np.ndarray) -> dict[str, float]:
    """Share of right answers per question family present, and overall."""
    return {**{f: float(hit[family == f].mean()) for f in FAMILIES if (family == f).any()}, "overall": float(hit.mean())}


def n_params(model: Llava) -> int:
    return sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def answer(model: Llava, images: np.ndarray, questions, batch: int = 50) -> list[str]:
    """Greedy one-word answers from generation, unpruned, decoded up to </s>."""
    tok = build_tokenizer()
    ids, mask, _ = vqa_ids(questions, ["yes"] * len(questions), model.config.num_image_tokens)  # answer cut below
    graphdef, state = nnx.split(model)
    out = []
    for i in tqdm(range(0, len(questions), batch), desc="answer"):
        g = generate(graphdef, state, pixel_values(jnp.asarray(images[i:i + batch])), ids[i:i + batch, :-2],
                     mask[i:i + batch, :-2], decoding=Decoding(3, tok.token_to_id(EOS), tok.token_to_id(PAD)))
        out += [tok.decode([t for t in row[:n] if t != tok.token_to_id(EOS)]) for row, n in
                zip(np.asarray(g.tokens).tolist(), np.asarray(g.lengths).tolist())]
    return out


def export(model: Llava, scene: SceneConfig, hf_dir: Path):
    """transformers-loadable LLaVA directory at hf_dir (replaced), float32. Tower layers past the deepest
    feature layer (LLaVA never reads them) are written as identity blocks (zero attention output and MLP
    projections), and post_layernorm as the identity affine, so the file holds every weight CLIP has."""
    cfg = model.config
    vocab = build_tokenizer().get_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        ours = Path(tmp) / "ours"
        ours.mkdir()
        save_params(ours / "params", nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        ids = {"bos_token_id": vocab["<s>"], "eos_token_id": vocab[EOS], "pad_token_id": vocab[PAD]}
        write_config(ours, cfg, "float32", {"image_seq_length": cfg.num_image_tokens, "text_config": ids})
        save_processor_files(ours, scene)
        GenerationConfig(**ids).save_pretrained(ours)
        depth = model.vision_tower.num_layers
        params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model.vision_tower, nnx.Param)))
        entries = []
        for rule in RULES:
            if rule.part != "vision" or not (rule.stacked or rule.ours is None):
                continue
            if rule.ours is None:  # post_layernorm
                value = np.ones if rule.hf.endswith("weight") else np.zeros
                entries.append((rule.hf_key(), (cfg.vision.hidden_size,), np.dtype(np.float32),
                                lambda v=value: v(cfg.vision.hidden_size, np.float32)))
                continue
            shape = params[rule.ours[1:]].shape[1:]
            one = rule.ours[-1] == "scale"
            for i in range(depth, cfg.vision.num_hidden_layers):
                y = rule.transform.to_hf((np.ones if one else np.zeros)(shape, np.float32))
                entries.append((rule.hf_key(i), y.shape, y.dtype, lambda y=y: y))
        if entries:
            write_file(ours / UNUSED, entries)
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        export_checkpoint(ours, hf_dir, progress=False)
    size = (hf_dir / "model.safetensors").stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"exported model.safetensors is {size / 2**20:.1f} MB, over the {MAX_BYTES / 2**20:.0f} MB budget")


# ---------------------------------------------------------------------------------------------------- curves

def plot_curves(records: list[dict], path: Path):
    """Train loss and validation accuracy: stage 1 (per head), the VQA stages (per family, one after another)."""
    from matplotlib.figure import Figure  # no pyplot: no backend switched under a caller (a notebook's inline one)

    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2)
    seen = sorted({r["stage"] for r in records})
    ends = {s: max(r["step"] for r in records if r["stage"] == s) for s in seen}
    offset = {s: sum(ends[t] for t in seen if 1 < t < s) for s in seen}
    x = lambda r: r["step"] + offset[r["stage"]]
    for row, stages, keys in ((0, (1,), ("colour", "shape", "binding", "glyph", "centre", "counts", "background")),
                              (1, tuple(s for s in seen if s > 1),
                               (*FAMILIES, "overall", *(f"{m}{k}" for k in VAL_BUDGETS for m in ("random", "oracle"))))):
        train = [r for r in records if r["stage"] in stages and r["kind"] == "train"]
        val = [r for r in records if r["stage"] in stages and r["kind"] == "val"]
        axes[row, 0].plot([x(r) for r in train], [r["loss"] for r in train], lw=0.8)
        axes[row, 0].set(yscale="log", xlabel="step", ylabel="train loss", title=f"stage {'+'.join(map(str, stages))}")
        for k in keys:
            pts = [(x(r), r[k]) for r in val if k in r]
            if pts:
                axes[row, 1].plot(*zip(*pts), marker=".", label=k)
        if row == 1:
            for f in FAMILIES:  # majority-answer baselines (answers are balanced by construction)
                axes[row, 1].axhline(1 / len(ANSWERS[f]), ls=":", lw=0.6, color="grey")
        axes[row, 1].set(ylim=(0, 1.02), xlabel="step", ylabel="validation accuracy",
                         title="per-patch heads" if row == 0 else "VQA per family (dotted: chance)")
        if val:
            axes[row, 1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None, prog: str | None = None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bundled"))
    p.add_argument("--recipe", choices=tuple(RECIPES), help="for a fresh run (default bundled); a resume reads OUT/recipe.json")
    stages = range(1, max(len(r.stages) for r in RECIPES.values()) + 1)
    p.add_argument("--until", choices=(*map(str, stages), "export"), default="export", help="last stage to run")
    p.add_argument("--max-steps", type=int, help="stop (checkpointed) after this many steps of this invocation")
    p.add_argument("--workers", type=int, default=2, help="processes rendering the image caches")
    p.add_argument("--export-dir", type=Path, help=f"HF output (default {MODEL_DIR} for the bundled recipe, else OUT/hf)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stored = args.out / "recipe.json"
    if stored.exists():
        recipe = Recipe.from_dict(json.loads(stored.read_text()))
        if args.recipe and RECIPES[args.recipe] != recipe:
            raise ValueError(f"{stored} is not recipe {args.recipe!r}; use another --out")
    else:
        recipe = RECIPES[args.recipe or "bundled"]
        stored.write_text(json.dumps(dataclasses.asdict(recipe), indent=1) + "\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(args.out / "log.txt")], force=True)
    export_dir = args.export_dir or (MODEL_DIR if recipe.model == "bundled" else args.out / "hf")
    with logging_redirect_tqdm():
        run = Run(recipe, args.out, args.workers)
        log.info("recipe %s; model %s: %d params", recipe.model, PRESETS[recipe.model],
                 n_params(merge(run.graphdef, run.states).model))
        run.run(args.until, args.max_steps, export_dir)


if __name__ == "__main__":
    main()
