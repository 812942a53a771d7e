"""Output paths checked before the work, so that a run never fails at its end on a path it could have refused
at its start. Nothing is left behind by a check."""
import tempfile
from pathlib import Path


def check_file(path: Path, option: str) -> None:
    """`path` can be written as a file: its directory exists and takes a new file (or the file is writable)."""
    path = Path(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() or _under_a_file(parent) else "does not exist"
        raise ValueError(f"{option} {path}: its directory {parent} {why}")
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory, not a file")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot be written ({e.strerror})") from None
    if not existed:
        path.unlink()


def check_dir(path: Path, option: str) -> None:
    """`path` can be made (or is) a directory that takes new files: the nearest existing ancestor is a directory
    that takes a new file. Nothing is created."""
    path = Path(path).absolute()
    nearest = next(p for p in (path, *path.parents) if p.exists())
    if not nearest.is_dir():
        raise ValueError(f"{option} {path}: {nearest} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write in {nearest} ({e.strerror})") from None


def _under_a_file(path: Path) -> bool:
    return any(p.is_file() for p in path.parents)
