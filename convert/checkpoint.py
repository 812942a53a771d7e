"""Model directories, HF (safetensors) and ours (Orbax), converted both ways and loaded as a Llava model.

Our directory:
    config.json            transformers-format LLaVA config (LlavaConfig.from_hf reads it; export writes it back)
    params/                Orbax PyTree checkpoint of `nnx.to_pure_dict(nnx.state(Llava, nnx.Param))`
    hf_unused.safetensors  HF tensors LLaVA never reads (post_layernorm, vision layers past the deepest
                           vision_feature_layer), kept so that export gives back every tensor of the source
    tokenizer, image processor and generation files, copied verbatim
Writers build the whole directory in a temporary sibling and rename it into place, so a failure leaves nothing.
"""
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import Mesh
from tqdm import tqdm

from svdprune_jax.convert import keymap
from svdprune_jax.convert.hf_config import copy_assets, read_config, read_config_json, write_config
from svdprune_jax.convert.orbax_io import params_metadata, restore_params, save_params
from svdprune_jax.convert.safetensors_io import (Tensor, copy_tiled, nbytes, read_checkpoint, read_header, write_checkpoint,
                                    write_file)
from svdprune_jax.models import sharding
from svdprune_jax.models.llava import Llava, LlavaConfig
from svdprune_jax.models.llava_next import config_from_hf, model_class

PARAMS, UNUSED = "params", "hf_unused.safetensors"
TARGET_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}


def dtype_name(dtype) -> str:
    """'float32' or 'bfloat16' for a name, alias (fp32, f32, bf16) or dtype object; ValueError otherwise."""
    try:
        name = _ALIASES.get(dtype, dtype) if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in TARGET_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use float32 or bfloat16 (aliases fp32, f32, bf16)")
    return name


def _default_dtype(dtypes: Iterable[np.dtype]) -> str:
    """A float32 checkpoint stays float32; anything narrower (bfloat16, float16) becomes bfloat16."""
    return "float32" if all(np.dtype(d).itemsize >= 4 for d in dtypes) else "bfloat16"


def is_ours(path: str | Path) -> bool:
    return (Path(path) / PARAMS).is_dir()


def abstract_model(config: LlavaConfig, dtype: str) -> Llava:
    """Llava (LlavaNext for a NeXT config) with shape-only params (nothing allocated); params and compute in
    `dtype`."""
    d = TARGET_DTYPES[dtype_name(dtype)]
    return nnx.eval_shape(lambda: model_class(config)(config, dtype=d, param_dtype=d, rngs=nnx.Rngs(0)))


def abstract_params(model: Llava, mesh: Mesh | None = None) -> dict:
    """Our param tree of a (possibly abstract) model: nested dict of arrays or jax.ShapeDtypeStruct; with a
    mesh, ShapeDtypeStructs carrying each param's sharding (`models.sharding`), the target of a sharded restore."""
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    if mesh is None:
        return params
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                        nnx.to_pure_dict(sharding.param_shardings(state, mesh)))


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; renamed to `dest` (with the mode the user's umask
    gives a new directory) on success, removed on any error or interrupt."""
    dest = Path(dest).absolute()
    if dest.exists():
        raise ValueError(f"{dest} already exists; remove it or choose another output directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))  # mode 0700
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # a directory as mkdir would have made it
        os.rename(tmp, dest)
    except BaseException:  # KeyboardInterrupt too (the CLI turns SIGTERM into one)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plan(tensors: dict[str, Tensor], model: Llava) -> tuple[keymap.Plan, dict]:
    """The key plan against the abstract model, and its flat abstract params (target shapes and dtypes)."""
    abstract = traverse_util.flatten_dict(abstract_params(model))
    shapes = {path: tuple(a.shape) for path, a in abstract.items()}
    return keymap.plan(tensors, shapes, model.config.vision.num_hidden_layers), abstract


def _read(plan: keymap.Plan, abstract: dict, read: Callable[[int], None] = lambda nbytes: None
          ) -> Iterator[tuple[keymap.Path, np.ndarray]]:
    """Our params one at a time, each filled tensor by tensor from the memory-mapped HF files (transformed and
    cast on the copy), so only the params kept so far plus one mapped tensor are ever in memory."""
    for path, sources in plan.sources.items():
        rule = keymap.BY_PATH[path]
        out = np.empty(abstract[path].shape, abstract[path].dtype)
        for dst, (_, t) in zip(out if rule.stacked else [out], sources):
            copy_tiled(dst, rule.transform.to_ours(t.load()))
            read(t.nbytes)
        _check_finite(path, out)
        yield path, out


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress)


def _drain(flat: dict) -> Iterator[tuple[keymap.Path, np.ndarray]]:
    while flat:
        path, a = flat.popitem()
        _check_finite(path, a)
        yield path, a


def _model(model: Llava, params: Iterator[tuple[keymap.Path, np.ndarray | jax.Array]], target: dict) -> Llava:
    """`model` (abstract) holding `params`, host arrays moved to the device one at a time so that each can be
    freed before the next arrives (on CPU, device_put may alias it instead). `target` is the flat abstract
    params: where they carry a sharding, each device receives only its own slices of a host array; arrays Orbax
    restored are already in place."""
    def place(p, a):
        if isinstance(a, jax.Array):
            return a
        return jax.device_put(a) if target[p].sharding is None else sharding.put(a, target[p].sharding)

    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({p: place(p, a) for p, a in params}))
    return nnx.merge(graphdef, state)


def _check_finite(path: keymap.Path, a: np.ndarray | jax.Array) -> None:
    """A weight holding NaN or inf makes every answer garbage (random bytes under a valid header: "" and ids
    [0, 0, ...]): refused at load, naming the param."""
    finite = np.isfinite(a).all() if isinstance(a, np.ndarray) else bool(jax.numpy.isfinite(a).all())
    if not finite:
        raise ValueError(f"param {'.'.join(map(str, path))} holds NaN or inf: the checkpoint is damaged")


def _stored_dtype(our_dir: Path) -> str:
    leaves = jax.tree.leaves(params_metadata(our_dir / PARAMS), is_leaf=lambda x: isinstance(x, tuple))
    return _default_dtype(d for _, d in leaves)


def load_model(path: str | Path, dtype=None, mesh: Mesh | None = None) -> Llava:
    """The Llava (or LlavaNext) model stored in an HF LLaVA / LLaVA-NeXT directory (safetensors) or in ours (Orbax).

    dtype: float32 or bfloat16 for params and compute; default the checkpoint's own (float16 -> bfloat16).
    mesh: a `models.sharding.make_mesh` mesh; every param goes straight into its shards, never whole onto one
    device: Orbax restores each device's own slices; HF tensors are read on the host one param at a time and
    only their slices sent to each device."""
    path = Path(path)
    config = read_config(path)
    if mesh is not None:
        sharding.check_model_axis(config, mesh.shape[sharding.MODEL])
    if is_ours(path):
        model = abstract_model(config, dtype_name(dtype or _stored_dtype(path)))
        target = abstract_params(model, mesh)
        params = _drain(traverse_util.flatten_dict(restore_params(path / PARAMS, target)))
    else:
        tensors = read_checkpoint(path)
        model = abstract_model(config, dtype_name(dtype or _default_dtype(t.dtype for t in tensors.values())))
        target = abstract_params(model, mesh)
        params = _read(*_plan(tensors, model))
    return _model(model, params, traverse_util.flatten_dict(target))


def _write(tmp: Path, params: dict, config: LlavaConfig, dtype: str, base: dict | None, assets_from: Path | None):
    save_params(tmp / PARAMS, params)
    write_config(tmp, config, dtype, base)
    if assets_from is not None:
        copy_assets(assets_from, tmp)


def save_model(model: Llava, out_dir: str | Path, assets_from: str | Path | None = None):
    """Write a model (e.g. after training) as our directory. `assets_from` (an HF directory or ours) gives the
    tokenizer/processor files, the config.json keys our config does not model, and, from ours, the unused
    HF tensors, so that the result exports like a conversion."""
    params = abstract_params(model)
    dtype = _default_dtype(a.dtype for a in jax.tree.leaves(params))
    base = None if assets_from is None else read_config_json(assets_from)
    with atomic_dir(out_dir) as tmp:
        _write(tmp, params, model.config, dtype, base, assets_from and Path(assets_from))
        if assets_from is not None and (Path(assets_from) / UNUSED).is_file():
            shutil.copy2(Path(assets_from) / UNUSED, tmp / UNUSED)


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path, dtype=None, progress: bool = True) -> str:
    """HF LLaVA directory -> our directory (see the module docstring). Everything is checked (keys, shapes,
    dtypes, file integrity) before anything is written. Returns a one-line summary of what was mapped and
    skipped. dtype: float32 or bfloat16; default the checkpoint's own (float16 -> bfloat16)."""
    hf_dir = Path(hf_dir)
    base = read_config_json(hf_dir)
    config = config_from_hf(base)
    tensors = read_checkpoint(hf_dir)
    dtype = dtype_name(dtype or _default_dtype(t.dtype for t in tensors.values()))
    plan, abstract = _plan(tensors, abstract_model(config, dtype))
    total = sum(t.nbytes for sources in plan.sources.values() for _, t in sources)
    with atomic_dir(out_dir) as tmp, _bar(total, "convert", progress) as bar:
        params = traverse_util.unflatten_dict(dict(_read(plan, abstract, bar.update)))
        bar.set_description("convert: writing")
        _write(tmp, params, config, dtype, base, hf_dir)
        target = TARGET_DTYPES[dtype]
        if plan.skipped:
            write_file(tmp / UNUSED, [(key, t.shape, target, lambda t=t: t.load().astype(target))
                                      for key, (t, _) in plan.skipped.items()])
    return plan.summary()


def _natural(key: str) -> list[tuple[int, int | str]]:
    return [(0, int(s)) if s.isdigit() else (1, s) for s in key.split(".")]


def export_checkpoint(our_dir: str | Path, hf_dir: str | Path, max_shard_bytes: int | None = None,
                      progress: bool = True) -> list[str]:
    """Our directory -> a transformers-loadable LLaVA directory (hub legacy key layout, safetensors, sharded
    when `max_shard_bytes` is given), with the config and tokenizer/processor files. Returns the weight files."""
    our_dir = Path(our_dir)
    if not is_ours(our_dir):
        raise ValueError(f"{our_dir}: not a converted checkpoint (no {PARAMS}/ directory)")
    base = read_config_json(our_dir)
    config = config_from_hf(base)
    dtype = _stored_dtype(our_dir)
    abstract = abstract_params(abstract_model(config, dtype))
    params = traverse_util.flatten_dict(restore_params(our_dir / PARAMS, abstract))
    entries = []
    for path, a in params.items():
        rule = keymap.BY_PATH[path]
        for i, x in enumerate(a) if rule.stacked else [(None, a)]:
            y = rule.transform.to_hf(x)  # a view: the copy happens as the file is written
            entries.append((rule.hf_key(i), y.shape, y.dtype, lambda y=y: y))
    unused = read_header(our_dir / UNUSED) if (our_dir / UNUSED).is_file() else {}
    entries += [(key, t.shape, t.dtype, t.load) for key, t in unused.items()]
    entries.sort(key=lambda e: _natural(e[0]))
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or max_shard_bytes < 1):
        raise ValueError(f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}")
    with atomic_dir(hf_dir) as tmp, _bar(sum(map(nbytes, entries)), "export", progress) as bar:
        files = write_checkpoint(tmp, entries, max_shard_bytes, bar.update)
        write_config(tmp, config, dtype, base)
        copy_assets(our_dir, tmp)
    return files
