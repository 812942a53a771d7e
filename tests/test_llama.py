"""LLaMA decoder: config parsing, RoPE/RMSNorm against float64 NumPy, KV-cache decode against the full
forward, FastV against transformers' decoder layers driven by hand, bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import from_hf, hf_fastv, prompts, tiny
from tiny_hf import IMAGE_TOKEN_ID
from svdprune_jax.models.layers import RMSNorm
from svdprune_jax.models.cache import KVCache
from svdprune_jax.models.llama import FastV, LlamaConfig, apply_rope, rope
from svdprune_jax.models.llava import positions


@pytest.fixture(scope="module")
def tiny_pair():
    hf = tiny(num_key_value_heads=2, text_layers=3)
    model, _, _ = from_hf(hf)
    lm = model.language_model
    return hf, lm, *nnx.split(lm)


def test_config_from_hf_rope_layouts():
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8)
    v5 = LlamaConfig.from_hf(base | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    old = LlamaConfig.from_hf(base | {"rope_theta": 5e5, "rope_scaling": None})
    assert v5 == old and v5.rope_theta == 5e5 and v5.head_dim == 8 and v5.num_key_value_heads == 8
    assert LlamaConfig.from_hf({}).hidden_size == 4096  # transformers' defaults fill omitted keys
    with pytest.raises(ValueError, match="rope type 'llama3'"):
        LlamaConfig.from_hf(base | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.from_hf(base | {"num_key_value_heads": 3})


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_float64(theta):
    pos = np.array([[0, 1, 7, 300], [0, 0, 2, 4095]])
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 16))
    inv = 1.0 / theta ** (np.arange(0, 16, 2) / 16)
    ang = pos[..., None] * inv
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2 = x[..., :8], x[..., 8:]
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    got = apply_rope(jnp.asarray(x, jnp.float32), *rope(jnp.asarray(pos), 16, theta))
    # float32 angles at position 4095 carry ~4095 * 2^-24 absolute error
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_rmsnorm_matches_float64():
    x = np.random.default_rng(1).standard_normal((3, 5, 16)) * 7
    norm = RMSNorm(16, 1e-6, param_dtype=jnp.float32)
    norm.scale[...] = jnp.linspace(0.5, 1.5, 16)
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 1.5, 16)
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), want, rtol=1e-5, atol=1e-5)


def _inputs(lm, lengths, n_image=0, seed=0):
    ids, mask = prompts(IMAGE_TOKEN_ID, lengths, n_image, seed)
    return ids, jnp.asarray(mask, bool), lm.embed_tokens(jnp.asarray(ids))


@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def _decode(graphdef, state, x, pos, cache):
    return nnx.merge(graphdef, state).decode(x, pos, cache)


@functools.partial(jax.jit, static_argnums=0, static_argnames="fastv", donate_argnames="cache")
def _prefill(graphdef, state, x, pos, valid, cache, image_positions=None, fastv=None):
    return nnx.merge(graphdef, state)(x, pos, valid, cache=cache, fastv=fastv, image_positions=image_positions)


def test_prefill_then_decode_equals_full_forward(tiny_pair):
    """Left-padded batch: prefill T tokens, decode 3 more one by one (jitted, cache donated) == one pass over T+3."""
    _, lm, graphdef, state = tiny_pair
    ids, valid, x = _inputs(lm, (14, 9))
    T = ids.shape[1] - 3
    pos = positions(valid)
    full, none_cache, kept = lm(x, pos, valid)
    assert none_cache is None and kept is None
    cache = KVCache.init(lm.config, 2, (T + 3,))
    h, cache, _ = _prefill(graphdef, state, x[:, :T], pos[:, :T], valid[:, :T], cache)
    ok = np.asarray(valid[:, :T])  # padding queries see no key: their output is meaningless
    np.testing.assert_allclose(np.asarray(h)[ok], np.asarray(full[:, :T])[ok], atol=1e-5)
    for t in range(T, T + 3):
        k_before = cache.segments[0].k
        h, cache = _decode(graphdef, state, x[:, t:t + 1], pos[:, t:t + 1], cache)
        assert k_before.is_deleted()  # donated
        np.testing.assert_allclose(h[:, 0], full[:, t], atol=1e-5)
    seg, = cache.segments
    assert seg.k.shape == (3, 2, 2, T + 3, 8) and int(seg.index) == T + 3
    np.testing.assert_array_equal(seg.mask, valid)


@pytest.mark.parametrize("K,keep", [(1, 3), (2, 5)])
def test_fastv_matches_transformers_layers(tiny_pair, K, keep):
    hf, lm, graphdef, state = tiny_pair
    n = 9
    ids, valid, x = _inputs(lm, (20, 16), n_image=n, seed=K)
    pos = positions(valid)
    image_cols = np.stack([np.flatnonzero(r == IMAGE_TOKEN_ID) for r in ids])
    with torch.no_grad():
        want_h, want_kept = hf_fastv(hf, x, valid, pos, image_cols, K, keep)
    T = ids.shape[1]
    cache = KVCache.init(lm.config, 2, (T + 2, T - n + keep + 2), FastV(keep, K))
    h, cache, kept = _prefill(graphdef, state, x, pos, valid, cache, jnp.asarray(image_cols), fastv=FastV(keep, K))
    np.testing.assert_array_equal(kept, want_kept)
    ok = np.take_along_axis(np.asarray(valid), want_kept, 1)
    np.testing.assert_allclose(np.asarray(h)[ok], want_h[ok], atol=1e-5)
    # the cache holds the full prompt below K and only the kept columns from K on
    assert [s.layers for s in cache.segments] == [K, 3 - K]
    assert [int(s.index) for s in cache.segments] == [T, T - n + keep]
    # one decode step through both segments == the hand-driven reference on the prompt + that token
    x_new, pos_new = lm.embed_tokens(jnp.array([[5], [6]])), pos[:, -1:] + 1
    h_new, cache = _decode(graphdef, state, x_new, pos_new, cache)
    with torch.no_grad():
        ext_h, ext_kept = hf_fastv(hf, jnp.concatenate([x, x_new], 1), jnp.pad(valid, ((0, 0), (0, 1)), constant_values=True),
                                    jnp.concatenate([pos, pos_new], 1), image_cols, K, keep, query=T - 1)
    np.testing.assert_array_equal(ext_kept[:, :-1], want_kept)
    np.testing.assert_allclose(h_new[:, 0], ext_h[:, -1], atol=1e-5)


def test_bad_input(tiny_pair):
    _, lm, graphdef, state = tiny_pair
    ids, valid, x = _inputs(lm, (12, 12), n_image=4)
    pos = positions(valid)
    with pytest.raises(ValueError, match="exceeds the cache"):
        lm(x, pos, valid, cache=KVCache.init(lm.config, 2, (11,)))
    with pytest.raises(ValueError, match="FastV layer 3 outside"):
        lm(x, pos, valid, fastv=FastV(2, 3), image_positions=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="FastV keep 5 outside"):
        lm(x, pos, valid, fastv=FastV(5, 1), image_positions=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="cache has 1 segments; expected 2"):
        lm(x, pos, valid, cache=KVCache.init(lm.config, 2, (20,)), fastv=FastV(2, 1),
           image_positions=jnp.zeros((2, 4), jnp.int32))
