"""Turning command-line inputs into a list of studies (id + image path) for a batch run.

Users batch with what they have: a few files on the command line, a folder of DICOM slices,
or a study list (`.txt`, one path a line; `.csv` with `id,image` columns, as exported from a
spreadsheet). Paths in a list are relative to the list file, so a list travels with its data.
Each study gets a unique id because the id names its output files: two `ct.nii.gz` in
different folders must not overwrite each other's results.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .images import IMAGE_SUFFIXES

LIST_SUFFIXES = (".txt", ".csv")
_STRIP_SUFFIXES = sorted({*IMAGE_SUFFIXES, ".dcm", ".gz"}, key=len, reverse=True)
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]+')  # characters a file name cannot hold (Windows included)


@dataclass(frozen=True)
class Study:
    """One image to segment. `id` is unique in the batch and safe as a file-name stem."""

    id: str
    path: Path
    listed_in: str | None = field(default=None, compare=False)  # "LIST:LINE" for a study from a study list, to point at the line to fix


def default_id(path: str | os.PathLike) -> str:
    """File name without image suffixes (`ct.nii.gz` -> `ct`); a DICOM folder's own name."""
    name = Path(os.path.abspath(path)).name  # abspath: "." has a name; no symlink resolving
    for suffix in _STRIP_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _safe_id(study_id: str, where: Path) -> str:
    cleaned = _UNSAFE.sub("_", study_id.strip())
    if cleaned in ("", ".", ".."):
        raise InputError(f"study id {study_id!r} cannot name an output file", where)
    return cleaned


def _resolve(entry: str, list_file: Path) -> Path:
    path = Path(entry.strip()).expanduser()
    return path if path.is_absolute() else list_file.parent / path


def _read_txt(list_file: Path) -> list[tuple[str | None, Path, str]]:
    lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    return [(None, _resolve(line, list_file), f"{list_file}:{number}") for number, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _read_csv(list_file: Path) -> list[tuple[str | None, Path, str]]:
    with open(list_file, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets add a BOM
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "id" not in columns or "image" not in columns:
            raise InputError(f"a study list .csv needs the header 'id,image' (found: {','.join(columns) or 'nothing'})", list_file)
        reader.fieldnames = columns
        entries = []
        for row in reader:
            image, study_id = (row.get("image") or "").strip(), (row.get("id") or "").strip()
            if not image:
                if study_id or any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    raise InputError(f"line {reader.line_num}: no image path", list_file)
                continue  # blank row
            entries.append((study_id or None, _resolve(image, list_file), f"{list_file}:{reader.line_num}"))
    return entries


def _entries(item: str | os.PathLike) -> list[tuple[str | None, Path, str | None]]:
    path = Path(item).expanduser()
    if path.suffix.lower() in LIST_SUFFIXES:
        if not path.is_file():
            raise InputError("study list not found", path)
        try:
            entries = _read_csv(path) if path.suffix.lower() == ".csv" else _read_txt(path)
        except (UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"study list cannot be read ({error})", path) from None
        except PermissionError:
            raise InputError("study list cannot be read (permission denied)", path) from None
        if not entries:
            raise InputError("study list is empty", path)
        return entries
    if not path.exists():
        raise InputError("no such file or folder", path)
    return [(None, path, None)]


def _unique_ids(entries: list[tuple[str | None, Path, str | None]]) -> list[str]:
    """Default ids that collide take their parent folder's name; any id still repeated gets -2, -3..."""
    explicit = Counter(study_id for study_id, _, _ in entries if study_id)
    defaults = Counter(default_id(path) for study_id, path, _ in entries if not study_id)
    ids = []
    for study_id, path, _ in entries:
        if not study_id:
            study_id = default_id(path)
            if defaults[study_id] > 1 or explicit[study_id]:
                study_id = f"{Path(os.path.abspath(path)).parent.name}_{study_id}"
        ids.append(_safe_id(study_id, path))
    taken: set[str] = set()
    unique = []
    for study_id in ids:
        candidate, n = study_id, 1
        while candidate in taken:
            n += 1
            candidate = f"{study_id}-{n}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Study]:
    """Expand image files, DICOM folders and study lists (.txt/.csv) into studies, in order.

    Inputs given directly must exist; paths inside a list are only checked when read, so one
    missing file fails that study, not the whole batch.
    """
    entries = [entry for item in inputs for entry in _entries(item)]
    return [Study(study_id, path, listed_in) for study_id, (_, path, listed_in) in zip(_unique_ids(entries), entries)]
