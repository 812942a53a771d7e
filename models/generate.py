"""Batched LLaVA generation: image encoding (+ pruning), prefill, and a `lax.while_loop` decode, in one jit.

Prompts are left-padded to a bucket length (a multiple of `bucket`), so every prompt length inside a bucket
reuses one compiled program (`generate_program`). The three stages are also jitted alone (`encode_stage`,
`prefill_stage`, `decode_stage`) for `timed=True`, which blocks after each and reports its wall time (the
first call of a shape includes compilation). Settings: `Decoding` (max_new_tokens static; EOS, padding and
`models.sampling.Sampling` traced, so new values reuse the program).

On a device mesh (`mesh=`, see `models.sharding`) the same jitted program runs SPMD: the batch split over
`data`, the params and the KV cache over `model` as the params declare; outputs stay sharded global arrays.
"""
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

import svdprune_jax
from svdprune_jax.models import sharding
from svdprune_jax.models.cache import KVCache
from svdprune_jax.models.llama import FastV
from svdprune_jax.models.llava import GIVEN, Llava, Pruning, check_prompts, fastv_width
from svdprune_jax.models.sampling import GREEDY, Sampling


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: Int[Array, "B M"]       # generated ids; pad_token_id after a row's EOS
    lengths: Int[Array, "B"]        # tokens generated per row, EOS included
    kept: Int[Array, "B k"] | None  # image tokens kept by pruning (indices into the N features), else None
    kept_columns: Int[Array, "B Tk"] | None  # FastV: bucketed prompt columns reaching layers >= K, else None
    timings: dict[str, float]       # seconds per stage ("encode", "prefill", "decode") when timed, else {}


def bucket_length(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


@functools.partial(jax.tree_util.register_dataclass, data_fields=("eos_token_id", "pad_token_id", "sampling"),
                   meta_fields=("max_new_tokens",))
@dataclasses.dataclass(frozen=True)
class Decoding:
    """What the decode loop does. `max_new_tokens` is static (it shapes the output: one program per value);
    the token ids and the sampling settings are pytree leaves, traced under jit."""
    max_new_tokens: int
    eos_token_id: int | None | Int[Array, ""] = None  # None: never stop early
    pad_token_id: int | Int[Array, ""] = 0  # written after a row's EOS
    sampling: Sampling = GREEDY

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} must be >= 1")

    def as_arrays(self) -> "Decoding":
        """int32 token ids (EOS None as -1, which no token equals) and float32 sampling scalars: one pytree
        structure and dtype for every value, so new values never recompile."""
        eos = -1 if self.eos_token_id is None else self.eos_token_id
        return Decoding(self.max_new_tokens, jnp.int32(eos), jnp.int32(self.pad_token_id), self.sampling.as_arrays())


def _prefill(model: Llava, input_ids, mask, image_embeds, cache, fastv):
    """Fills the cache; returns (logits of the last prompt column (B, V), cache, next positions (B,), columns)."""
    h, cache, columns = model.run_prompt(input_ids, mask, image_embeds, cache=cache, fastv=fastv)
    return model.logits(h[:, -1]), cache, mask.sum(axis=1).astype(jnp.int32), columns


def _decode(model: Llava, logits, cache: KVCache, next_pos, key, decoding: Decoding):
    """Sample token 0 from the prefill logits, then feed back one token per step until all rows hit EOS."""
    B, M, pad = logits.shape[0], decoding.max_new_tokens, decoding.pad_token_id
    sample = decoding.sampling

    def emit(step, token, tokens, done, lengths):
        token = jnp.where(done, pad, token)
        lengths = lengths + ~done
        return tokens.at[:, step].set(token), done | (token == decoding.eos_token_id), lengths

    tokens = jnp.full((B, M), pad, jnp.int32)
    token = sample(logits, jax.random.fold_in(key, 0))
    tokens, done, lengths = emit(0, token, tokens, jnp.zeros(B, bool), jnp.zeros(B, jnp.int32))

    def body(c):
        step, tokens, done, lengths, cache, pos = c
        x = model.language_model.embed_tokens(tokens[:, step - 1, None])
        h, cache = model.language_model.decode(x, pos[:, None], cache)
        token = sample(model.logits(h[:, 0]), jax.random.fold_in(key, step))
        tokens, done, lengths = emit(step, token, tokens, done, lengths)
        return step + 1, tokens, done, lengths, cache, pos + 1

    cond = lambda c: (c[0] < M) & ~c[2].all()
    _, tokens, _, lengths, _, _ = jax.lax.while_loop(cond, body, (1, tokens, done, lengths, cache, next_pos))
    return tokens, lengths


def _init_cache(model: Llava, input_ids, image_embeds, max_new_tokens: int, fastv: FastV | None) -> KVCache:
    """An empty cache for the prompt and its new tokens (the last sampled token is never fed back:
    max_new_tokens - 1 decode writes)."""
    T, n = input_ids.shape[1], image_embeds.shape[1]
    prompt = (T,) if fastv is None else (T, T - n + fastv.keep)
    lengths = tuple(p + max_new_tokens - 1 for p in prompt)
    return KVCache.init(model.config.text, input_ids.shape[0], lengths, fastv, image_embeds.dtype)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("pruning", "fastv"))
def generate_program(graphdef, state, pixel_values, input_ids, mask, key, scores, decoding: Decoding, *, pruning,
                     fastv):
    """Encode (+ prune), prefill and decode as one jitted program: (tokens, lengths, kept, kept columns)."""
    model = nnx.merge(graphdef, state)
    encode_key, sample_key = jax.random.split(key)
    image_embeds, kept = model.encode_images(pixel_values, pruning, encode_key, scores)
    cache = _init_cache(model, input_ids, image_embeds, decoding.max_new_tokens, fastv)
    logits, cache, pos, columns = _prefill(model, input_ids, mask, image_embeds, cache, fastv)
    tokens, lengths = _decode(model, logits, cache, pos, sample_key, decoding)
    return tokens, lengths, kept, columns


@functools.partial(jax.jit, static_argnums=0, static_argnames=("pruning",))
def encode_stage(graphdef, state, pixel_values, key, scores, *, pruning):
    """`Llava.encode_images` jitted alone: (image embeddings, kept indices)."""
    return nnx.merge(graphdef, state).encode_images(pixel_values, pruning, key, scores)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("fastv",), donate_argnames=("cache",))
def prefill_stage(graphdef, state, input_ids, mask, image_embeds, cache: KVCache, *, fastv):
    """The prefill jitted alone (cache donated): (last-column logits, cache, next positions, kept columns)."""
    return _prefill(nnx.merge(graphdef, state), input_ids, mask, image_embeds, cache, fastv)


@functools.partial(jax.jit, static_argnums=0)
def decode_stage(graphdef, state, logits, cache: KVCache, next_pos, key, decoding: Decoding):
    """The decode loop jitted alone: (tokens, lengths)."""
    return _decode(nnx.merge(graphdef, state), logits, cache, next_pos, key, decoding)


def _timed_generate(graphdef, state, pixel_values, input_ids, mask, key, scores, decoding: Decoding, *, pruning,
                    fastv):
    """`generate_program`'s stages, jitted one by one, with the wall time of each (blocking after each)."""
    timings = {}

    def clock(name, fn, *args, **kw):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(graphdef, state, *args, **kw))
        timings[name] = time.perf_counter() - t
        return out

    encode_key, sample_key = jax.random.split(key)
    image_embeds, kept = clock("encode", encode_stage, pixel_values, encode_key, scores, pruning=pruning)
    cache = _init_cache(nnx.merge(graphdef, state), input_ids, image_embeds, decoding.max_new_tokens, fastv)
    logits, cache, pos, columns = clock("prefill", prefill_stage, input_ids, mask, image_embeds, cache, fastv=fastv)
    tokens, lengths = clock("decode", decode_stage, logits, cache, pos, sample_key, decoding)
    return (tokens, lengths, kept, columns), timings


def generate(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Float[Array, "B C H W"],
             input_ids: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None = None, *, decoding: Decoding,
             pruning: Pruning | None = None, fastv: FastV | None = None, key: jax.Array | None = None,
             scores: Float[Array, "B N"] | None = None, bucket: int = 64, timed: bool = False,
             mesh: Mesh | None = None) -> Generation:
    """Generate up to `decoding.max_new_tokens` per row for a left-padded batch of prompts, one image each.

    `graphdef, state = nnx.split(model)` once, outside. pixel_values (B, C, H, W) as the CLIP processor gives
    them (LLaVA-NeXT: `models.llava_next.layout(...)`, each prompt carrying its image's `lengths` unpruned); input_ids/attention_mask (B, T), left padding only; each prompt carries exactly `pruning.k` image
    tokens (unpruned: config.num_image_tokens). Prompts are left-padded further to a multiple of `bucket` (with FastV
    on LLaVA-NeXT first to `models.llava.fastv_width`: the image slots plus the longest text, so one program serves
    every aspect ratio of a view count).
    Sampling (`decoding.sampling` not greedy) and random pruning need `key`.
    scores (B, N): per-token scores for `Pruning(GIVEN, k)`, which keeps the k highest (e.g. an oracle's).
    timed: run encode / prefill / decode as separate jits and report each one's seconds (the first call of
    a shape includes its compilation).
    mesh: run sharded on it; `state` must be laid out on it (`load_model(..., mesh=mesh)`), B a multiple of its
    `data` axis. Every process passes the same whole batch (host arrays) and gets global arrays back.
    """
    model = nnx.merge(graphdef, state)
    cfg = model.config
    budget = model.prompt_budget(pixel_values, pruning)
    check_prompts(cfg, input_ids, attention_mask, budget)
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    width = max(ids.shape[1], fastv_width(model, pixel_values, mask, pruning, fastv, budget))
    longest = int(mask.sum(axis=1).max())
    if longest + decoding.max_new_tokens > cfg.text.context:
        raise ValueError(f"prompt of {longest} tokens + {decoding.max_new_tokens} new tokens exceeds the context of "
                         f"{cfg.text.context} positions")
    given = pruning is not None and pruning.method == GIVEN
    if given != (scores is not None):
        raise ValueError(f"per-token scores go with pruning method {GIVEN!r}, and only with it")
    if given and (np.shape(scores) != (ids.shape[0], cfg.num_image_tokens) or not np.isfinite(scores).all()):
        raise ValueError(f"scores must be finite, of shape (B, N) = {(ids.shape[0], cfg.num_image_tokens)}; "
                         f"got {np.shape(scores)}")
    if key is None:
        if not decoding.sampling.greedy or (pruning is not None and pruning.method in svdprune_jax.NEEDS_KEY):
            raise ValueError("sampling (temperature > 0) and random pruning need an explicit key")
        key = jax.random.key(0)
    pad = bucket_length(width, bucket) - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=decoding.pad_token_id)
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    run = _timed_generate if timed else generate_program
    scores = None if scores is None else jnp.asarray(scores, jnp.float32)
    pixel_values, ids, mask, scores = sharding.put_batch(mesh, pixel_values, ids, mask, scores)
    with sharding.use(mesh):
        out = run(graphdef, state, pixel_values, ids, mask, key, scores, decoding.as_arrays(), pruning=pruning,
                  fastv=fastv)
    (tokens, lengths, kept, columns), timings = out if timed else (out, {})
    return Generation(tokens, lengths, kept, columns, timings)
