"""Sharding over a `data` x `model` device mesh: the one table from logical axis names to mesh axes.

Parameters carry logical axis names as NNX metadata (`axes(...)`, set where each layer is built; stacked layers
add "layers" in front); activations get them through `constrain`. `RULES` maps names to mesh axes:
  data parallel     "batch" (images, prompts, KV-cache rows) on `data`
  tensor parallel   attention heads, key/value heads, MLP width and vocabulary on `model`, Megatron's layout:
                    the first matmul of a block splits its output columns, the second its input rows, so each
                    attention and MLP block ends in one all-reduce over `model`
Everything else is replicated. XLA's SPMD partitioner does the rest. Without a mesh in context (`jax.set_mesh`)
`constrain` is a no-op, so the single-device path compiles exactly as before.
"""
import contextlib
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


DATA, MODEL = "data", "model"  # the mesh axes: images of a batch, and heads / MLP columns
RULES = (
    ("batch", DATA),
    ("heads", MODEL),
    ("kv_heads", MODEL),
    ("mlp", MODEL),
    ("vocab", MODEL),
    ("embed", None),
    ("layers", None),
)
LAYERS = "layers"  # the leading axis `models.stack.stacked` adds to every param of a stack


def axes(*names: str | None) -> dict:
    """Param metadata naming each dimension's logical axis. Not placed at creation (`eager_sharding` off): a
    model is built without a mesh, or abstractly, and `param_shardings` places it."""
    return dict(out_sharding=names, eager_sharding=False)


def logical_spec(names: Sequence[str | None]) -> PartitionSpec:
    return PartitionSpec(*spmd.from_sharding_rules(tuple(names), RULES))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """`x` laid out by logical axis names when a mesh is in context (`jax.set_mesh`); else `x` untouched."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names))


def parse_mesh(spec: str) -> tuple[int, int]:
    """(data, model) from "data=D,model=M"."""
    m = re.fullmatch(r"\s*data\s*=\s*(\d+)\s*,\s*model\s*=\s*(\d+)\s*", spec)
    if m is None or min(int(m[1]), int(m[2])) < 1:
        raise ValueError(f"mesh {spec!r}: expected data=D,model=M with positive integers, e.g. data=4,model=2")
    return int(m[1]), int(m[2])


def mesh_option(spec: str | None) -> Mesh | None:
    """The mesh a "data=D,model=M" command-line option asks for; None (one device, no mesh) without one."""
    return None if spec is None else make_mesh(*parse_mesh(spec))


def make_mesh(data: int, model: int) -> Mesh:
    """A data x model mesh over every device of every process (Auto axes: GSPMD propagation, not
    sharding-in-types)."""
    n = jax.device_count()
    if data * model != n:
        raise ValueError(f"mesh data={data},model={model} needs {data * model} devices; {n} are visible "
                         f"(jax.device_count()); the product must equal the device count")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def check_model_axis(config, model: int) -> None:
    """The `model` axis must split every tensor-parallel dimension of a LlavaConfig whole (heads, not parts of
    heads)."""
    v, t = config.vision, config.text
    sizes = {"vision attention heads": v.num_attention_heads, "vision MLP width": v.intermediate_size,
             "text attention heads": t.num_attention_heads, "text key/value heads": t.num_key_value_heads,
             "text MLP width": t.intermediate_size, "projector width (text hidden size)": t.hidden_size,
             "vocabulary": t.vocab_size}
    bad = [f"{name} {n}" for name, n in sizes.items() if n % model]
    if bad:
        raise ValueError(f"model axis of {model} does not divide the model's {', '.join(bad)}")


def check_batch(batch: int, mesh: Mesh) -> None:
    data = mesh.shape[DATA]
    if batch % data:
        raise ValueError(f"batch of {batch} does not split over data={data}: use a multiple of {data} "
                         "(nothing is padded silently)")


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding of every param in `state` (concrete or abstract), from its logical names via `RULES`."""
    with nnx.logical_axis_rules(RULES):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs)


def put(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array laid out on the mesh; each process hands over only the slices its devices hold
    (every process passes the same global array)."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def put_batch(mesh: Mesh | None, *arrays) -> tuple:
    """Arrays (or pytrees of them, e.g. `models.anyres.AnyresImages`) with a leading batch axis on the devices:
    without a mesh as `jnp.asarray` puts them; on a mesh split over `data` (checked, never padded). None stays
    None."""
    if mesh is None:
        return tuple(jax.tree.map(jnp.asarray, a) for a in arrays)
    for a in jax.tree.leaves(arrays):
        check_batch(np.shape(a)[0], mesh)
    batch = NamedSharding(mesh, logical_spec(("batch",)))
    return tuple(jax.tree.map(lambda x: put(x, batch), a) for a in arrays)


def use(mesh: Mesh | None):
    """Context in which jitted code traces and runs on `mesh` (`constrain` active); nothing without one."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, gathered from the other processes when it spans several."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
