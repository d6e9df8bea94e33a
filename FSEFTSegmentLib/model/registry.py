"""Known foundation models, the per-user cache that holds them, and the checks that let a model in.

A model reaches the cache only after three checks, so that nothing later has to doubt it:
its sha256 (the registry's, or the one recorded the first time it was fetched: trust on first use),
the strict layout check of `build_from_checkpoint` (pickle-free, every key present and shaped), and
agreement with the registry's architecture. Files are written under temporary names and renamed
into place, so an interrupted download or import never leaves a half-file that looks complete.

A bundled model (its file entry has a `path` inside the extension's `Resources/` instead of a `url`)
ships with the code: it is never downloaded or copied, and its sha256 (required in the registry) is
checked before each process first uses it.

Layout of the cache: `cache_dir()/models/<name>/<filename>` plus `record.json` (accepted sha256,
size, source, time, and for imported models the architecture read off the file).
Downloading (`download.pull_model`) builds on this module's cache and acceptance checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys  # noqa: F401 - Testing/test_registry.py patches registry.sys.platform for cache_dir
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import FSEFTError, InputError, ModelError
from ..io.files import sha256_file  # noqa: F401 (re-exported)
from ..registry_file import REGISTRY_FILE, RESOURCES, cache_dir, read_document, registry_path  # noqa: F401 (re-exported)
from .checkpoint import build_from_checkpoint, stored_architecture
from .network import Architecture

RECORD = "record.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHAPE_FIELDS = ("feature_size", "out_channels", "in_channels", "depths", "num_heads")


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: where it comes from and what it must hash to (None: trust on first use).

    `bundled`: the file's path inside `Resources/` when it ships with the extension (then `url` is "")."""

    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None
    bundled: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A registry model or a user-imported one; the first file holds the weights."""

    name: str
    description: str
    architecture: Architecture
    files: tuple[ModelFile, ...]
    license: str = ""
    source: str = ""
    citation: str = ""
    imported: bool = False

    @property
    def directory(self) -> Path:
        return model_dir(self.name)

    @property
    def bundled(self) -> bool:
        return self.files[0].bundled is not None

    @property
    def weights_path(self) -> Path:
        if self.bundled:
            return RESOURCES / self.files[0].bundled
        return self.directory / self.files[0].filename


# ---------------------------------------------------------------- cache


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _read_record(name: str) -> dict:
    path = model_dir(name) / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ModelError(f"unreadable cache record ({type(error).__name__}); delete it and pull or import again", path) from None
    return record if isinstance(record, dict) else {}


def _write_record(name: str, record: dict) -> None:
    path = model_dir(name) / RECORD
    temporary = path.with_name(f".{RECORD}.{os.getpid()}")
    temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _file_record(record: dict, filename: str) -> dict:
    return record.get("files", {}).get(filename, {})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _discard(*paths: Path) -> None:
    """Remove what a refused file left, and its model folder once empty: a refusal leaves no trace."""
    for path in paths:
        path.unlink(missing_ok=True)
    _remove_if_empty(paths[0].parent)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _reason(error: FSEFTError) -> str:
    """An error's message without its path prefix, to re-attach it to the name the user knows."""
    text = str(error)
    return text[len(error.path) + 2 :] if error.path and text.startswith(error.path + ": ") else text


# ---------------------------------------------------------------- registry


def load_registry(path: str | os.PathLike | None = None) -> dict[str, ModelEntry]:
    """Entries of the registry file (checked; a bad one is a ModelError naming it), then imported models."""
    path = Path(path) if path is not None else registry_path()
    try:
        document = read_document(path)
    except FileNotFoundError:
        raise ModelError("model registry file not found", path) from None
    except ValueError as error:
        raise ModelError(f"model registry is not valid JSON ({error})", path) from None
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise ModelError('model registry must be an object with a "models" list', path)
    entries: dict[str, ModelEntry] = {}
    for index, raw in enumerate(document["models"]):
        entry = _parse_entry(raw, index, path)
        if entry.name in entries:
            raise ModelError(f"registry entry {index} ('{entry.name}'): duplicate name", path)
        entries[entry.name] = entry
    for name, entry in _imported_entries().items():
        entries.setdefault(name, entry)
    return entries


def _parse_entry(raw, index: int, path: Path) -> ModelEntry:
    """Check one registry entry's fields and types; every problem names the entry."""
    label = f"registry entry {index}" + (f" ('{raw.get('name')}')" if isinstance(raw, dict) and raw.get("name") else "")

    def bad(problem: str) -> ModelError:
        return ModelError(f"{label}: {problem}", path)

    if not isinstance(raw, dict):
        raise bad("is not an object")
    for key in ("name", "description", "architecture", "files"):
        if key not in raw:
            raise bad(f'missing "{key}"')
    if not isinstance(raw["name"], str) or not NAME.match(raw["name"]):
        raise bad('"name" must be letters, digits, ".", "_" or "-"')
    for key in ("description", "license", "source", "citation"):
        if not isinstance(raw.get(key, ""), str):
            raise bad(f'"{key}" must be a string')
    architecture = raw["architecture"]
    if not isinstance(architecture, dict):
        raise bad('"architecture" must be an object')
    unknown = sorted(set(architecture) - set(Architecture.__dataclass_fields__))
    if unknown:
        raise bad(f'unknown architecture field(s): {", ".join(unknown)}')
    try:
        architecture = Architecture.from_dict(architecture)
    except TypeError as error:
        raise bad(f"bad architecture ({error})") from None
    ints = (architecture.feature_size, architecture.out_channels, architecture.in_channels, *architecture.depths, *architecture.num_heads)
    if not all(isinstance(v, int) and v > 0 for v in ints) or len(architecture.depths) != len(architecture.num_heads):
        raise bad("architecture sizes must be positive integers, with as many depths as num_heads")
    if len(architecture.hu_window) != 2 or not all(isinstance(v, (int, float)) for v in (*architecture.hu_window, architecture.spacing_mm)):
        raise bad("architecture hu_window must be [low, high] and spacing_mm a number")
    if architecture.class_names and len(architecture.class_names) != architecture.out_channels:
        raise bad(f"{len(architecture.class_names)} class_names for {architecture.out_channels} out_channels")
    if not isinstance(raw["files"], list) or not raw["files"]:
        raise bad('"files" must be a non-empty list')
    files = []
    for number, item in enumerate(raw["files"]):
        if not isinstance(item, dict) or "filename" not in item or ("url" in item) == ("path" in item):
            raise bad(f'file {number} needs "filename" and either "url" or "path" (bundled, inside Resources/)')
        url, filename, digest, size = item.get("url", ""), item["filename"], item.get("sha256"), item.get("size")
        bundled = item.get("path")
        if bundled is not None:
            if not isinstance(bundled, str) or Path(bundled).is_absolute() or ".." in Path(bundled).parts or Path(bundled).name != filename:
                raise bad(f"file {number}: path must be relative to Resources/ and end with the filename")
            if digest is None:
                raise bad(f"file {number}: a bundled file needs its sha256")
        elif not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise bad(f"file {number}: url must be http(s)")
        if not isinstance(filename, str) or not NAME.match(filename) or filename == RECORD:
            raise bad(f"file {number}: filename must be a plain file name")
        if digest is not None and not (isinstance(digest, str) and SHA256.match(digest.lower())):
            raise bad(f"file {number}: sha256 must be 64 hex digits or null")
        if size is not None and not (isinstance(size, int) and size > 0):
            raise bad(f"file {number}: size must be a positive integer or null")
        files.append(ModelFile(url, filename, digest.lower() if digest else None, size, bundled))
    return ModelEntry(
        name=raw["name"],
        description=raw["description"],
        architecture=architecture,
        files=tuple(files),
        license=raw.get("license", ""),
        source=raw.get("source", ""),
        citation=raw.get("citation", ""),
    )


def _imported_entries() -> dict[str, ModelEntry]:
    """Models the user imported, read back from their cache records (a record whose file is gone is skipped)."""
    entries = {}
    root = cache_dir() / "models"
    for record_path in sorted(root.glob(f"*/{RECORD}")) if root.is_dir() else ():
        name = record_path.parent.name
        record = _read_record(name)
        if not record.get("imported") or not record.get("files"):
            continue
        filename, info = next(iter(record["files"].items()))
        if not (record_path.parent / filename).is_file():
            continue
        entries[name] = ModelEntry(
            name=name,
            description=f"imported from {info.get('source', '?')}",
            architecture=Architecture.from_dict(record.get("architecture") or {}),
            files=(ModelFile(Path(info.get("source", filename)).as_uri() if info.get("source") else "", filename, info.get("sha256"), info.get("size")),),
            source=info.get("source", ""),
            imported=True,
        )
    return entries


def _entry(name: str, registry: dict[str, ModelEntry]) -> ModelEntry:
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise ModelError(f"unknown model '{name}' (known: {known}; or give a checkpoint file path)")
    return registry[name]


def list_models() -> list[dict]:
    """One row per known model: name, description, status, path, size, sha256 (no hashing: fast)."""
    rows = []
    for name, entry in load_registry().items():
        weights = entry.weights_path
        info = _file_record(_read_record(name), weights.name)
        present = weights.is_file()
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "status": "imported" if entry.imported else ("bundled" if present else "bundled file missing") if entry.bundled
                else "available" if present else "not downloaded",
                "path": str(weights),
                "size": weights.stat().st_size if present else entry.files[0].size,
                "sha256": info.get("sha256") or entry.files[0].sha256,
            }
        )
    return rows


def resolve_model(name_or_path: str | os.PathLike) -> tuple[Path, Architecture, str]:
    """Weights file, architecture defaults and display name for a checkpoint path or a cached model's name."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate, stored_architecture(candidate) or Architecture(), candidate.name
    name = os.fspath(name_or_path)
    registry = load_registry()
    if name not in registry and candidate.is_dir():
        raise ModelError("is a folder, not a checkpoint file (.pt, .pth or .safetensors) nor a model name", candidate)
    if name not in registry and (os.sep in name or "/" in name or candidate.suffix in (".pth", ".pt", ".ckpt", ".safetensors")):
        raise ModelError("no such checkpoint file", candidate)
    entry = _entry(name, registry)
    if entry.bundled:
        _check_bundled(entry)
    elif not entry.weights_path.is_file():
        raise ModelError(f"model '{name}' is not downloaded; run: fseft models pull {name}")
    return entry.weights_path, entry.architecture, name


_verified_bundles: dict[tuple[str, int, int], bool] = {}


def _check_bundled(entry: ModelEntry) -> None:
    """A bundled file must exist and hash to the registry's sha256 (checked once per process and file state)."""
    path = entry.weights_path
    if not path.is_file():
        raise ModelError(f"the bundled model '{entry.name}' is missing from this installation; reinstall FSEFTSegment", path)
    status = path.stat()
    key = (str(path), status.st_size, status.st_mtime_ns)
    if key not in _verified_bundles:
        digest = sha256_file(path)
        if digest != entry.files[0].sha256:
            raise ModelError(f"the bundled model '{entry.name}' is damaged (sha256 {digest[:12]}... != registry {entry.files[0].sha256[:12]}...); reinstall FSEFTSegment", path)
        _verified_bundles[key] = True


def model_sha256(name_or_path: str | os.PathLike) -> str:
    """sha256 of a model's weights: the cache record's (accepted when pulled or imported), else the file's."""
    path, _, name = resolve_model(name_or_path)
    if Path(name_or_path).expanduser().is_file():
        return sha256_file(path)
    entry = load_registry()[name]
    if entry.bundled:
        return entry.files[0].sha256  # verified by resolve_model
    return _file_record(_read_record(name), path.name).get("sha256") or sha256_file(path)


# ---------------------------------------------------------------- acceptance


def _accept_checkpoint(staged: Path, entry: ModelEntry | None) -> Architecture:
    """Strict layout check of a staged file, and agreement with the registry's shape when there is an entry."""
    network = build_from_checkpoint(staged, defaults=entry.architecture if entry else Architecture())
    found = network.architecture
    if entry is not None:
        differences = [f"{k} {getattr(found, k)} != {getattr(entry.architecture, k)}" for k in SHAPE_FIELDS if getattr(found, k) != getattr(entry.architecture, k)]
        if differences:
            raise ModelError(f"not the registry's '{entry.name}' network ({'; '.join(differences)})", staged)
    return found


def _staging_name(final: Path, tag: str) -> Path:
    """A temporary sibling that keeps the suffix, since `.safetensors` decides how the file is read."""
    return final.with_name(f".{final.stem}.{tag}{final.suffix}")


def import_model(path: str | os.PathLike, name: str) -> Path:
    """Copy a local checkpoint into the cache under `name`, once it has passed the strict checks.

    A registry name is accepted only for the registry's own file (same sha256, or, when the registry
    has none and nothing was recorded yet, the registry's network shape: this is how a user installs
    weights they downloaded by hand when Drive refuses). Anything refused leaves the cache untouched.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise ModelError("no such checkpoint file", source)
    if not isinstance(name, str) or not NAME.match(name):
        raise InputError(f"model name '{name}' must be letters, digits, '.', '_' or '-' (at most 64)")
    registry = load_registry()
    entry = registry.get(name)
    if entry is not None and entry.bundled:
        raise InputError(f"'{name}' is bundled with FSEFTSegment; import the file under another name")
    registered = entry if entry is not None and not entry.imported else None
    target = model_dir(name) / (registered.files[0].filename if registered else source.name)
    if target.name == RECORD or not NAME.match(target.name):
        raise InputError(f"cannot import a file named '{source.name}'; rename it (letters, digits, '.', '_' or '-')", source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = _staging_name(target, f"importing-{os.getpid()}")
    try:
        shutil.copyfile(source, staged)
        try:
            architecture = _accept_checkpoint(staged, registered)
        except ModelError as error:
            raise ModelError(_reason(error), source) from None
        digest = sha256_file(staged)
        if registered:
            expected = registered.files[0].sha256 or _file_record(_read_record(name), target.name).get("sha256")
            if expected and digest != expected:
                raise ModelError(f"'{name}' is a registry model and this is not its file (sha256 {digest[:12]}... != {expected[:12]}...); import it under another name", source)
    except BaseException:
        _discard(staged)
        raise
    previous = _read_record(name)
    os.replace(staged, target)
    if previous.get("imported"):
        for old in previous.get("files", {}):
            if old != target.name:
                (target.parent / old).unlink(missing_ok=True)
    file_info = {"sha256": digest, "size": target.stat().st_size, "source": str(source.resolve()), "time": _now()}
    record = {"name": name, "imported": registered is None, "files": {target.name: file_info}}
    if registered is None:
        record["architecture"] = architecture.to_dict()
    else:
        record["files"] = {**previous.get("files", {}), target.name: file_info}
    _write_record(name, record)
    return target
