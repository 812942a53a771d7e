"""The static-shape KV cache of the LLaMA decoder, a pytree of typed segments.

One segment per run of consecutive layers that share a sequence layout: one segment; two with FastV (layers
[0, K) hold the full prompt, layers [K, L) only the kept tokens). S (slots) is static; every row writes at
the same slot (prompts are left-padded).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from svdprune_jax.models.sharding import constrain

if TYPE_CHECKING:
    from svdprune_jax.models.llama import FastV, LlamaConfig


def segments(cfg: LlamaConfig, fastv: FastV | None) -> tuple[tuple[int, int], ...]:
    """Layer ranges [start, stop) that share one sequence layout (and one cache segment)."""
    L = cfg.num_hidden_layers
    return ((0, L),) if fastv is None else ((0, fastv.layer), (fastv.layer, L))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Segment:
    """Keys and values of `layers` consecutive layers. Heads come before slots: XLA:CPU then runs the
    one-query decode attention as plain per-head GEMVs."""
    k: Float[Array, "layers B Hkv S hd"]  # in the activation dtype
    v: Float[Array, "layers B Hkv S hd"]
    mask: Bool[Array, "B S"]  # slots that hold a real token (left padding and unwritten slots are False)
    index: Int[Array, ""]  # the next slot to write

    @property
    def layers(self) -> int:
        return self.k.shape[0]

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    @classmethod
    def init(cls, layers: int, batch: int, kv_heads: int, slots: int, head_dim: int, dtype) -> Segment:
        # rows split like the batch, heads like the k/v projections that fill them: writes stay on their device
        kv = lambda: constrain(jnp.zeros((layers, batch, kv_heads, slots, head_dim), dtype),
                               "layers", "batch", "kv_heads", None, None)
        return cls(kv(), kv(), constrain(jnp.zeros((batch, slots), bool), "batch", None), jnp.int32(0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    segments: tuple[Segment, ...]

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, lengths: tuple[int, ...], fastv: FastV | None = None,
             dtype=jnp.float32) -> KVCache:
        """An empty cache; `lengths[s]` slots for segment s (prompt tokens that reach it + new tokens)."""
        ranges = segments(cfg, fastv)
        if len(lengths) != len(ranges):
            raise ValueError(f"{len(lengths)} cache lengths for {len(ranges)} segments")
        return cls(tuple(Segment.init(stop - start, batch, cfg.num_key_value_heads, n, cfg.head_dim, dtype)
                         for (start, stop), n in zip(ranges, lengths)))
