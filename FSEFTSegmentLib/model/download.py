"""Downloading a registry model into the cache: resumable, through Google Drive's confirmation pages.

Kept apart from `registry` (the entries, the cache and the acceptance checks a download ends with)
because only `fseft models pull` needs the network. Standard library only (urllib with a cookie
jar): no `requests` dependency inside Slicer's Python.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path

from ..errors import DownloadError, ModelError
from ..io.files import sha256_file
from ..progress import Progress
from .registry import (
    RECORD,
    ModelFile,
    _accept_checkpoint,
    _check_bundled,
    _discard,
    _entry,
    _file_record,
    _now,
    _read_record,
    _reason,
    _remove_if_empty,
    _staging_name,
    _write_record,
    load_registry,
)

TIMEOUT_S = 60.0  # per socket operation, not for the whole download
RETRIES = 3  # resumed attempts after a dropped connection, within one pull
RETRY_DELAY_S = 2.0
CHUNK = 1 << 20
MAX_PAGE = 1 << 20  # bytes of a confirmation web page read before giving up on it
MAX_CONFIRMATIONS = 3
USER_AGENT = "FSEFTSegment (python-urllib)"


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
