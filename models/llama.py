"""LLaMA decoder (transformers' `LlamaModel`), Flax NNX, with a static-shape KV cache and a FastV hook.

Layers are stacked on a leading axis and run by `models.stack.run`: a fori_loop taking layer i's weights by
a dynamic index (segments never slice the stack up front), or, after `models.stack.per_layer`, an unrolled
loop over one weight buffer per layer, the fast layout for decode (XLA:CPU copies dynamically indexed slices).

KV cache: `models.cache.KVCache`, one segment per run of layers that share a sequence layout (two with
FastV). `decode` donates nothing itself: jit it with `donate_argnames="cache"`.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

import svdprune_jax
from svdprune_jax.models import stack
from svdprune_jax.models.cache import KVCache, Segment, segments
from svdprune_jax.models.layers import RMSNorm, activation, linear
from svdprune_jax.models.sharding import DATA, axes

# transformers' LlamaConfig defaults: hub config.json files (e.g. llava-hf's text_config) omit keys left at these.
_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu")
# Decoder families that are this network: Mistral is LLaMA's blocks with a sliding attention window, exact here
# while a sequence fits in the window (`LlamaConfig.context`). Each family's MistralConfig-style defaults.
FAMILIES = {"llama": dict(_HF_DEFAULTS, num_key_value_heads=None, sliding_window=None),
            "mistral": dict(_HF_DEFAULTS, intermediate_size=14336, max_position_embeddings=4096 * 32,
                            num_key_value_heads=8, sliding_window=4096)}


def _rope_theta(d: dict) -> float:
    """rope_theta from transformers 5 `rope_parameters` or the older top-level key; other rope types refused."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported (only 'default')")
    return float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"  # a key of FAMILIES
    sliding_window: int | None = None  # Mistral's attention window (None: the whole sequence)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"text model_type {self.model_type!r} is not supported (only {', '.join(FAMILIES)})")
        if self.model_type == "llama" and self.sliding_window is not None:
            raise ValueError("a llama decoder has no sliding_window")
        activation(self.hidden_act)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def context(self) -> int:
        """Positions a prompt and its new tokens may fill: the model's, or Mistral's window when smaller (the
        decoder attends to the whole sequence, which is the window's result only up to its length)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """From a transformers LlamaConfig or MistralConfig dict (`to_dict()` or a config.json `text_config`)."""
        family = d.get("model_type", "llama")
        if family not in FAMILIES:
            raise ValueError(f"text model_type {family!r} is not supported (only {', '.join(FAMILIES)})")
        kw = {k: d.get(k, v) for k, v in FAMILIES[family].items()}
        if family == "llama":
            kw["sliding_window"] = None  # transformers' LlamaConfig has no window
        heads = kw["num_attention_heads"]
        kw["num_key_value_heads"] = kw["num_key_value_heads"] or heads
        return cls(**kw, model_type=family, head_dim=d.get("head_dim") or kw["hidden_size"] // heads,
                   rope_theta=_rope_theta(d))


@dataclasses.dataclass(frozen=True)
class FastV:
    """FastV (Chen et al. 2024): after layer `layer - 1`, keep the `keep` image tokens that the last prompt
    token attends to most (head-averaged); layers from `layer` on see only those (plus all text tokens).
    FastV's own setting: `FastV(svdprune_jax.fastv_keep_count(n))` (K = 2, R = 50%)."""
    keep: int
    layer: int = svdprune_jax.FASTV_LAYER

    def check(self, cfg: LlamaConfig, num_image_tokens: int):
        if not 1 <= self.layer < cfg.num_hidden_layers:
            raise ValueError(f"FastV layer {self.layer} outside [1, {cfg.num_hidden_layers})")
        if not 1 <= self.keep <= num_image_tokens:
            raise ValueError(f"FastV keep {self.keep} outside [1, {num_image_tokens}] (image tokens in the prompt)")


def rope(positions: Int[Array, "B T"], head_dim: int, theta: float) -> tuple[Float[Array, "B T d"], Float[Array, "B T d"]]:
    """cos, sin in float32, transformers' layout (frequencies repeated on both halves)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "B T H d"], cos: Float[Array, "B T d"], sin: Float[Array, "B T d"]) -> Float[Array, "B T H d"]:
    """Split-half rotation in float32 whatever the dtype of x (bf16 cos/sin are off by 1e-2 past ~100 positions)."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def attend(q: Float[Array, "B Tq H d"], k: Float[Array, "B G Tk d"], v: Float[Array, "B G Tk d"],
           mask: Bool[Array, "B Tq Tk"]) -> tuple[Float[Array, "B Tq H d"], Float[Array, "B G Tq r Tk"]]:
    """Grouped-query softmax attention with float32 logits and softmax; also returns the weights.

    Query head h = g * r + j reads kv head g (transformers' repeat_kv). The r queries of a kv head and the
    Tq positions form one GEMM row axis: plain (B, G) batched matmuls, no size-1 dims for XLA to trip on."""
    B, Tq, H, d = q.shape
    G, Tk = k.shape[1], k.shape[2]
    rows = lambda a: a.reshape(B, Tq, G, H // G, d).transpose(0, 2, 1, 3, 4).reshape(B, G, -1, d)
    q = rows(q * jnp.asarray(d ** -0.5, q.dtype))
    logits = jnp.einsum("bgnd,bgkd->bgnk", q, k, preferred_element_type=jnp.float32).reshape(B, G, Tq, -1, Tk)
    probs = jax.nn.softmax(jnp.where(mask[:, None, :, None], logits, jnp.finfo(jnp.float32).min), axis=-1)
    out = jnp.einsum("bgnk,bgkd->bgnd", probs.reshape(B, G, -1, Tk).astype(v.dtype), v)
    return out.reshape(B, G, Tq, -1, d).transpose(0, 2, 1, 3, 4).reshape(B, Tq, H, d), probs


def causal_mask(valid: Bool[Array, "B T"]) -> Bool[Array, "B T T"]:
    """Query t sees keys s <= t that are real tokens (left padding masked)."""
    T = valid.shape[1]
    return jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = functools.partial(linear, use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        D, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = lin(D, cfg.num_attention_heads * hd, ("embed", "heads"))
        self.k_proj = lin(D, cfg.num_key_value_heads * hd, ("embed", "kv_heads"))
        self.v_proj = lin(D, cfg.num_key_value_heads * hd, ("embed", "kv_heads"))
        self.o_proj = lin(cfg.num_attention_heads * hd, D, ("heads", "embed"))
        self.head_dim = hd

    def qkv(self, x: Float[Array, "B T D"], cos, sin):
        """Rotated queries (B, T, H, hd); rotated keys and values in the cache layout (B, Hkv, T, hd)."""
        split = lambda y: y.reshape(*y.shape[:-1], -1, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin).swapaxes(1, 2), v.swapaxes(1, 2)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = functools.partial(linear, use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = lin(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.up_proj = lin(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))
        self.down_proj = lin(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.down_proj(activation(self.hidden_act)(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block, split around the attention core so the caller decides where keys and values come from."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def qkv(self, x, cos, sin):
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def finish(self, x: Float[Array, "B T D"], attn: Float[Array, "B T H d"]) -> Float[Array, "B T D"]:
        x = x + self.self_attn.o_proj(attn.reshape(*attn.shape[:2], -1)).astype(x.dtype)
        return x + self.mlp(self.post_attention_layernorm(x)).astype(x.dtype)


class Llama(nnx.Module):
    """Embeddings, stacked decoder layers and the final norm (the LM head belongs to the caller)."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = cfg, dtype
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_metadata=axes("vocab", "embed"), rngs=rngs)

        self.layers = stack.stacked(lambda r: LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                                    cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def unembed(self, h: Float[Array, "... D"], lm_head: nnx.Linear | None) -> Float[Array, "... V"]:
        """float32 logits through `lm_head`, or the transposed token embedding when tied (lm_head None)."""
        return (self.embed_tokens.attend(h) if lm_head is None else lm_head(h)).astype(jnp.float32)

    def _run(self, start: int, stop: int, x, cos, sin, mask, kv, place, score: bool = False):
        """Layers [start, stop). `place(kv, j, k, v) -> (kv, keys, values)` decides where attention reads
        keys/values from (j: layer within the segment). Returns (x, kv, FastV score (B, Tk) of the last
        layer: its last query's head-averaged attention; None unless `score`)."""
        def body(i, lyr, c):
            x, kv, _ = c
            q, k, v = lyr.qkv(x, cos, sin)
            kv, keys, values = place(kv, i - start, k, v)
            out, probs = attend(q, keys, values, mask)
            return lyr.finish(x, out), kv, probs[:, :, -1].mean(axis=(1, 2)) if score else None

        init = jnp.zeros((x.shape[0], mask.shape[-1]), jnp.float32) if score else None
        return stack.run(self.layers, start, stop, body, (x, kv, init))

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], valid: Bool[Array, "B T"], *,
                 cache: KVCache | None = None, fastv: FastV | None = None,
                 image_positions: Int[Array, "B n"] | None = None):
        """Full-sequence pass over a left-padded batch (`valid` False on padding); with `cache` it is the
        prefill and fills each segment from slot 0.

        image_positions (B, n): each row's image-token columns, ascending; a row with fewer than n (LLaVA-NeXT's
        images differ in token count) fills the rest with T and must start with that many padding columns.

        Returns (hidden (B, T', D) after the final norm, cache or None, kept): with FastV, kept (B, T') are the
        prompt columns that reach the last layers (T' = T - n + fastv.keep); without, kept is None and T' = T.
        """
        cfg, T = self.config, x.shape[1]
        if fastv is not None:
            if image_positions is None:
                raise ValueError("FastV needs image_positions")
            fastv.check(cfg, image_positions.shape[1])
        segs = segments(cfg, fastv)
        if cache is not None:
            if len(cache.segments) != len(segs):
                raise ValueError(f"cache has {len(cache.segments)} segments; expected {len(segs)}")
            lengths = (T,) if fastv is None else (T, T - image_positions.shape[1] + fastv.keep)
            for n, seg in zip(lengths, cache.segments):
                if n > seg.slots:
                    raise ValueError(f"prompt of {n} tokens exceeds the cache ({seg.slots} slots)")
        x = x.astype(self.dtype)
        new_cache, kept = [], None
        for s, (start, stop) in enumerate(segs):
            if s == 1:  # FastV: gather the kept columns; they keep their original positions
                keep_img = svdprune_jax.fastv_select(score, image_positions, fastv.keep, DATA,
                                                     mask=image_positions < T)
                kept = _kept_columns(image_positions, keep_img, T)
                take = lambda a: jnp.take_along_axis(a, kept.reshape(kept.shape + (1,) * (a.ndim - 2)), axis=1)
                x, positions, valid = take(x), take(positions), take(valid)
            cos, sin = rope(positions, cfg.head_dim, cfg.rope_theta)
            kv = None if cache is None else (cache.segments[s].k, cache.segments[s].v)
            x, kv, score = self._run(start, stop, x, cos, sin, causal_mask(valid), kv, _place_fresh,
                                     score=fastv is not None and s == 0)
            if cache is not None:
                n = valid.shape[1]
                mask = jnp.zeros_like(cache.segments[s].mask).at[:, :n].set(valid)
                new_cache.append(Segment(*kv, mask, jnp.int32(n)))
        return self.norm(x), (KVCache(tuple(new_cache)) if cache is not None else None), kept

    def decode(self, x: Float[Array, "B 1 D"], positions: Int[Array, "B 1"], cache: KVCache):
        """One new token per row: write its keys/values at each segment's `index` and attend to the segment.
        The caller keeps `index` below the cache length (slots past it would be clamped by XLA)."""
        cfg = self.config
        if sum(seg.layers for seg in cache.segments) != cfg.num_hidden_layers:
            raise ValueError(f"cache segments cover {[seg.layers for seg in cache.segments]} layers; "
                             f"the model has {cfg.num_hidden_layers}")
        cos, sin = rope(positions, cfg.head_dim, cfg.rope_theta)
        x, new_cache, start = x.astype(self.dtype), [], 0
        for seg in cache.segments:
            stop = start + seg.layers
            mask = seg.mask.at[:, seg.index].set(True)
            x, (k, v), _ = self._run(start, stop, x, cos, sin, mask[:, None, :], (seg.k, seg.v),
                                     functools.partial(_place_cached, seg.index))
            new_cache.append(Segment(k, v, mask, seg.index + 1))
            start = stop
        return self.norm(x), KVCache(tuple(new_cache))


def _kept_columns(image_positions: Int[Array, "B n"], keep_img: Int[Array, "B r"], T: int) -> Int[Array, "B Tk"]:
    """Sorted prompt columns kept by FastV, T - n + r in every row: all but the dropped image tokens, and in a row
    with n_b < n image tokens (positions past them are T) also its first n - n_b columns, left padding (the
    caller pads so): every row then drops n - r columns, and the layers after K have one static length."""
    B, n = image_positions.shape
    rows = jnp.arange(B)[:, None]
    is_img = jnp.zeros((B, T), bool).at[rows, image_positions].set(True, mode="drop")  # T: no image token
    kept = jnp.zeros((B, T), bool).at[rows, keep_img].set(True)
    short = n - is_img.sum(axis=1, keepdims=True)
    drop = (is_img & ~kept) | (jnp.arange(T) < short)
    return jnp.argsort(drop, axis=1, stable=True)[:, : T - n + keep_img.shape[1]].astype(jnp.int32)


def _write(kv, at, k, v):
    return tuple(jax.lax.dynamic_update_slice(c, a[None].astype(c.dtype), at) for c, a in zip(kv, (k, v)))


def _place_fresh(kv, j, k, v):
    """Prefill: attend to the fresh keys/values; with a cache also write them at slots [0, T)."""
    return (None if kv is None else _write(kv, (j, 0, 0, 0, 0), k, v)), k, v


def _place_cached(index, kv, j, k, v):
    """Decode: write the new keys/values at slot `index`, attend to the layer's whole cache."""
    kv = _write(kv, (j, 0, 0, index, 0), k, v)
    return (kv, *(jax.lax.dynamic_index_in_dim(c, j, keepdims=False) for c in kv))
