"""Atomic file writing, content hashes of files, and reading a YAML config file.

A batch run that is interrupted (Ctrl-C, out of memory, a full disk) must never leave a
half-written segmentation that looks finished: a later "skip existing outputs" or the Slicer
loader would take it for a result. Every writer therefore writes to a temporary file in the
destination folder (same file system, so the final `os.replace` is atomic) and renames it only
once the write has succeeded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import FSEFTError, InputError


def _suffix(name: str) -> str:
    """The full suffix (`.seg.nrrd`, `.nii.gz`), kept so that writers dispatching on it still work."""
    stem, dot, _ = name.partition(".")
    return dot + name[len(stem) + 1 :] if dot else ""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it to `path` only if the block succeeds.

    The temporary name looks like `.tmp-<random><suffix>` (e.g. `.tmp-k3j9.seg.nrrd`): hidden,
    and with the final suffix so that SimpleITK/slicerio pick the right format. On any exception
    the temporary file is removed and `path` is left as it was (absent, or the previous file).
    The parent folder is created if needed. A write that fails (a folder that cannot be created,
    no permission, a full disk) is an `InputError` naming `path`. A disk left with no free block
    counts as full even when the writer said nothing: SimpleITK's NIfTI writer truncates silently.
    """
    final = Path(path)
    ensure_folder(final.parent)
    while True:  # like tempfile.mkstemp, but with the umask's permissions (mkstemp's 0600 would stick)
        tmp = final.parent / f".tmp-{secrets.token_hex(4)}{_suffix(final.name)}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
        except OSError as error:
            raise InputError(f"cannot write ({_os_reason(error)})", final) from None
    try:
        yield tmp
        if _disk_full(tmp.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.replace(tmp, final)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(error, OSError) or (isinstance(error, RuntimeError) and "write" in str(error).lower()):
            reason = os.strerror(errno.ENOSPC) if _disk_full(tmp.parent) else _os_reason(error)
            raise InputError(f"cannot write ({reason})", final) from None
        raise


def ensure_folder(folder: str | os.PathLike) -> Path:
    """`folder`, created with its parents; one line naming it (and what is in the way) when it cannot be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else _os_reason(error)
        raise InputError(f"cannot create the folder ({reason})", folder) from None
    return folder


def _os_reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except (OSError, AttributeError):  # gone, or no statvfs (Windows)
        return False


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, or of a folder's files (a DICOM series) in name order; read in chunks
    so that a 250 MB checkpoint never sits in memory twice."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        with open(file, "rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def check_readable(path: Path, error: type[FSEFTError] = InputError) -> None:
    """Fail in one line on a file this process may not read: readers say "does not exist" instead."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise error("cannot be read (permission denied)", path) from None
    except OSError as failure:
        if not path.is_dir():
            raise error(f"cannot be read ({_os_reason(failure)})", path) from None


def read_yaml(path: Path) -> Any:
    """A config file's values; a missing file or bad YAML is one line naming the file."""
    import yaml

    if path.is_dir():
        raise InputError("is a folder, not a config file", path)
    if not path.is_file():
        raise InputError("no such config file", path)
    check_readable(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"not valid YAML ({str(error).splitlines()[0]})", path) from None
    if not isinstance(values, dict):
        raise InputError(f"not a config: expected a mapping of keys to values, found {type(values).__name__}", path)
    return values
