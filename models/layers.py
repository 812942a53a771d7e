"""Layers the CLIP tower, the LLaMA decoder and the LLaVA projector share: linear maps with logical axis
names, transformers' activations by name, RMSNorm."""
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from svdprune_jax.models.sharding import axes

# transformers' ACT2FN names -> jax. HF "gelu" is the exact erf form (jax.nn.gelu defaults to tanh).
_tanh_gelu = functools.partial(jax.nn.gelu, approximate=True)
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "gelu_accurate": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_python_tanh": _tanh_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The jax function for a transformers activation name; ValueError for names not ported."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def linear(d_in: int, d_out: int, names: tuple[str, str], **kw) -> nnx.Linear:
    """nnx.Linear with logical axis names on its kernel (in, out) and bias (out)."""
    return nnx.Linear(d_in, d_out, kernel_metadata=axes(*names), bias_metadata=axes(names[1]), **kw)


class RMSNorm(nnx.Module):
    """Statistics and scale in float32, output in the input dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **axes("embed"))
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...].astype(jnp.float32) * y).astype(x.dtype)
