"""The saved adapters on disk: list, export as a zip, import a zip, delete.

No torch at module level: Slicer's own process imports this to list the adapters and to show a
zip's metadata before importing it. Only `import_adapter`'s last check (the tensors fit the method
on the base model) imports torch, inside the call; the CLI runs it in a process of its own.

A zip holds exactly `<name>/adapter.json` and `<name>/adapter.safetensors` (or both at the zip's
root). A zip from someone else is untrusted input, so importing checks everything before writing a
byte: the member names (nothing that could land outside the adapters folder), the declared sizes
and compression ratios (no zip bomb), the sizes that actually come out (headers can lie), the
metadata, the safetensors header and the sha256 `adapter.json` records for the tensors, the
tensor names and shapes against what the method builds on that base model, and that the base
model is one this installation knows. Only then is the adapter extracted, into a hidden staging
folder that is renamed into place (and removed on any failure).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import InputError, listed
from .io.files import atomic_write, sha256_file
from .registry_file import cache_dir

# The artefact's names and format, as in `adapters` (which imports torch; a test keeps them equal).
FORMAT = 1
METADATA_FILE = "adapter.json"
TENSORS_FILE = "adapter.safetensors"

MIB = 2**20
MAX_METADATA_BYTES = MIB
MAX_TENSORS_BYTES = 4 * 2**30
MAX_HEADER_BYTES = 100 * MIB  # the safetensors library's own limit
MAX_RATIO = 100  # trained float tensors barely compress (about 1.1x); deflate's ceiling is about 1,000x
RATIO_CHECKED_ABOVE = MIB  # a small member cannot fill a disk, whatever its ratio
CHUNK = MIB

SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A folder name that is safe on every system: no separators, no drive colon, no control
#: characters, not hidden, no trailing dot or space (Windows drops them).
FOLDER_NAME = re.compile(r"^[^./\\:\x00-\x1f][^/\\:\x00-\x1f]{0,127}(?<![. ])$")
#: safetensors dtypes whose tensors can be trainable parameters, and their bytes per value
FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def adapters_home() -> Path:
    """Where adapters are kept: `$FSEFT_ADAPTERS`, else `adapters/` in the per-user fseft folder."""
    if os.environ.get("FSEFT_ADAPTERS"):
        return Path(os.environ["FSEFT_ADAPTERS"]).expanduser()
    return cache_dir() / "adapters"


# ---------------------------------------------------------------- metadata


def check_metadata(metadata, path: str | os.PathLike) -> dict:
    """The checks `adapters.read_metadata` makes that need no torch (all but the method's name),
    as one-line InputErrors naming `path`. Returns the metadata."""
    if not isinstance(metadata, dict):
        raise InputError("adapter metadata must be a JSON object", path)
    if metadata.get("format") != FORMAT:
        raise InputError(f"unknown adapter format {metadata.get('format')!r} (this version reads format {FORMAT})", path)
    if not isinstance(metadata.get("method"), str):
        raise InputError('adapter metadata has no "method"', path)
    base = metadata.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), str) or not isinstance(base.get("name"), str):
        raise InputError('adapter metadata needs "base_model" with "name" and "sha256"', path)
    structures = metadata.get("structures")
    if not isinstance(structures, list) or not structures or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in structures):
        raise InputError('adapter metadata needs a non-empty "structures" list with names', path)
    ranges = metadata.get("expected_volumes_ml")
    if ranges is not None and not (
        isinstance(ranges, dict) and all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r) for r in ranges.values())
    ):
        raise InputError('"expected_volumes_ml" must map structure names to [low, high]', path)
    return metadata


def read_folder_metadata(folder: Path) -> dict:
    """An adapter folder's `adapter.json`, checked without torch (the panel names a result by it)."""
    path = folder / METADATA_FILE
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"unreadable adapter metadata ({type(error).__name__}: {str(error)[:120]})", path) from None
    return check_metadata(metadata, path)


# ---------------------------------------------------------------- listing


def _is_adapter_folder(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / METADATA_FILE).is_file() and (folder / TENSORS_FILE).is_file()


def _folder_bytes(folder: Path) -> int:
    return sum(path.lstat().st_size for path in folder.rglob("*") if not path.is_dir() or path.is_symlink())


def _timestamp(text) -> float | None:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


ROW_KEYS = (
    "path", "name", "structures", "method", "tune_decoder", "k", "base_model", "base_sha256", "created",
    "size_bytes", "trainable_parameters", "epochs", "loss", "training_dice", "size_prior", "error",
)


def _row(folder: Path) -> dict:
    """One `list_adapters` row; every key present, None where the metadata does not say."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(path=str(folder), name=folder.name, structures=[], size_bytes=_folder_bytes(folder))
    try:
        metadata = read_folder_metadata(folder)
    except InputError as error:
        row["error"] = str(error)
        return row
    curve = metadata.get("training_curve")
    curve = curve if isinstance(curve, list) else []
    loss = curve[-1].get("loss") if curve and isinstance(curve[-1], dict) else None
    row.update(
        structures=[s.get("display_name") or s["name"] for s in metadata["structures"]],
        method=metadata["method"],
        tune_decoder=bool(metadata.get("tune_decoder")),
        k=metadata.get("k"),
        base_model=metadata["base_model"]["name"],
        base_sha256=metadata["base_model"]["sha256"],
        created=metadata.get("created"),
        trainable_parameters=metadata.get("trainable_parameters"),
        epochs=metadata.get("epochs", len(curve)),
        loss=loss if isinstance(loss, (int, float)) else None,
        size_prior=bool(metadata.get("size_prior")),
    )
    if row["loss"] is not None:
        row["training_dice"] = round(1.0 - row["loss"], 6)
    return row


def list_adapters(root: str | os.PathLike | None = None) -> list[dict]:
    """Every adapter folder directly under `root` (default `adapters_home()`), newest first.

    Row keys: path, name (the folder's), structures (display names), method, tune_decoder, k,
    base_model (name), base_sha256, created (ISO), size_bytes (the whole folder, predictions
    included), trainable_parameters, epochs, loss (the last epoch's training loss), training_dice,
    size_prior (whether the transductive size prior was used), error (None, or why the
    metadata cannot be read: such a folder is listed, not skipped, so it can be found and removed).

    training_dice = 1 - loss: the training loss is MONAI's soft Dice loss (sigmoid, smooth 1), i.e.
    1 - soft Dice, averaged over the last epoch's crops and structures (`training.adapt`). It says
    how well the adapter fits its own supports, not how well it generalises.
    A folder without both adapter files, a hidden one (staging) or a file is skipped.
    """
    root = Path(root).expanduser() if root is not None else adapters_home()
    if not root.is_dir():
        return []
    rows = [_row(folder) for folder in root.iterdir() if not folder.name.startswith(".") and _is_adapter_folder(folder)]

    def newest(row: dict) -> float:
        return _timestamp(row["created"]) or Path(row["path"]).stat().st_mtime

    return sorted(rows, key=newest, reverse=True)


def size_text(count: float) -> str:
    """A byte count as people read it (B, KB, MB, GB; powers of 1000), for the CLI table and the panel."""
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("KB", "MB"):
        count /= 1000
        if count < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} GB"


def adapters_table(rows: list[dict], root: str | os.PathLike) -> str:
    """`list_adapters` rows as an aligned text table, with what the Dice column means."""
    if not rows:
        return f"no adapters in {root}"
    header = ("name", "structures", "method", "K", "base model", "created", "size", "Dice", "loss")
    body = []
    for row in rows:
        if row["error"]:
            body.append((row["name"], f"unreadable: {row['error']}", *[""] * 7))
            continue
        body.append(
            (
                row["name"],
                ", ".join(row["structures"]),
                row["method"] + ("+decoder" if row["tune_decoder"] else ""),
                "" if row["k"] is None else str(row["k"]),
                row["base_model"],
                (row["created"] or "")[:10],
                size_text(row["size_bytes"]),
                "" if row["training_dice"] is None else f"{row['training_dice']:.3f}",
                "" if row["loss"] is None else f"{row['loss']:.4f}",
            )
        )
    widths = [max(len(cells[i]) for cells in (header, *body)) for i in range(len(header))]
    right = {3, 6, 7, 8}  # numbers

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(header), *(line(cells) for cells in body), ""]
    lines.append(f"in {root}; Dice: training Dice on the supports (1 - final soft Dice loss), not a validation score")
    return "\n".join(lines)


# ---------------------------------------------------------------- export and delete


def _resolve(adapter: str | os.PathLike, root: Path) -> Path:
    """An adapter given as the name of one in `root` (first) or as a folder path; InputError if it is
    not an adapter folder."""
    text = os.fspath(adapter)
    path = root / text if FOLDER_NAME.match(text) and os.path.lexists(root / text) else Path(text).expanduser()
    if not path.exists():
        raise InputError(f"no such adapter (neither a folder nor an adapter in {root})", adapter)
    if not _is_adapter_folder(path):
        raise InputError(f"not an adapter folder (needs {METADATA_FILE} and {TENSORS_FILE})", path)
    return path


def export_adapter(adapter: str | os.PathLike, zip_path: str | os.PathLike) -> Path:
    """Write `<name>/adapter.json` and `<name>/adapter.safetensors`, nothing else (no predictions),
    to a zip, atomically. `adapter` is a folder or a name under `adapters_home()`. The tensors must
    still match their recorded sha256, so a damaged adapter is not passed on. Returns the zip."""
    folder = _resolve(adapter, adapters_home())
    metadata = read_folder_metadata(folder)
    tensors = folder / TENSORS_FILE
    if metadata.get("tensors_sha256") != sha256_file(tensors):
        raise InputError(f"does not match the sha256 recorded in {METADATA_FILE} (changed or damaged); not exported", tensors)
    zip_path = Path(zip_path).expanduser()
    if zip_path.is_dir():
        raise InputError("is a folder; give the zip file to write", zip_path)
    try:
        with atomic_write(zip_path) as temporary, zipfile.ZipFile(temporary, "w") as archive:
            archive.write(folder / METADATA_FILE, f"{folder.name}/{METADATA_FILE}", zipfile.ZIP_DEFLATED)
            archive.write(tensors, f"{folder.name}/{TENSORS_FILE}", zipfile.ZIP_STORED)  # floats barely compress
    except OSError as error:
        raise InputError(f"cannot write the zip ({error.strerror or error})", zip_path) from None
    return zip_path


def delete_adapter(adapter: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Remove an adapter folder directly inside `root` (default `adapters_home()`); anything else is refused.

    The folder is first renamed to a hidden name, so a listing never shows a half-deleted adapter."""
    root = Path(root).expanduser() if root is not None else adapters_home()
    folder = _resolve(adapter, root)
    if folder.resolve().parent != root.resolve():
        raise InputError(f"not an adapter in {root}; refusing to delete it", folder)
    doomed = folder.with_name(f".{folder.name}.deleting-{secrets.token_hex(4)}")
    try:
        os.rename(folder, doomed)
        shutil.rmtree(doomed)
    except OSError as error:
        raise InputError(f"cannot delete it ({error.strerror or error})", folder) from None
    return folder


# ---------------------------------------------------------------- zip checks


@dataclass
class _Contents:
    """What a checked zip holds: the adapter's name, its two members, their sha256, the metadata and tensor shapes."""

    name: str
    members: dict[str, zipfile.ZipInfo]  # METADATA_FILE / TENSORS_FILE -> member
    sha256: dict[str, str]
    metadata: dict
    shapes: dict[str, tuple[int, ...]]


class _Member:
    """Reads a zip member through a sha256 and a size cap: the bytes that arrive are counted, not
    the header believed. `out`: a stream that also receives them. Damage is an InputError."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, zip_path: Path, out=None):
        self.info, self.zip_path, self.out = info, zip_path, out
        self.count = 0
        self.digest = hashlib.sha256()
        self.stream = self._guard(lambda: archive.open(info))

    def _guard(self, action):
        try:
            return action()
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError) as error:
            raise InputError(f"damaged zip: {self.info.filename} cannot be read ({str(error)[:120]})", self.zip_path) from None
        except OSError as error:
            raise InputError(f"cannot read the zip ({error.strerror or error})", self.zip_path) from None

    def read(self, size: int) -> bytes:
        block = self._guard(lambda: self.stream.read(min(size, self.info.file_size + 1 - self.count)))
        self.count += len(block)
        if self.count > self.info.file_size:
            raise InputError(f"{self.info.filename} holds more than the {self.info.file_size} bytes its header declares", self.zip_path)
        self.digest.update(block)
        if self.out is not None:
            self.out.write(block)
        return block

    def exactly(self, size: int) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise InputError(f"{self.info.filename} ends early ({self.count} bytes)", self.zip_path)
        return data

    def finish(self) -> str:
        """Read the rest; the member must hold exactly its declared size. Returns its sha256."""
        while self.read(CHUNK):
            pass
        if self.count != self.info.file_size:
            raise InputError(f"{self.info.filename} holds {self.count} bytes, not the {self.info.file_size} its header declares", self.zip_path)
        self.stream.close()
        return self.digest.hexdigest()


def _open_zip(zip_path: Path) -> zipfile.ZipFile:
    if not zip_path.is_file():
        raise InputError("no such file", zip_path)
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as error:
        raise InputError(f"not a zip file, or a truncated one ({str(error)[:120]})", zip_path) from None
    except OSError as error:
        raise InputError(f"cannot read the zip ({error.strerror or error})", zip_path) from None


def _unsafe(name: str) -> str | None:
    """Why a member name could write outside the target folder (or anywhere odd), or None."""
    if "\\" in name:
        return "a backslash"
    if name.startswith("/"):
        return "an absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "a drive letter"
    if any(ord(c) < 32 for c in name):
        return "a control character"
    if any(part in ("", ".", "..") for part in name.rstrip("/").split("/")):
        return "a '..', '.' or empty path part"
    return None


def _members(archive: zipfile.ZipFile, zip_path: Path) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The adapter's name and its two members; InputError for anything else in the zip."""
    infos = archive.infolist()
    if not infos:
        raise InputError("empty zip", zip_path)
    for info in infos:
        reason = _unsafe(info.orig_filename)
        if reason:
            raise InputError(f"member {info.orig_filename!r} has {reason}; refused", zip_path)
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: a zip made where files have no Unix mode
        if kind == stat.S_IFLNK:
            raise InputError(f"member {info.filename!r} is a symbolic link; refused", zip_path)
        if kind not in (0, stat.S_IFDIR if info.is_dir() else stat.S_IFREG):
            raise InputError(f"member {info.filename!r} is not a plain file; refused", zip_path)
        if info.flag_bits & 0x1:
            raise InputError(f"member {info.filename!r} is encrypted; refused", zip_path)
    files = [info for info in infos if not info.is_dir()]
    folders = {info.filename.rstrip("/") for info in infos if info.is_dir()}
    tops = {info.filename.rpartition("/")[0] for info in files}
    expected = "exactly one adapter.json and one adapter.safetensors, in one folder or at the zip's root"
    if len(tops) != 1 or "/" in next(iter(tops)) or sorted(info.filename.rpartition("/")[2] for info in files) != [METADATA_FILE, TENSORS_FILE]:
        listed = ", ".join(info.filename for info in infos[:6]) + (", ..." if len(infos) > 6 else "")
        raise InputError(f"not an adapter zip: it must hold {expected}; it holds {listed}", zip_path)
    top = tops.pop()
    if folders - {top}:  # a `zip -r` of the adapter folder adds its own entry: harmless, anything else is not
        raise InputError(f"not an adapter zip: it must hold {expected}; it also holds {sorted(folders - {top})[0]}/", zip_path)
    name = top or zip_path.stem
    if not FOLDER_NAME.match(name):
        if top:
            raise InputError(f"the adapter's folder name {top!r} is not a plain folder name", zip_path)
        name = "adapter"
    return name, {info.filename.rpartition("/")[2]: info for info in files}


def _check_sizes(members: dict[str, zipfile.ZipInfo], zip_path: Path) -> None:
    """Declared sizes within limits and no zip-bomb compression ratio, before anything is decompressed."""
    for filename, limit in ((METADATA_FILE, MAX_METADATA_BYTES), (TENSORS_FILE, MAX_TENSORS_BYTES)):
        info = members[filename]
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(f"{info.filename} uses an unsupported compression (only stored or deflated)", zip_path)
        if info.file_size > limit:
            raise InputError(f"{info.filename} declares {info.file_size} bytes, more than the {limit} an adapter may have", zip_path)
        if info.file_size > RATIO_CHECKED_ABOVE and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise InputError(f"{info.filename} would expand {info.file_size / max(info.compress_size, 1):.0f}-fold (a zip bomb?); refused", zip_path)


def _tensor_shapes(header: bytes, tensors_bytes: int, where: str, zip_path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from a safetensors JSON header; the tensors' byte ranges must tile the data exactly."""

    def bad(problem: str) -> InputError:
        return InputError(f"{where}: not a valid safetensors file ({problem})", zip_path)

    try:
        document = json.loads(header.decode("utf-8"))
    except ValueError:
        raise bad("its header is not JSON") from None
    if not isinstance(document, dict):
        raise bad("its header is not a JSON object")
    document.pop("__metadata__", None)
    shapes, spans = {}, []
    for name, entry in document.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)):
            raise bad(f"tensor {name!r} lacks shape or data_offsets")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if entry.get("dtype") not in FLOAT_BYTES:
            raise bad(f"tensor {name!r} has dtype {entry.get('dtype')!r}, not floating point")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (*shape, *offsets)) or len(offsets) != 2:
            raise bad(f"tensor {name!r} has a bad shape or data_offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * FLOAT_BYTES[entry["dtype"]]:
            raise bad(f"tensor {name!r}: data_offsets do not match its shape and dtype")
        shapes[name] = tuple(shape)
        spans.append(offsets)
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise bad("tensor data overlaps or leaves gaps")
        position = end
    if position != tensors_bytes:
        raise bad(f"the tensors cover {position} of its {tensors_bytes} data bytes")
    return shapes


def _verify(archive: zipfile.ZipFile, zip_path: Path) -> _Contents:
    """Every check that needs no torch; reads (never writes) each member once."""
    name, members = _members(archive, zip_path)
    _check_sizes(members, zip_path)

    reader = _Member(archive, members[METADATA_FILE], zip_path)
    document = reader.read(MAX_METADATA_BYTES)
    digests = {METADATA_FILE: reader.finish()}
    where = f"{zip_path}: {members[METADATA_FILE].filename}"
    try:
        metadata = json.loads(document.decode("utf-8"))
    except ValueError as error:
        raise InputError(f"{members[METADATA_FILE].filename} is not valid JSON ({str(error)[:120]})", zip_path) from None
    check_metadata(metadata, where)
    for label, value in (("base_model.sha256", metadata["base_model"]["sha256"]), ("tensors_sha256", metadata.get("tensors_sha256"))):
        if not (isinstance(value, str) and SHA256.match(value.lower())):
            raise InputError(f'adapter metadata needs "{label}" as 64 hex digits', where)

    info = members[TENSORS_FILE]
    reader = _Member(archive, info, zip_path)
    if info.file_size < 8:
        raise InputError(f"{info.filename}: not a valid safetensors file (only {info.file_size} bytes)", zip_path)
    length = int.from_bytes(reader.exactly(8), "little")
    if not 2 <= length <= min(MAX_HEADER_BYTES, info.file_size - 8):
        raise InputError(f"{info.filename}: not a valid safetensors file (header length {length} does not fit the file)", zip_path)
    shapes = _tensor_shapes(reader.exactly(length), info.file_size - 8 - length, info.filename, zip_path)
    digests[TENSORS_FILE] = reader.finish()
    if digests[TENSORS_FILE] != metadata["tensors_sha256"].lower():
        raise InputError(f"{info.filename} does not match the sha256 recorded in {METADATA_FILE} (changed or damaged)", zip_path)
    return _Contents(name, members, digests, metadata, shapes)


def read_zip_metadata(zip_path: str | os.PathLike) -> dict:
    """An adapter zip's `adapter.json`, after every check that needs no torch (names, sizes, metadata,
    safetensors header, tensors sha256), for showing before import. Writes nothing."""
    zip_path = Path(zip_path).expanduser()
    with _open_zip(zip_path) as archive:
        return _verify(archive, zip_path).metadata


# ---------------------------------------------------------------- import


def _check_base_and_tensors(contents: _Contents, zip_path: Path) -> None:
    """The base model is known here, and the tensors are exactly what the method trains on it (torch)."""
    from .methods.summary import adapted_on_meta
    from .model.registry import list_models, load_registry

    metadata = contents.metadata
    base = metadata["base_model"]
    digest = base["sha256"].lower()
    known: dict[str, str] = {}  # sha256 -> the first model name with it
    for row in list_models():
        if row["sha256"]:
            known.setdefault(row["sha256"].lower(), row["name"])
    if digest not in known:
        raise InputError(
            f"made for another base model: {base['name']} (sha256 {digest[:12]}...), which is not installed here; "
            f"pull or import that model first (fseft models pull {base['name']}, or fseft models import FILE --name {base['name']})",
            zip_path,
        )
    architecture = load_registry()[known[digest]].architecture
    rows = [entry.get("pretrained_row") for entry in metadata["structures"]]
    if any(row is not None and not (isinstance(row, int) and 0 <= row < architecture.out_channels) for row in rows):
        raise InputError(f"a pretrained_row is outside the base model's {architecture.out_channels} classes", zip_path)
    try:
        model = adapted_on_meta(architecture, metadata["method"], len(rows), bool(metadata.get("tune_decoder")))
    except InputError as error:
        raise InputError(f"adapter uses an {error}", zip_path) from None
    expected = {name: tuple(tensor.shape) for name, tensor in model.trainable_state().items()}
    found = contents.shapes
    problems = []
    for label, keys in (
        ("missing", sorted(set(expected) - set(found))),
        ("unexpected", sorted(set(found) - set(expected))),
        ("mis-shaped", sorted(f"{k} {found[k]} != {expected[k]}" for k in set(expected) & set(found) if found[k] != expected[k])),
    ):
        if keys:
            problems.append(f"{len(keys)} {label}: {listed(keys)}")
    if problems:
        raise InputError(
            f"tensors do not fit a {metadata['method']} adapter with {len(rows)} structure(s) on {known[digest]}: " + "; ".join(problems),
            zip_path,
        )


def _install_unique(staging: Path, root: Path, name: str) -> Path:
    """Rename `staging` to `root/name`, or `name-2`, `name-3`, ... when taken; never onto an adapter."""
    for number in itertools.count(1):
        final = root / (name if number == 1 else f"{name}-{number}")
        if os.path.lexists(final):
            continue
        try:
            os.rename(staging, final)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):  # appeared meanwhile
                continue
            raise
        return final


def import_adapter(zip_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Install an adapter zip into `root` (default `adapters_home()`) once every check has passed
    (module docstring); a taken name gets `-2`, `-3`, .... Returns the new adapter folder.

    Refusals are one-line InputErrors naming the zip, and leave `root` as it was."""
    zip_path = Path(zip_path).expanduser()
    root = Path(root).expanduser() if root is not None else adapters_home()
    with _open_zip(zip_path) as archive:
        contents = _verify(archive, zip_path)
        _check_base_and_tensors(contents, zip_path)
        staging = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = root / f".{contents.name}.importing-{secrets.token_hex(4)}"
            staging.mkdir()
            for filename, info in contents.members.items():
                with open(staging / filename, "xb") as out:
                    if _Member(archive, info, zip_path, out).finish() != contents.sha256[filename]:
                        raise InputError(f"{info.filename} changed while it was being imported", zip_path)
                    out.flush()
                    os.fsync(out.fileno())
            return _install_unique(staging, root, contents.name)
        except BaseException as error:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError):
                raise InputError(f"cannot write the adapter ({error.strerror or error})", root) from None
            raise
