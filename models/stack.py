"""Layers stacked on a leading axis (the param-tree contract), and the per-layer layout used for inference.

`stacked(make, n, rngs)` builds n layers as one module whose params carry a leading layer axis; `run` loops
a body over them with `lax.fori_loop`, taking layer i's weights by a dynamic index, so the compiled graph
holds one layer body whatever the depth. XLA:CPU copies each dynamically indexed slice before the matmuls
that read it, which for decode GEMVs is most of the step (benchmarks/run.py, "layout"): `unstack` moves
the params into one buffer per layer (an `nnx.List`), for which `run` unrolls the loop (static indices,
no copies; compile time grows with depth). `per_layer(model)` does that for every stack of a model in place:
the inference layout; the stacked one stays the storage and training format.
"""
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from flax import nnx

from svdprune_jax.models import sharding

M = TypeVar("M", bound=nnx.Module)


def stacked(make: Callable[[nnx.Rngs], M], n: int, rngs: nnx.Rngs) -> M:
    """n layers from `make(rngs)` as one module with a leading layer axis on every param (logical name "layers")."""
    return nnx.split_rngs(splits=n)(nnx.vmap(make, in_axes=0, out_axes=0,
                                             transform_metadata={nnx.PARTITION_NAME: sharding.LAYERS}))(rngs)


def run(layers: nnx.Module | nnx.List, start: int, stop: int, body: Callable[[int, nnx.Module, Any], Any], carry):
    """carry = body(i, layer i, carry) for i in [start, stop): a fori_loop over stacked layers (i traced),
    an unrolled loop over per-layer ones (i a Python int)."""
    if isinstance(layers, nnx.List):
        for i in range(start, stop):
            carry = body(i, layers[i], carry)
        return carry
    return jax.lax.fori_loop(start, stop, lambda i, c: body(i, layer(layers, i), c), carry)


def layer(layers: nnx.Module | nnx.List, i) -> nnx.Module:
    """Layer i (a Python int, or traced for stacked layers) as a module."""
    if isinstance(layers, nnx.List):
        return layers[i]
    graphdef, state = nnx.split(layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state))


def unstack(layers: nnx.Module) -> nnx.List:
    """Stacked layers -> an nnx.List of per-layer modules, one buffer per param and layer (leaf by leaf,
    each stacked buffer deleted once sliced, so the peak is the model plus one stacked param)."""
    graphdef, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]
    flat = nnx.to_flat_state(state)
    per = [[] for _ in range(n)]
    for path, var in flat:
        stacked_value = var.get_value()
        slices = [stacked_value[i] for i in range(n)]
        for i in range(n):
            per[i].append((path, _layer_variable(var, slices[i])))
        if not isinstance(stacked_value, jax.core.Tracer):  # tracers under nnx.eval_shape own no buffer
            jax.block_until_ready(slices)
            stacked_value.delete()
    return nnx.List([nnx.merge(graphdef, nnx.from_flat_state(p)) for p in per])


def _layer_variable(stacked: nnx.Variable, value) -> nnx.Variable:
    """One layer's slice of a stacked variable, its logical axis names without the leading "layers"."""
    return nnx.spmd.remove_axis(stacked.replace(value), 0, {nnx.PARTITION_NAME: sharding.LAYERS})


def per_layer(model: M) -> M:
    """Every stacked submodule of `model` (the vision tower's and the decoder's `layers`) unstacked in place;
    returns `model`. Idempotent."""
    for _, module in list(nnx.iter_modules(model)):
        if hasattr(module, "layers") and not isinstance(module.layers, nnx.List):
            module.layers = unstack(module.layers)
    return model
