"""Model registry, cache, download and import, against a real HTTP server on 127.0.0.1.

The server plays the parts the real world plays: a plain file host with Range support, Google
Drive's two confirmation-page styles (with the cookie Drive requires), a connection that drops
midway, a host that ignores Range, a quota page. Checkpoints are tiny (feature size 12) so the
whole file runs in seconds.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shlex
import socket
from hashlib import sha256
from pathlib import Path

import pytest
import torch
from loopback import Server

from FSEFTSegmentLib.errors import DownloadError, InputError, ModelError
from FSEFTSegmentLib.model import (
    Architecture,
    FoundationSwinUNETR,
    download,
    load_foundation_model,
    registry,
)
from FSEFTSegmentLib.progress import Progress

TINY = Architecture(feature_size=12)
DRIVE_ID = "1tinyDriveFileId"


def _bytes_of(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_state():
    torch.manual_seed(0)
    return FoundationSwinUNETR(TINY).state_dict()


@pytest.fixture(scope="session")
def blobs(tiny_state):
    """Served files: a good checkpoint, another good one (a 'changed' file), one missing a key."""
    torch.manual_seed(1)
    other = FoundationSwinUNETR(TINY).state_dict()
    broken = {k: v for k, v in tiny_state.items() if k != "classifier.bias"}
    return {"tiny.pth": _bytes_of(tiny_state), "other.pth": _bytes_of(other), "broken.pth": _bytes_of(broken)}


@pytest.fixture
def server(blobs):
    host = Server({**blobs, DRIVE_ID: blobs["tiny.pth"]})
    yield host
    host.close()


class Recorder(Progress):
    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, dict]] = []

    def emit(self, event, **fields):
        self.events.append((event, fields))

    def messages(self, event: str) -> str:
        return "\n".join(fields.get("message", "") for kind, fields in self.events if kind == event)


def _digest(data: bytes) -> str:
    return sha256(data).hexdigest()


def _entry(name, url, digest=None, size=None, **architecture):
    names = [f"c{i}" for i in range(29)]
    return {
        "name": name,
        "description": f"test model {name}",
        "architecture": {"feature_size": 12, "out_channels": 29, "spacing_mm": 2.0, "class_names": names, **architecture},
        "files": [{"url": url, "filename": "weights.pth", "sha256": digest, "size": size}],
        "license": "test",
        "source": "test",
        "citation": "test",
    }


@pytest.fixture
def env(server, blobs, tmp_path, monkeypatch):
    """Cache and registry in tmp_path; registry urls point at the loopback server."""
    good = blobs["tiny.pth"]
    models = [
        _entry("tiny", server.url("/files/tiny.pth"), _digest(good), len(good)),
        _entry("tofu", server.url("/files/tofu.pth")),
        _entry("drive", server.url(f"/drive/uc?export=download&id={DRIVE_ID}"), _digest(good)),
        _entry("drive-old", server.url(f"/old/uc?export=download&id={DRIVE_ID}"), _digest(good)),
        _entry("bad-sha", server.url("/files/tiny.pth"), "0" * 64),
        _entry("broken", server.url("/files/broken.pth")),
        _entry("other-shape", server.url("/files/tiny.pth"), feature_size=24),
        _entry("gone", server.url("/files/nothing.pth")),
        _entry("quota", server.url("/quota")),
    ]
    registry_file = tmp_path / "models.json"
    registry_file.write_text(json.dumps({"models": models}))
    monkeypatch.setenv("FSEFT_REGISTRY", str(registry_file))
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0)
    monkeypatch.setattr(download, "TIMEOUT_S", 10.0)
    server.files["tofu.pth"] = good
    return tmp_path


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# ---------------------------------------------------------------- download


def test_pull_downloads_with_progress_and_record(env, server, blobs):
    progress = Recorder()
    path = download.pull_model("tiny", progress)
    assert path == registry.cache_dir() / "models" / "tiny" / "weights.pth"
    assert path.read_bytes() == blobs["tiny.pth"]
    steps = [fields for kind, fields in progress.events if kind == "progress"]
    assert steps and steps[-1]["fraction"] == 1.0 and steps[-1]["bytes"] == len(blobs["tiny.pth"])
    record = json.loads((path.parent / "record.json").read_text())
    assert record["files"]["weights.pth"]["sha256"] == _digest(blobs["tiny.pth"])
    assert record["files"]["weights.pth"]["source"] == server.url("/files/tiny.pth")
    assert sorted(p.name for p in _files_under(path.parent)) == ["record.json", "weights.pth"]


def test_resume_after_dropped_connection(env, server, blobs):
    half = len(blobs["tiny.pth"]) // 2
    server.drop_after = half
    progress = Recorder()
    path = download.pull_model("tiny", progress)
    assert path.read_bytes() == blobs["tiny.pth"]
    (_, first), (_, second) = server.requests
    assert "Range" not in first and second["Range"] == f"bytes={half}-"
    assert "retrying" in progress.messages("warning")


def test_resume_in_a_later_run_and_restart_when_range_ignored(env, server, blobs, monkeypatch):
    monkeypatch.setattr(download, "RETRIES", 0)
    server.drop_after = 1000
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download.pull_model("tiny")
    part = registry.cache_dir() / "models" / "tiny" / "weights.pth.part"
    assert part.stat().st_size == 1000
    server.ignore_range = True  # answers the Range request with the whole file: start over
    assert download.pull_model("tiny").read_bytes() == blobs["tiny.pth"]
    assert server.requests[-1][1]["Range"] == "bytes=1000-" and not part.exists()


def test_unresumable_part_is_restarted(env, server, blobs):
    part = registry.cache_dir() / "models" / "tiny" / "weights.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * (len(blobs["tiny.pth"]) + 10))  # longer than the file: the server answers 416
    assert download.pull_model("tiny").read_bytes() == blobs["tiny.pth"]
    assert [headers.get("Range") for _, headers in server.requests] == [f"bytes={len(blobs['tiny.pth']) + 10}-", None]


@pytest.mark.parametrize("name, confirm_path", [("drive", "/drive/download"), ("drive-old", "/old/uc")])
def test_google_drive_confirmation(env, server, blobs, name, confirm_path):
    path = download.pull_model(name)
    assert path.read_bytes() == blobs["tiny.pth"]
    (_, page), (confirmed, headers) = server.requests
    assert "Cookie" not in page
    assert confirmed.startswith(confirm_path) and "confirm=" in confirmed and "Cookie" in headers


def test_web_page_instead_of_file(env, server):
    with pytest.raises(DownloadError, match="web page instead of the file") as caught:
        download.pull_model("quota")
    assert server.url("/quota") in str(caught.value)


def test_sha256_mismatch_refused_and_nothing_left(env):
    with pytest.raises(DownloadError, match="differs from the registry's"):
        download.pull_model("bad-sha")
    assert _files_under(registry.cache_dir() / "models") == []


def test_trust_on_first_use_then_changed_file_refused(env, server, blobs):
    progress = Recorder()
    path = download.pull_model("tofu", progress)
    assert "trust on first use" in progress.messages("warning")
    record = json.loads((path.parent / "record.json").read_text())
    assert record["files"]["weights.pth"]["sha256"] == _digest(blobs["tiny.pth"])
    server.files["tofu.pth"] = blobs["other.pth"]  # the publisher swapped the file
    with pytest.raises(DownloadError, match="recorded at its first download"):
        download.pull_model("tofu", force=True)
    assert path.read_bytes() == blobs["tiny.pth"]  # the verified copy is untouched
    assert sorted(p.name for p in _files_under(path.parent)) == ["record.json", "weights.pth"]


@pytest.mark.parametrize("name, problem", [("broken", "missing: classifier.bias"), ("other-shape", "feature_size 12 != 24")])
def test_wrong_layout_download_refused(env, name, problem):
    with pytest.raises(ModelError, match=re.escape(problem)):
        download.pull_model(name)
    assert _files_under(registry.cache_dir() / "models") == []


def test_already_present_is_not_downloaded_again(env, server):
    download.pull_model("tiny")
    server.requests.clear()
    progress = Recorder()
    download.pull_model("tiny", progress)
    assert server.requests == []
    assert "already downloaded and verified" in progress.messages("info")


def test_http_error_and_unreachable_host(env, server, tmp_path, monkeypatch):
    with pytest.raises(DownloadError, match="HTTP 404") as caught:
        download.pull_model("gone")
    assert server.url("/files/nothing.pth") in str(caught.value)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = f"http://127.0.0.1:{port}/x.pth"
    (tmp_path / "dead.json").write_text(json.dumps({"models": [_entry("dead", dead)]}))
    monkeypatch.setenv("FSEFT_REGISTRY", str(tmp_path / "dead.json"))
    with pytest.raises(DownloadError, match="cannot reach the server") as caught:
        download.pull_model("dead")
    assert dead in str(caught.value)


# ---------------------------------------------------------------- import, list, resolve


@pytest.fixture
def tiny_file(tmp_path, blobs):
    path = tmp_path / "mine.pth"
    path.write_bytes(blobs["tiny.pth"])
    return path


def test_import_list_resolve_and_load(env, tiny_file, tiny_state):
    rows = {row["name"]: row for row in registry.list_models()}
    assert rows["tiny"]["status"] == "not downloaded"
    target = registry.import_model(tiny_file, "mine")
    assert target.read_bytes() == tiny_file.read_bytes()
    download.pull_model("tiny")
    rows = {row["name"]: row for row in registry.list_models()}
    assert (rows["mine"]["status"], rows["tiny"]["status"], rows["tofu"]["status"]) == ("imported", "available", "not downloaded")
    assert rows["mine"]["sha256"] == registry.sha256_file(tiny_file) and rows["mine"]["path"] == str(target)
    path, architecture, display = registry.resolve_model("mine")
    assert (path, architecture.feature_size, display) == (target, 12, "mine")
    model = load_foundation_model("mine")
    assert not model.training and all(torch.equal(v, tiny_state[k]) for k, v in model.state_dict().items())
    by_name = load_foundation_model("tiny")  # registry fields that the file cannot tell come from the registry
    assert by_name.architecture.spacing_mm == 2.0 and by_name.architecture.class_names[-1] == "c28"


def test_import_wrong_layout_copies_nothing(env, tmp_path, blobs):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(blobs["broken.pth"])
    with pytest.raises(ModelError, match="missing: classifier.bias") as caught:
        registry.import_model(broken, "broken-import")
    assert str(broken) in str(caught.value)
    assert _files_under(registry.cache_dir()) == []


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dumps"])
def test_import_refuses_pickled_code_without_running_it(env, tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"state_dict": Exploit(marker)}, payload)
    else:
        payload.write_bytes(pickle.dumps(Exploit(marker), protocol=2))
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Exploit(probe)))  # the payload is live: a plain unpickle runs it
    assert probe.exists()
    with pytest.raises(ModelError, match="refused|not a readable"):
        registry.import_model(payload, "evil")
    assert not marker.exists()
    assert _files_under(registry.cache_dir()) == []


def test_import_under_a_registry_name(env, tiny_file, tmp_path, blobs):
    other = tmp_path / "other.pth"
    other.write_bytes(blobs["other.pth"])
    with pytest.raises(ModelError, match="is a registry model and this is not its file"):
        registry.import_model(other, "tiny")
    assert registry.import_model(tiny_file, "tiny").name == "weights.pth"  # the same file: installed as the registry model
    assert registry.import_model(tiny_file, "tofu").exists()  # no registry hash: the registry's shape is enough
    with pytest.raises(ModelError, match="feature_size 12 != 24"):
        registry.import_model(tiny_file, "other-shape")
    assert {row["name"]: row["status"] for row in registry.list_models()}["tiny"] == "available"
    with pytest.raises(InputError, match="model name"):
        registry.import_model(tiny_file, "../escape")


def test_resolve_errors(env, tmp_path):
    with pytest.raises(ModelError, match=r"model 'tiny' is not downloaded; run: fseft models pull tiny"):
        registry.resolve_model("tiny")
    with pytest.raises(ModelError, match=r"unknown model 'nope' \(known: bad-sha, broken, drive"):
        registry.resolve_model("nope")
    with pytest.raises(ModelError, match="no such checkpoint file"):
        registry.resolve_model(tmp_path / "absent.pth")


# ---------------------------------------------------------------- checkpoint variants


def _variant(kind: str, state: dict):
    if kind == "module.":
        return {f"module.{k}": v for k, v in state.items()}
    if kind == "out.conv.conv":
        return {k.replace("classifier.", "out.conv.conv."): v for k, v in state.items()}
    if kind in ("state_dict", "net", "model"):
        return {kind: state, "epoch": 3} if kind != "model" else {kind: state}
    return state


@pytest.mark.parametrize("kind", ["raw", "state_dict", "net", "model", "module.", "out.conv.conv", "safetensors"])
def test_load_foundation_model_variants(env, tmp_path, tiny_state, kind):
    if kind == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save(_variant(kind, tiny_state), path)
    model = load_foundation_model(path)
    assert isinstance(model, FoundationSwinUNETR) and not model.training
    assert model.architecture.feature_size == 12 and model.architecture.spacing_mm == 1.5
    assert all(torch.equal(v, tiny_state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "change, listed",
    [
        (lambda s: s.pop("decoder1.transp_conv.conv.weight"), "1 missing: decoder1.transp_conv.conv.weight"),
        (lambda s: s.update(extra_head=torch.zeros(1)), "1 unexpected: extra_head"),
        (lambda s: s.update({"encoder1.layer.conv1.conv.weight": torch.zeros(12, 1, 1, 1, 1)}), "1 mis-shaped: encoder1.layer.conv1.conv.weight"),
    ],
)
def test_load_foundation_model_strict(env, tmp_path, tiny_state, change, listed):
    state = dict(tiny_state)
    change(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=re.escape(listed)) as caught:
        load_foundation_model(path)
    assert str(path) in str(caught.value)


# ---------------------------------------------------------------- registry file and cache location


def test_shipped_registry():
    from FSEFTSegmentLib.registry_file import default_model, read_document

    document = read_document(registry.REGISTRY_FILE)
    assert default_model(document) == "fseft-mini"
    mini = registry.load_registry(registry.REGISTRY_FILE)["fseft-mini"]
    assert mini.bundled and mini.weights_path == registry.RESOURCES / "models" / "fseft-mini" / "fseft-mini.safetensors"
    entry = registry.load_registry(registry.REGISTRY_FILE)["fseft-swinunetr"]
    assert entry.files[0].url.endswith("id=18yLNxmWGnVifQNeYYwyyu56Cg4tWV9aW") and entry.files[0].filename == "fseft.pth"
    assert entry.architecture == Architecture() and len(entry.architecture.class_names) == 29
    assert entry.architecture.class_names[19] == "celiac_trunk" and entry.files[0].sha256 is None


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda m: m[0].pop("files"), "entry 0 ('a'): missing \"files\""),
        (lambda m: m[0]["files"][0].update(sha256="xyz"), "sha256 must be 64 hex digits"),
        (lambda m: m[0]["architecture"].update(window=[0, 1]), "unknown architecture field(s): window"),
        (lambda m: m[0]["architecture"].update(class_names=["x"]), "1 class_names for 29 out_channels"),
        (lambda m: m[0]["files"][0].update(filename="../x.pth"), "plain file name"),
        (lambda m: m.append(dict(m[0])), "entry 1 ('a'): duplicate name"),
        (lambda m: m[0]["files"][0].update(path="models/a/a.pth"), 'either "url" or "path"'),
        (lambda m: m[0]["files"][0].pop("url") and m[0]["files"][0].update(path="models/a/weights.pth"), "a bundled file needs its sha256"),
        (lambda m: m[0]["files"][0].pop("url") and m[0]["files"][0].update(path="../a.pth", filename="a.pth", sha256="0" * 64),
         "path must be relative to Resources/"),
    ],
)
def test_registry_validation(tmp_path, monkeypatch, mutate, problem):
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    models = [_entry("a", "https://example.org/a.pth")]
    mutate(models)
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": models}))
    with pytest.raises(ModelError, match=re.escape(problem)) as caught:
        registry.load_registry(path)
    assert str(caught.value).startswith(str(path))


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "c"))
    assert registry.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FSEFT_CACHE")
    monkeypatch.setattr(registry.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "fseft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry.cache_dir() == Path.home() / ".cache" / "fseft"
    monkeypatch.setattr(registry.sys, "platform", "darwin")
    assert registry.cache_dir() == Path.home() / "Library" / "Caches" / "fseft"
    monkeypatch.setattr(registry.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert registry.cache_dir() == tmp_path / "local" / "fseft"


# ---------------------------------------------------------------- bundled models


@pytest.fixture
def bundled(tmp_path, monkeypatch, tiny_state):
    """A private registry whose model `mini` ships inside a temporary Resources/ folder."""
    from safetensors.torch import save_file

    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "RESOURCES", tmp_path / "Resources")
    weights = tmp_path / "Resources" / "models" / "mini" / "mini.safetensors"
    weights.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(weights))
    entry = _entry("mini", "https://example.org/unused", registry.sha256_file(weights), feature_size=12)
    entry["files"][0] = {"path": "models/mini/mini.safetensors", "filename": "mini.safetensors", "sha256": registry.sha256_file(weights)}
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"default": "mini", "models": [entry]}))
    monkeypatch.setenv("FSEFT_REGISTRY", str(path))
    return weights


def test_bundled_model_loads_without_cache_or_download(bundled, tiny_state):
    rows = registry.list_models()
    assert [(row["name"], row["status"], row["path"]) for row in rows] == [("mini", "bundled", str(bundled))]
    network = load_foundation_model("mini")
    assert torch.equal(network.state_dict()["classifier.bias"], tiny_state["classifier.bias"])
    assert registry.model_sha256("mini") == registry.sha256_file(bundled)
    assert download.pull_model("mini") == bundled  # nothing to download
    assert not (registry.cache_dir() / "models" / "mini").exists()
    with pytest.raises(InputError, match="bundled"):
        registry.import_model(bundled, "mini")


def test_damaged_or_missing_bundled_model_is_refused(bundled):
    data = bytearray(bundled.read_bytes())
    data[-1] ^= 0xFF
    bundled.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="damaged") as caught:
        load_foundation_model("mini")
    assert str(bundled) in str(caught.value)
    bundled.unlink()
    with pytest.raises(ModelError, match="missing from this installation"):
        load_foundation_model("mini")
    assert registry.list_models()[0]["status"] == "bundled file missing"
