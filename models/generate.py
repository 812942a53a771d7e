"""Batched LLaVA generation: image encoding (+ pruning), prefill, and a `lax.while_loop` decode, in one jit.

Prompts are left-padded to a bucket length (a multiple of `bucket`), so every prompt length inside a bucket
reuses one compiled program. The three stages are also jitted alone for `timed=True`, which blocks after
each and reports its wall time (the first call of a shape includes compilation).

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
from svdprune_jax.models.llama import FastV, init_cache
from svdprune_jax.models.llava import GIVEN, Llava, Pruning, check_prompts


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: Int[Array, "B M"]       # generated ids; pad_token_id after a row's EOS
    lengths: Int[Array, "B"]        # tokens generated per row, EOS included
    kept: Int[Array, "B k"] | None  # image tokens kept by pruning (indices into the N features), else None
    kept_columns: Int[Array, "B Tk"] | None  # FastV: bucketed prompt columns reaching layers >= K, else None
    timings: dict[str, float]       # seconds per stage ("encode", "prefill", "decode") when timed, else {}


def bucket_length(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def sample(logits: Float[Array, "B V"], key, temperature, top_p) -> Int[Array, "B"]:
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling; traced scalars, one program."""
    def nucleus(logits):
        logits = logits / temperature
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        drop = jnp.cumsum(probs, axis=-1) - probs > top_p  # the most likely token always survives
        choice = jax.random.categorical(key, jnp.where(drop, -jnp.inf, sorted_logits), axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

    return jax.lax.cond(temperature > 0, nucleus, lambda l: jnp.argmax(l, axis=-1), logits).astype(jnp.int32)


def _prefill(model: Llava, input_ids, mask, image_embeds, cache, fastv):
    """Fills the cache; returns (logits of the last prompt column (B, V), cache, next positions (B,), columns)."""
    h, cache, columns = model.run_prompt(input_ids, mask, image_embeds, cache=cache, fastv=fastv)
    return model.logits(h[:, -1]), cache, mask.sum(axis=1).astype(jnp.int32), columns


def _decode(model: Llava, logits, cache, next_pos, key, temperature, top_p, eos_token_id, pad_token_id, *, max_new_tokens):
    """Sample token 0 from the prefill logits, then feed back one token per step until all rows hit EOS."""
    B = logits.shape[0]

    def emit(step, token, tokens, done, lengths):
        token = jnp.where(done, pad_token_id, token)
        lengths = lengths + ~done
        return tokens.at[:, step].set(token), done | (token == eos_token_id), lengths

    tokens = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32)
    token = sample(logits, jax.random.fold_in(key, 0), temperature, top_p)
    tokens, done, lengths = emit(0, token, tokens, jnp.zeros(B, bool), jnp.zeros(B, jnp.int32))

    def body(c):
        step, tokens, done, lengths, cache, pos = c
        x = model.language_model.embed_tokens(tokens[:, step - 1, None])
        h, cache = model.language_model.decode(x, pos[:, None], cache)
        token = sample(model.logits(h[:, 0]), jax.random.fold_in(key, step), temperature, top_p)
        tokens, done, lengths = emit(step, token, tokens, done, lengths)
        return step + 1, tokens, done, lengths, cache, pos + 1

    cond = lambda c: (c[0] < max_new_tokens) & ~c[2].all()
    _, tokens, _, lengths, _, _ = jax.lax.while_loop(cond, body, (1, tokens, done, lengths, cache, next_pos))
    return tokens, lengths


def _cache_lengths(prompt_len: int, n_image: int, max_new_tokens: int, fastv: FastV | None) -> tuple[int, ...]:
    # The last sampled token is never fed back: max_new_tokens - 1 decode writes.
    lengths = (prompt_len,) if fastv is None else (prompt_len, prompt_len - n_image + fastv.keep)
    return tuple(n + max_new_tokens - 1 for n in lengths)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("pruning", "fastv", "max_new_tokens"))
def _generate(graphdef, state, pixel_values, input_ids, mask, key, scores, temperature, top_p, eos_token_id,
              pad_token_id, *, pruning, fastv, max_new_tokens):
    model = nnx.merge(graphdef, state)
    encode_key, sample_key = jax.random.split(key)
    image_embeds, kept = model.encode_images(pixel_values, pruning, encode_key, scores)
    cache = init_cache(model.config.text, input_ids.shape[0],
                       _cache_lengths(input_ids.shape[1], image_embeds.shape[1], max_new_tokens, fastv), fastv,
                       image_embeds.dtype)
    logits, cache, pos, columns = _prefill(model, input_ids, mask, image_embeds, cache, fastv)
    tokens, lengths = _decode(model, logits, cache, pos, sample_key, temperature, top_p, eos_token_id, pad_token_id,
                              max_new_tokens=max_new_tokens)
    return tokens, lengths, kept, columns


@functools.partial(jax.jit, static_argnums=0, static_argnames=("pruning",))
def _encode_jit(graphdef, state, pixel_values, key, scores, *, pruning):
    return nnx.merge(graphdef, state).encode_images(pixel_values, pruning, key, scores)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("fastv",), donate_argnames=("cache",))
def _prefill_jit(graphdef, state, input_ids, mask, image_embeds, cache, *, fastv):
    return _prefill(nnx.merge(graphdef, state), input_ids, mask, image_embeds, cache, fastv)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_new_tokens",))
def _decode_jit(graphdef, state, *args, max_new_tokens):
    return _decode(nnx.merge(graphdef, state), *args, max_new_tokens=max_new_tokens)


def _timed_generate(graphdef, state, pixel_values, input_ids, mask, key, scores, temperature, top_p, eos_token_id,
                    pad_token_id, *, pruning, fastv, max_new_tokens):
    """The stages of `_generate`, jitted one by one, with the wall time of each (blocking after each)."""
    timings = {}

    def clock(name, fn, *args, **kw):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(graphdef, state, *args, **kw))
        timings[name] = time.perf_counter() - t
        return out

    encode_key, sample_key = jax.random.split(key)
    image_embeds, kept = clock("encode", _encode_jit, pixel_values, encode_key, scores, pruning=pruning)
    lengths = _cache_lengths(input_ids.shape[1], image_embeds.shape[1], max_new_tokens, fastv)
    cache = init_cache(nnx.merge(graphdef, state).config.text, input_ids.shape[0], lengths, fastv, image_embeds.dtype)
    logits, cache, pos, columns = clock("prefill", _prefill_jit, input_ids, mask, image_embeds, cache, fastv=fastv)
    tokens, lengths = clock("decode", _decode_jit, logits, cache, pos, sample_key, temperature, top_p, eos_token_id,
                            pad_token_id, max_new_tokens=max_new_tokens)
    return (tokens, lengths, kept, columns), timings


def generate(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Float[Array, "B C H W"],
             input_ids: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None = None, *, max_new_tokens: int,
             eos_token_id: int | None, pad_token_id: int = 0, pruning: Pruning | None = None,
             fastv: FastV | None = None, temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
             scores: Float[Array, "B N"] | None = None, bucket: int = 64, timed: bool = False,
             mesh: Mesh | None = None) -> Generation:
    """Generate up to `max_new_tokens` per row for a left-padded batch of prompts, one image each.

    `graphdef, state = nnx.split(model)` once, outside. pixel_values (B, C, H, W) as the CLIP processor gives
    them; input_ids/attention_mask (B, T), left padding only; each prompt carries exactly `pruning.k` image
    tokens (unpruned: config.num_image_tokens). Prompts are left-padded further to a multiple of `bucket`.
    temperature 0 is greedy; sampling (and random pruning) need `key`. eos_token_id None: never stop early.
    scores (B, N): per-token scores for `Pruning(GIVEN, k)`, which keeps the k highest (e.g. an oracle's).
    timed: run encode / prefill / decode as separate jits and report each one's seconds (the first call of
    a shape includes its compilation).
    mesh: run sharded on it; `state` must be laid out on it (`load_model(..., mesh=mesh)`), B a multiple of its
    `data` axis. Every process passes the same whole batch (host arrays) and gets global arrays back.
    """
    cfg = nnx.merge(graphdef, state).config
    check_prompts(cfg, input_ids, attention_mask, cfg.num_image_tokens if pruning is None else pruning.k)
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
    longest = int(mask.sum(axis=1).max())
    if longest + max_new_tokens > cfg.text.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context of "
                         f"{cfg.text.max_position_embeddings} positions")
    given = pruning is not None and pruning.method == GIVEN
    if given != (scores is not None):
        raise ValueError(f"per-token scores go with pruning method {GIVEN!r}, and only with it")
    if given and (np.shape(scores) != (ids.shape[0], cfg.num_image_tokens) or not np.isfinite(scores).all()):
        raise ValueError(f"scores must be finite, of shape (B, N) = {(ids.shape[0], cfg.num_image_tokens)}; "
                         f"got {np.shape(scores)}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")
    if key is None:
        if temperature > 0 or (pruning is not None and pruning.method in svdprune_jax.NEEDS_KEY):
            raise ValueError("sampling (temperature > 0) and random pruning need an explicit key")
        key = jax.random.key(0)
    pad = bucket_length(ids.shape[1], bucket) - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    run = _timed_generate if timed else _generate
    eos = -1 if eos_token_id is None else eos_token_id
    scores = None if scores is None else jnp.asarray(scores, jnp.float32)
    pixel_values, ids, mask, scores = sharding.put_batch(mesh, pixel_values, ids, mask, scores)
    with sharding.use(mesh):
        out = run(graphdef, state, pixel_values, ids, mask, key, scores, jnp.float32(temperature), jnp.float32(top_p),
                  jnp.int32(eos), jnp.int32(pad_token_id), pruning=pruning, fastv=fastv, max_new_tokens=max_new_tokens)
    (tokens, lengths, kept, columns), timings = out if timed else (out, {})
    return Generation(tokens, lengths, kept, columns, timings)
