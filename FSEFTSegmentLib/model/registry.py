"""Known foundation models, the per-user cache that holds them, and their safe download or import.

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
Standard library only for the network (urllib with a cookie jar): no `requests` dependency inside
Slicer's Python.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import sys  # noqa: F401 - Testing/test_registry.py patches registry.sys.platform for cache_dir
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path

from ..errors import DownloadError, FSEFTError, InputError, ModelError
from ..io.files import sha256_file  # noqa: F401 (re-exported)
from ..progress import Progress
from ..registry_file import REGISTRY_FILE, RESOURCES, cache_dir, read_document, registry_path  # noqa: F401 (re-exported)
from .checkpoint import build_from_checkpoint, stored_architecture
from .network import Architecture

RECORD = "record.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHAPE_FIELDS = ("feature_size", "out_channels", "in_channels", "depths", "num_heads")

TIMEOUT_S = 60.0  # per socket operation, not for the whole download
RETRIES = 3  # resumed attempts after a dropped connection, within one pull
RETRY_DELAY_S = 2.0
CHUNK = 1 << 20
MAX_PAGE = 1 << 20  # bytes of a confirmation web page read before giving up on it
MAX_CONFIRMATIONS = 3
USER_AGENT = "FSEFTSegment (python-urllib)"


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


# ---------------------------------------------------------------- download


class _Interrupted(Exception):
    """The transfer stopped midway; the `.part` file is kept and the next attempt resumes it."""


class _ResumeRefused(_Interrupted):
    """HTTP 416: the `.part` cannot be continued (the file changed or shrank); the next attempt starts over."""


class _ConfirmationPage(HTMLParser):
    """Google Drive's "can't scan this file for viruses" page: its download form, or a `confirm=` link."""

    def __init__(self):
        super().__init__()
        self.action = None
        self.fields: dict[str, str] = {}
        self.links: list[str] = []
        self._in_form = False

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        if tag == "form" and attributes.get("id") == "download-form":
            self.action, self._in_form = attributes.get("action", ""), True
        elif tag == "input" and self._in_form and attributes.get("name"):
            self.fields[attributes["name"]] = attributes.get("value", "")
        elif tag == "a" and "confirm=" in attributes.get("href", ""):
            self.links.append(attributes["href"])

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


def _confirmation_url(page: str, base_url: str) -> str | None:
    """Where a Drive confirmation page says the file really is, or None if the page is something else."""
    parser = _ConfirmationPage()
    parser.feed(page)
    if parser.action is not None:
        return urllib.parse.urljoin(base_url, parser.action) + "?" + urllib.parse.urlencode(parser.fields)
    if parser.links:
        return urllib.parse.urljoin(base_url, parser.links[0])
    token = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    if token:
        parts = urllib.parse.urlsplit(base_url)
        query = dict(urllib.parse.parse_qsl(parts.query), confirm=token.group(1))
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    return None


def _open(opener, url: str, offset: int):
    """Open the file's URL (asking for bytes from `offset` on), walking through Drive confirmation pages."""
    for _ in range(MAX_CONFIRMATIONS + 1):
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416 and offset:
                raise _ResumeRefused("the server refused to resume; starting over") from None
            if error.code >= 500:
                raise _Interrupted(f"HTTP {error.code} {error.reason}") from None
            raise DownloadError(f"download failed: HTTP {error.code} {error.reason}", url) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            raise DownloadError(f"cannot reach the server ({reason})", url) from None
        if response.headers.get_content_type() != "text/html":
            return response
        with response:
            page = response.read(MAX_PAGE).decode("utf-8", "replace")
            next_url = _confirmation_url(page, response.geturl())
        if next_url is None:
            raise DownloadError(
                "the server sent a web page instead of the file (Google Drive: daily quota exceeded or file not public); "
                "download it in a browser, then run: fseft models import FILE --name NAME",
                url,
            )
        url = next_url
    raise DownloadError("too many confirmation pages", url)


def _content_range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _fetch_once(opener, file: ModelFile, part: Path, progress: Progress, model: str) -> None:
    """One attempt: append to `part` what the server sends (restarting if it ignores the Range)."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(opener, file.url, offset)
    except _ResumeRefused:
        part.unlink()
        raise
    with response:
        if response.status != 206 or _content_range_start(response) != offset:
            offset = 0  # a 200 (Range ignored) or an unexpected range: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else file.size
        if file.size and total and total != file.size:
            _discard(part)
            raise DownloadError(f"the server offers {total} bytes, the registry expects {file.size}", file.url)
        done, shown = offset, 0.0
        with open(part, "ab" if offset else "wb") as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as error:
                    raise _Interrupted(f"{type(error).__name__} after {done} bytes") from None
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as error:
                    raise DownloadError(f"cannot write {part} ({error.strerror or error})", file.url) from None
                done += len(block)
                if time.monotonic() - shown > 0.2:
                    shown = time.monotonic()
                    _report(progress, model, file, done, total)
    if total is not None and done < total:
        raise _Interrupted(f"connection closed after {done} of {total} bytes")
    if total is not None and done > total:
        raise DownloadError(f"received {done} bytes, more than the {total} announced", file.url)
    _report(progress, model, file, done, done)


def _report(progress: Progress, model: str, file: ModelFile, done: int, total: int | None) -> None:
    megabytes = f"{done / 1e6:.1f}" + (f" / {total / 1e6:.1f} MB" if total else " MB")
    progress.step(done / total if total else 0.0, f"downloading {file.filename} ({megabytes})", model=model, file=file.filename, bytes=done, total=total)


def _fetch(opener, file: ModelFile, part: Path, progress: Progress, model: str) -> None:
    """Download into `part`, resuming after dropped connections; the `.part` survives a final failure."""
    for attempt in range(RETRIES + 1):
        try:
            return _fetch_once(opener, file, part, progress, model)
        except _Interrupted as why:
            if attempt == RETRIES:
                raise DownloadError(f"download interrupted ({why}); run the same command again to resume", file.url) from None
            progress.warning(f"{file.filename}: {why}; retrying (attempt {attempt + 2} of {RETRIES + 1})", model=model)
            time.sleep(RETRY_DELAY_S * (attempt + 1))


def pull_model(name: str, progress: Progress | None = None, *, force: bool = False) -> Path:
    """Download a registry model into the cache (checksum, strict layout) and return its weights path.

    A file already there that matches its checksum is not fetched again unless `force`; with `force`
    the verified copy stays in place until the new one has passed every check.
    """
    progress = progress or Progress()
    entry = _entry(name, load_registry())
    if entry.imported:
        raise ModelError(f"model '{name}' was imported from a file; there is nothing to download")
    if entry.bundled:
        _check_bundled(entry)
        progress.info(f"{name}: bundled with FSEFTSegment, nothing to download ({entry.weights_path})", model=name)
        return entry.weights_path
    entry.directory.mkdir(parents=True, exist_ok=True)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    for index, file in enumerate(entry.files):
        final = entry.directory / file.filename
        recorded = _file_record(_read_record(name), file.filename).get("sha256")
        expected = file.sha256 or recorded
        if final.is_file() and not force:
            if expected and sha256_file(final) == expected:
                progress.info(f"{name}: {file.filename} already downloaded and verified ({final})", model=name)
                continue
            if expected:
                progress.warning(f"{name}: {final} does not match its checksum; downloading it again", model=name)
        part = final.with_name(final.name + ".part")
        progress.info(f"{name}: downloading {file.filename} from {file.url}", model=name)
        try:
            _fetch(opener, file, part, progress, name)
        except BaseException:
            _remove_if_empty(entry.directory)  # a failure before any byte arrived leaves no empty folder
            raise
        digest = sha256_file(part)
        if expected and digest != expected:
            _discard(part)
            origin = "the registry's" if file.sha256 else "the one recorded at its first download"
            hint = "" if file.sha256 else f"; if the publisher replaced it on purpose, delete {final.parent / RECORD} and pull again"
            raise DownloadError(f"sha256 {digest} differs from {origin} ({expected}): file refused{hint}", file.url)
        staged = _staging_name(final, "checking")
        os.replace(part, staged)
        try:
            if index == 0:
                _accept_checkpoint(staged, entry)
        except ModelError as error:
            _discard(staged)
            raise ModelError(f"downloaded {file.filename} refused: {_reason(error)}", file.url) from None
        except BaseException:
            _discard(staged)
            raise
        os.replace(staged, final)
        record = _read_record(name) or {"name": name, "imported": False, "files": {}}
        record.setdefault("files", {})[file.filename] = {
            "sha256": digest,
            "size": final.stat().st_size,
            "source": file.url,
            "time": _now(),
            "trusted_on_first_use": not file.sha256,
        }
        _write_record(name, record)
        if not expected:
            progress.warning(f"{name}: the registry gives no checksum for {file.filename}; recorded sha256 {digest} (trust on first use)", model=name)
        progress.info(f"{name}: {file.filename} verified and saved to {final}", model=name)
    return entry.weights_path
