"""CLIP vision tower (transformers' `CLIPVisionModel` up to the selected hidden states), Flax NNX.

Encoder layers are stacked along a leading axis and run by `models.stack.run` (a fori_loop, or an unrolled
loop after `models.stack.per_layer`). Only layers up to
the deepest requested hidden state run; `post_layernorm` is not part of the tower (LLaVA never
uses it).
"""
import dataclasses
import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from svdprune_jax.models import stack
from svdprune_jax.models.layers import activation, linear
from svdprune_jax.models.sharding import axes

# transformers' CLIPVisionConfig defaults: llava-hf config.json files omit keys left at these.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict) -> "CLIPVisionConfig":
        """From a transformers CLIPVisionConfig dict (`to_dict()` or a config.json `vision_config`)."""
        if d.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"vision model_type {d['model_type']!r} is not supported (only clip_vision_model)")
        return cls(**{k: d.get(k, v) for k, v in _HF_DEFAULTS.items()})


# LLaVA-1.5's tower (openai/clip-vit-large-patch14-336).
CLIP_VIT_L_14_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=336, patch_size=14)


def feature_layers(vision_feature_layer: int | Sequence[int], num_hidden_layers: int) -> tuple[int, tuple[int, ...]]:
    """Resolve LLaVA's `vision_feature_layer` against hidden_states (length L+1: embeddings, then each layer).

    Returns (layers needed, non-negative hidden_states indices in request order); index h needs h layers.
    """
    layers = vision_feature_layer if isinstance(vision_feature_layer, Sequence) else (vision_feature_layer,)
    n = num_hidden_layers + 1
    if not layers or not all(isinstance(l, numbers.Integral) and -n <= l < n for l in layers):
        raise ValueError(f"vision_feature_layer {vision_feature_layer!r} must be an int or non-empty ints in [{-n}, {n})")
    idx = tuple(int(l) % n for l in layers)
    return max(idx), idx


def _layer_norm(cfg: CLIPVisionConfig, param_dtype, rngs) -> nnx.LayerNorm:
    # float32 statistics and output whatever the compute dtype; two-pass variance (CLIP has large outlier channels).
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                         use_fast_variance=False, scale_metadata=axes("embed"), bias_metadata=axes("embed"), rngs=rngs)


def attention(q: Float[Array, "B T H d"], k: Float[Array, "B T H d"], v: Float[Array, "B T H d"]
              ) -> tuple[Float[Array, "B T H d"], Float[Array, "B H T T"]]:
    """softmax(q k^T / sqrt(d)) v with float32 logits and softmax; also returns the float32 weights.

    Heads moved ahead of tokens first, so both products are batched matmuls with leading batch dims: XLA:CPU
    runs einsums with the batch dims in the middle ("bqhd,bkhd->bhqk") ~2x slower (benchmarks/run.py
    "attention"); jax.nn.dot_product_attention was slower still."""
    q, k, v = (a.swapaxes(1, 2) for a in (q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k, v))
    logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.matmul(probs.astype(v.dtype), v).swapaxes(1, 2), probs


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        proj = functools.partial(linear, cfg.hidden_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = (proj(("embed", "heads")) for _ in range(3))
        self.out_proj = proj(("heads", "embed"))
        self.heads = cfg.num_attention_heads

    def __call__(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"], Float[Array, "B H T T"]]:
        split = lambda y: y.reshape(*y.shape[:-1], self.heads, -1)
        out, probs = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.reshape(x.shape[:-1] + (-1,))), probs


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.fc2(activation(self.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block; the residual stream stays in the compute dtype (as transformers does in bf16)."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg, param_dtype, rngs)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, param_dtype, rngs)
        self.mlp = CLIPMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"], Float[Array, "B H T T"]]:
        h, probs = self.self_attn(self.layer_norm1(x))
        x = x + h.astype(x.dtype)
        return x + self.mlp(self.layer_norm2(x)).astype(x.dtype), probs


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                                        dtype=dtype, param_dtype=param_dtype,
                                        kernel_metadata=axes(None, None, None, "embed"), rngs=rngs)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype), **axes("embed"))
        self.position_embedding = nnx.Embed(1 + cfg.num_patches, d, dtype=dtype, param_dtype=param_dtype,
                                            embedding_metadata=axes(None, "embed"), rngs=rngs)
        self.dtype = dtype

    def __call__(self, pixel_values: Float[Array, "B C H W"]) -> Float[Array, "B T D"]:
        patches = self.patch_embedding(pixel_values.transpose(0, 2, 3, 1))  # NHWC -> (B, gh, gw, D)
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])  # row-major grid, as HF's flatten(2)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (patches.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...].astype(self.dtype)


class CLIPVisionTower(nnx.Module):
    """CLIP ViT holding its first `num_layers` encoder layers (default: all), stacked on a leading axis.

    `tower(pixel_values, vision_feature_layer)` returns the requested hidden states (B, 1+N, Dv), concatenated
    on the last axis for a tuple of layers (transformers LLaVA's order); with `return_attention=True` also
    the float32 attention weights (B, heads, 1+N, 1+N) of the deepest requested layer.
    """

    def __init__(self, config: CLIPVisionConfig, num_layers: int | None = None, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"num_layers {num_layers} outside [0, {config.num_hidden_layers}]")
        self.config, self.num_layers, self.dtype = config, num_layers, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPVisionEmbeddings(config, **kw, rngs=rngs)
        self.pre_layrnorm = _layer_norm(config, param_dtype, rngs)

        self.layers = stack.stacked(lambda r: CLIPEncoderLayer(config, **kw, rngs=r), num_layers, rngs)

    def __call__(self, pixel_values: Float[Array, "B C H W"], vision_feature_layer: int | Sequence[int], *,
                 return_attention: bool = False):
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values shape {tuple(pixel_values.shape)} does not match (B, {', '.join(map(str, want))})")
        if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
            raise ValueError(f"pixel_values dtype {pixel_values.dtype} is not floating point")
        depth, idx = feature_layers(vision_feature_layer, cfg.num_hidden_layers)
        if depth > self.num_layers:
            raise ValueError(f"vision_feature_layer {vision_feature_layer!r} needs {depth} layers; tower holds {self.num_layers}")
        if return_attention and depth == 0:
            raise ValueError("attention weights requested for hidden_states[0] (the embeddings), which has no attention")

        run = lambda x, start, stop: stack.run(self.layers, start, stop, lambda i, layer, x: layer(x)[0], x)

        x = self.pre_layrnorm(self.embeddings(pixel_values.astype(self.dtype))).astype(self.dtype)
        hidden, start = {0: x}, 0
        for stop in sorted(set(idx) - {0}):  # one loop per segment between requested layers
            if return_attention and stop == depth:  # deepest layer outside the loop, keeping its weights
                x, probs = stack.layer(self.layers, stop - 1)(run(x, start, stop - 1))
            else:
                x = run(x, start, stop)
            hidden[stop], start = x, stop
        feats = hidden[idx[0]] if len(idx) == 1 else jnp.concatenate([hidden[h] for h in idx], axis=-1)
        return (feats, probs) if return_attention else feats
