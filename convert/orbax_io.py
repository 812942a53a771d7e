"""Orbax save/restore of a parameter tree, restored against an abstract target (shapes, dtypes, shardings)."""
import threading
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import type_handlers


def save_params(directory: str | Path, params: dict):
    """Write a nested dict of arrays as an Orbax PyTree checkpoint at `directory` (must not exist).

    numpy leaves are written in place: no defensive deep copy (the caller does not touch them while saving)
    and no compression (weights barely compress; zstd doubled the time and the memory), so saving them adds
    nothing to peak memory. jax leaves are copied to host first."""
    registry = type_handlers.create_type_handler_registry(  # jax.Array listed only so Orbax does not warn
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)), (jax.Array, type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    _finish_before_interrupt(lambda: ocp.Checkpointer(handler).save(
        Path(directory).absolute(), args=ocp.args.PyTreeSave(jax.tree.map(np.asarray, params))))


def _finish_before_interrupt(write):
    """Run `write` to its end, then let a Ctrl-C that came meanwhile through. Orbax writes from background
    threads that an interrupt of the waiting main thread does not stop: they kept writing into the directory
    the caller was removing (recreating it) and died at interpreter exit with tracebacks. (Waiting on an Event,
    not Thread.join: an interrupted join can report a live thread as finished.)"""
    outcome, done = {}, threading.Event()

    def target():
        try:
            outcome["value"] = write()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e
        finally:
            done.set()
    threading.Thread(target=target, name="orbax-save").start()
    interrupted = None
    while not done.is_set():
        try:
            done.wait()
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def params_metadata(directory: str | Path) -> dict:
    """The stored tree with (shape, dtype) leaves, read from the checkpoint's metadata only."""
    try:
        meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(Path(directory).absolute())
        tree = meta.item_metadata.tree  # item_metadata is None when the metadata file is gone
    except (AttributeError, OSError, ValueError) as e:
        raise ValueError(f"{directory}: the checkpoint's metadata cannot be read (a file deleted or damaged?): "
                         f"{_first_line(e)}") from None
    return jax.tree.map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), tree)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def restore_params(directory: str | Path, abstract: dict) -> dict:
    """Restore into the structure, shapes and dtypes (cast on read) of `abstract`, a nested dict of
    jax.ShapeDtypeStruct. A leaf with a sharding comes back as a jax.Array laid out so (each device reads its
    own shards); one without as a host numpy array, the leanest path (Orbax's jax path holds a second copy of
    arrays in flight). ValueError listing every missing, unknown or wrongly shaped param."""
    stored = traverse_util.flatten_dict(params_metadata(directory), sep="/")
    want = traverse_util.flatten_dict(abstract, sep="/")
    problems = [f"missing {k}" for k in want if k not in stored] + [f"unknown {k}" for k in stored if k not in want]
    problems += [f"{k}: stored {list(stored[k][0])}, model needs {list(a.shape)}"
                 for k, a in want.items() if k in stored and stored[k][0] != tuple(a.shape)]
    if problems:
        raise ValueError(f"{directory}: checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype) if a.sharding is None
                        else ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=a.sharding), abstract)
    try:
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            Path(directory).absolute(), args=ocp.args.PyTreeRestore(item=abstract, restore_args=args))
    except (OSError, ValueError, RuntimeError) as e:  # tensorstore: a data file missing, truncated or damaged
        raise ValueError(f"{directory}: the stored params cannot be read (a file deleted, truncated or damaged?): "
                         f"{_first_line(e)}") from None
