"""Atomic file writing, and content hashes of files.

A batch run that is interrupted (Ctrl-C, out of memory, a full disk) must never leave a
half-written segmentation that looks finished: a later "skip existing outputs" or the Slicer
loader would take it for a result. Every writer therefore writes to a temporary file in the
destination folder (same file system, so the final `os.replace` is atomic) and renames it only
once the write has succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


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
    The parent folder is created if needed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:  # like tempfile.mkstemp, but with the umask's permissions (mkstemp's 0600 would stick)
        tmp = final.parent / f".tmp-{secrets.token_hex(4)}{_suffix(final.name)}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
