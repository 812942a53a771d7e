"""Process-wide settings the CLI applies before JAX loads: thread and log defaults, the persistent XLA
compilation cache, and which exceptions are a user's problem (one line) rather than a bug (a traceback)."""
import os
import signal
import sys
from pathlib import Path

CACHE_ENV = "SVDPRUNE_JAX_CACHE"  # a directory for compiled programs, or "off"
# Bad input and unusable files. Anything else is a bug and keeps its traceback.
EXPECTED = (ValueError, OSError)


def set_defaults() -> None:
    """Defaults the user's environment can override. One OpenBLAS thread: NumPy's and JAX's CPU LAPACK calls
    run on OpenBLAS, whose spinning threads fight XLA's own for the cores (docs/performance.md). transformers'
    advisory notes ("PyTorch was not found"): the JAX path never uses torch."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


_SIGNALS = []  # the interrupting signals received
CLOSED_LOOP = "Event loop is closed"


def handle_unraisable_reports() -> None:
    """Exceptions Python cannot raise (in callbacks) are reported as tracebacks and dropped. Two kinds are ours
    to handle. After a failed Orbax restore (a params file deleted or truncated) tensorstore still completes the
    reads in flight, and their callbacks find Orbax's asyncio loop closed: each reports 'RuntimeError: Event
    loop is closed' after the real error's one line; those reports are dropped. A Ctrl-C that lands in a
    callback (e.g. a garbage-collection hook) would be lost: it is delivered again. Every other report goes to
    the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "is_ours", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signal.raise_signal(_SIGNALS[-1] if _SIGNALS else signal.SIGINT)
        elif not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == CLOSED_LOOP):
            previous(unraisable)
    hook.is_ours = True
    sys.unraisablehook = hook


def catch_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (SIGTERM by default ends Python without
    unwinding: no cleanup of half-written outputs), and are remembered: a library may turn the interrupt into
    an error of its own, which is then reported as the interruption it is."""
    def interrupt(signum, frame):
        _SIGNALS.append(signum)
        raise KeyboardInterrupt
    _SIGNALS.clear()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)


def interrupted() -> bool:
    return bool(_SIGNALS)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "svdprune-jax" / "xla"


def enable_compilation_cache() -> Path | None:
    """JAX's persistent compilation cache in the user's cache directory (or `SVDPRUNE_JAX_CACHE`), so a second
    invocation reads its compiled programs instead of compiling them again. Off with SVDPRUNE_JAX_CACHE=off;
    a cache directory the user configured for JAX is kept."""
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = Path(setting) if setting else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def describe(e: BaseException) -> str:
    """One line for an expected error: an OSError names its file."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)
