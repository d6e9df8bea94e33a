"""Saved adapters: listing, zip export and import, deletion.

One real adapter, made by `fseft adapt` with the tiny model, serves every test. Every refused zip
must end in one line on stderr, exit code 2, and leave the adapters folder exactly as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load, save

from conftest import TINY_ARCHITECTURE, fseft
from FSEFTSegmentLib import adapter_library as library
from FSEFTSegmentLib import adapters
from FSEFTSegmentLib.errors import InputError
from FSEFTSegmentLib.io.files import sha256_file
from synthetic import body_phantom

FILES = (library.METADATA_FILE, library.TENSORS_FILE)


@pytest.fixture(scope="module")
def made(environment, tmp_path_factory) -> Path:
    """A spatial-adapter for the liver on one phantom, one epoch of one crop (about 7 s)."""
    folder = tmp_path_factory.mktemp("made")
    image, organ = body_phantom()
    labels = sitk.GetImageFromArray(organ.astype(np.uint8))
    labels.CopyInformation(image)
    sitk.WriteImage(image, str(folder / "ct.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    out = folder / "liver"
    result = fseft(["adapt", "--model", "tiny-test", "--method", "spatial-adapter", "--support", str(folder / "ct.nii.gz"),
                    f"{folder / 'labels.nii.gz'}:1", "--structure", "liver", "--out", str(out), "--max-epochs", "1",
                    "--crops-per-step", "1", "--progress", "none"], environment)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def env(environment, tmp_path):
    """The test environment with its own adapters folder (`FSEFT_ADAPTERS`)."""
    return dict(environment, FSEFT_ADAPTERS=str(tmp_path / "home"))


def install(made: Path, root: Path, name: str = "liver") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(made, root / name))


def edit_metadata(folder: Path, **changes) -> None:
    path = folder / library.METADATA_FILE
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}), encoding="utf-8")


def one_error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fseft: error: "), result.stderr
    return lines[0]


def test_adapters_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FSEFT_ADAPTERS", str(tmp_path / "mine"))
    assert library.adapters_home() == tmp_path / "mine"
    monkeypatch.delenv("FSEFT_ADAPTERS")
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    assert library.adapters_home() == tmp_path / "cache" / "adapters"


def test_listing_export_and_metadata_need_no_torch(made, tmp_path):
    install(made, tmp_path / "home")
    code = f"""
import sys
from FSEFTSegmentLib import adapter_library as library
rows = library.list_adapters({str(tmp_path / 'home')!r})
library.adapters_table(rows, "home")
library.export_adapter(rows[0]["path"], {str(tmp_path / 'x.zip')!r})
assert library.read_zip_metadata({str(tmp_path / 'x.zip')!r})["method"] == "spatial-adapter"
assert "torch" not in sys.modules, "torch was imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_list_json_and_table(made, env, tmp_path):
    root = tmp_path / "lib"
    newer = install(made, root, "newer")
    older = install(made, root, "older")
    edit_metadata(older, created="2020-01-02T03:04:05+00:00", tune_decoder=True)
    (newer / "predictions").mkdir()
    (newer / "predictions" / "ct.seg.nrrd").write_bytes(b"x" * 1000)
    broken = root / "broken"
    broken.mkdir()
    (broken / library.METADATA_FILE).write_text("{", encoding="utf-8")
    (broken / library.TENSORS_FILE).write_bytes(b"")
    (root / "notes").mkdir()
    (root / "notes" / library.METADATA_FILE).write_text("{}", encoding="utf-8")  # no tensors: not an adapter
    shutil.copytree(made, root / ".liver.importing-0000")  # staging: never listed
    (root / "readme.txt").write_text("hello", encoding="utf-8")

    result = fseft(["adapters", "list", "--root", str(root), "--json"], env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    names = [row["name"] for row in rows]
    assert sorted(names) == ["broken", "newer", "older"] and names.index("newer") < names.index("older")
    assert all(list(row) == list(library.ROW_KEYS) for row in rows)
    metadata = json.loads((made / library.METADATA_FILE).read_text(encoding="utf-8"))
    row = rows[names.index("newer")]
    loss = metadata["training_curve"][-1]["loss"]
    assert row == {
        "path": str(newer), "name": "newer", "structures": ["Liver"], "method": "spatial-adapter", "tune_decoder": False,
        "k": 1, "base_model": "tiny-test", "base_sha256": metadata["base_model"]["sha256"], "created": metadata["created"],
        "size_bytes": sum(p.stat().st_size for p in newer.rglob("*") if p.is_file()),
        "trainable_parameters": metadata["trainable_parameters"], "epochs": 1, "loss": loss,
        "training_dice": round(1 - loss, 6), "size_prior": False, "error": None,
    }
    assert row["size_bytes"] > 1000 and rows[names.index("older")]["tune_decoder"] is True
    bad = rows[names.index("broken")]
    assert "adapter.json" in bad["error"] and bad["method"] is None and bad["structures"] == []

    result = fseft(["adapters", "list"], dict(env, FSEFT_ADAPTERS=str(root)))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "structures", "method", "K", "base", "model", "created", "size", "Dice", "loss"]
    line = next(line for line in lines if line.startswith("newer"))
    assert f"{1 - loss:.3f}" in line and f"{loss:.4f}" in line and metadata["created"][:10] in line and "tiny-test" in line
    assert "spatial-adapter+decoder" in next(line for line in lines if line.startswith("older"))
    assert "unreadable" in next(line for line in lines if line.startswith("broken"))
    assert fseft(["adapters", "list", "--root", str(tmp_path / "none")], env).stdout.startswith("no adapters in")


def test_export_import_round_trip(made, env, tmp_path):
    home = Path(env["FSEFT_ADAPTERS"])
    source = install(made, home)
    (source / "predictions").mkdir()
    (source / "predictions" / "ct.seg.nrrd").write_bytes(b"not exported")
    zip_path = tmp_path / "out" / "liver.zip"
    result = fseft(["adapters", "export", "liver", str(zip_path)], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(zip_path) and [p.name for p in zip_path.parent.iterdir()] == ["liver.zip"]
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == ["liver/adapter.json", "liver/adapter.safetensors"]

    root = tmp_path / "other"
    result = fseft(["adapters", "import", str(zip_path), "--root", str(root)], env)
    assert result.returncode == 0, result.stderr
    imported = Path(result.stdout.strip())
    assert imported == root / "liver" and sorted(p.name for p in root.iterdir()) == ["liver"]
    assert sorted(p.name for p in imported.iterdir()) == sorted(FILES)
    assert all((imported / name).read_bytes() == (made / name).read_bytes() for name in FILES)
    result = fseft(["adapters", "import", str(zip_path)], env)  # into FSEFT_ADAPTERS, where "liver" is taken
    assert result.returncode == 0 and Path(result.stdout.strip()) == home / "liver-2", result.stderr

    from FSEFTSegmentLib.model.checkpoint import build_from_checkpoint
    from FSEFTSegmentLib.model.network import Architecture

    checkpoint = Path(env["FSEFT_CACHE"]) / "models" / "tiny-test" / "tiny.pt"
    network = build_from_checkpoint(checkpoint, defaults=Architecture.from_dict(TINY_ARCHITECTURE))
    model, metadata = adapters.load_adapter(imported, network, sha256_file(checkpoint))
    with torch.inference_mode():
        assert model(torch.zeros(1, 1, 64, 64, 64)).shape == (1, 1, 64, 64, 64)


# ---------------------------------------------------------------- refused zips


def write_zip(path: Path, entries, compression=zipfile.ZIP_DEFLATED) -> Path:
    """A zip of (name or ZipInfo, bytes) entries, duplicates allowed."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression) as archive:
        warnings.simplefilter("ignore")  # "Duplicate name"
        for name, data in entries:
            archive.writestr(name, data)
    return path


def set_declared_size(path: Path, member: str, size: int) -> None:
    """Overwrite a member's uncompressed size in the central directory (what zipfile believes)."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # central directory entries start so
    while data[entry + 46 : entry + 46 + len(member)] != member.encode():
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 24 : entry + 28] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def with_tensors(good: dict, tensors: bytes, **changes) -> list:
    """The adapter's two members with other tensor bytes, and the metadata's sha256 made to fit them."""
    metadata = {**good["metadata"], "tensors_sha256": hashlib.sha256(tensors).hexdigest(), **changes}
    return [("liver/adapter.json", json.dumps(metadata).encode()), ("liver/adapter.safetensors", tensors)]


def with_metadata(good: dict, **changes) -> list:
    metadata = {key: value for key, value in {**good["metadata"], **changes}.items() if value is not None}
    return [("liver/adapter.json", json.dumps(metadata).encode()), ("liver/adapter.safetensors", good["tensors"])]


def extra_tensor(good: dict) -> bytes:
    tensors = load(good["tensors"])
    return save({**tensors, "head.9.weight": torch.zeros(2)})


def long_header(good: dict) -> bytes:
    return (2**40).to_bytes(8, "little") + good["tensors"][8:]


# (id, entries built from the good adapter, fragment of the error)
CASES = [
    ("empty", lambda g: [], "empty zip"),
    ("extra member", lambda g: [*g["entries"], ("liver/predictions/ct.seg.nrrd", b"x")], "not an adapter zip"),
    ("missing tensors", lambda g: g["entries"][:1], "not an adapter zip"),
    ("duplicate member", lambda g: [*g["entries"], g["entries"][0]], "not an adapter zip"),
    ("two folders", lambda g: [("a/adapter.json", g["json"]), ("b/adapter.safetensors", g["tensors"])], "not an adapter zip"),
    ("nested", lambda g: [("a/liver/adapter.json", g["json"]), ("a/liver/adapter.safetensors", g["tensors"])], "not an adapter zip"),
    ("another folder", lambda g: [*g["entries"], ("other/", b"")], "also holds other/"),
    ("absolute", lambda g: [("/tmp/liver/adapter.json", g["json"]), ("/tmp/liver/adapter.safetensors", g["tensors"])], "an absolute path"),
    ("dot-dot", lambda g: [("../liver/adapter.json", g["json"]), ("../liver/adapter.safetensors", g["tensors"])], "'..'"),
    ("backslash", lambda g: [("liver\\adapter.json", g["json"]), ("liver\\adapter.safetensors", g["tensors"])], "a backslash"),
    ("drive letter", lambda g: [("C:/adapter.json", g["json"]), ("C:/adapter.safetensors", g["tensors"])], "a drive letter"),
    ("symlink", lambda g: [g["entries"][0], (symlink("liver/adapter.safetensors"), b"../../etc/passwd")], "symbolic link"),
    ("metadata too large", lambda g: [("liver/adapter.json", g["json"] + b" " * 2**20), g["entries"][1]], "more than the 1048576"),
    ("zip bomb", lambda g: with_tensors(g, g["tensors"] + bytes(8 * 2**20)), "zip bomb"),
    ("not json", lambda g: [("liver/adapter.json", b"{not json"), g["entries"][1]], "not valid JSON"),
    ("no base model", lambda g: with_metadata(g, base_model=None), '"base_model"'),
    ("no tensors sha256", lambda g: with_metadata(g, tensors_sha256=None), '"tensors_sha256"'),
    ("header length", lambda g: with_tensors(g, long_header(g)), "header length"),
    ("offsets leave bytes", lambda g: with_tensors(g, g["tensors"] + b"\0\0\0\0"), "cover"),
    ("tensors changed", lambda g: [g["entries"][0], ("liver/adapter.safetensors", g["tensors"][:-1] + b"\x7f")], "does not match the sha256"),
    ("unknown method", lambda g: with_metadata(g, method="magic"), "unknown method 'magic'"),
    ("other base model", lambda g: with_metadata(g, base_model={"name": "other-net", "sha256": "0" * 64}), "made for another base model: other-net"),
    ("tensors of another method", lambda g: with_tensors(g, extra_tensor(g)), "1 unexpected: head.9.weight"),
]


@pytest.fixture(scope="module")
def good(made) -> dict:
    json_bytes, tensors = ((made / name).read_bytes() for name in FILES)
    return {
        "json": json_bytes,
        "tensors": tensors,
        "metadata": json.loads(json_bytes),
        "entries": [("liver/adapter.json", json_bytes), ("liver/adapter.safetensors", tensors)],
    }


def test_refused_zips(good, env, tmp_path):
    """Each tampering refused in one line naming the zip, exit 2, nothing written (one process each)."""
    root = tmp_path / "root"
    root.mkdir()
    zips = [(case, write_zip(tmp_path / f"case-{number}.zip", build(good)), fragment) for number, (case, build, fragment) in enumerate(CASES)]
    not_zip = tmp_path / "not-a-zip.zip"
    not_zip.write_text("hello", encoding="utf-8")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(write_zip(tmp_path / "whole.zip", good["entries"]).read_bytes()[:-40])
    lying = write_zip(tmp_path / "lying.zip", good["entries"], zipfile.ZIP_STORED)
    set_declared_size(lying, "liver/adapter.json", len(good["json"]) + 10)
    zips += [("not a zip", not_zip, "not a zip file"), ("truncated", truncated, "truncated"), ("declared size lies", lying, "not the")]
    for case, zip_path, fragment in zips:
        line = one_error_line(fseft(["adapters", "import", str(zip_path), "--root", str(root)], env))
        assert line.startswith(f"fseft: error: {zip_path}") and fragment in line, (case, line)
        assert list(root.iterdir()) == [], case


def test_metadata_of_a_zip(good, tmp_path):
    assert library.read_zip_metadata(write_zip(tmp_path / "at-root.zip", [("adapter.json", good["json"]), ("adapter.safetensors", good["tensors"])])) == good["metadata"]
    with pytest.raises(InputError, match="symbolic link"):
        library.read_zip_metadata(write_zip(tmp_path / "bad.zip", [good["entries"][0], (symlink("liver/adapter.safetensors"), b"x")]))


class DiskFull:
    """A file whose writes fail halfway, as on a full disk."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.stream.close()

    def write(self, data):
        self.stream.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.mark.parametrize("failure", ["write", "rename"])
def test_failed_import_leaves_nothing(good, env, tmp_path, monkeypatch, failure):
    for key in ("FSEFT_CACHE", "FSEFT_REGISTRY"):
        monkeypatch.setenv(key, env[key])
    zip_path = write_zip(tmp_path / "liver.zip", good["entries"])
    root = tmp_path / "root"
    root.mkdir()

    def failing_open(path, mode):
        return DiskFull(open(path, mode)) if Path(path).name == library.TENSORS_FILE else open(path, mode)

    def refuse(*args):
        raise OSError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:
        if failure == "write":
            patch.setattr(library, "open", failing_open, raising=False)
        else:
            patch.setattr(library, "_install_unique", refuse)
        with pytest.raises(InputError) as caught:
            library.import_adapter(zip_path, root)
    message = str(caught.value)
    assert caught.value.exit_code == 2 and message.startswith(f"{root}: cannot write the adapter") and "\n" not in message
    assert list(root.iterdir()) == []
    assert library.import_adapter(zip_path, root) == root / "liver"  # the same zip, once the disk has room


# ---------------------------------------------------------------- export and delete refusals


def test_export_refusals(made, env, tmp_path, monkeypatch):
    monkeypatch.setenv("FSEFT_ADAPTERS", env["FSEFT_ADAPTERS"])
    source = install(made, Path(env["FSEFT_ADAPTERS"]))
    with pytest.raises(InputError, match="no such adapter"):
        library.export_adapter("missing", tmp_path / "x.zip")
    with pytest.raises(InputError, match="not an adapter folder"):
        library.export_adapter(tmp_path, tmp_path / "x.zip")
    with pytest.raises(InputError, match="is a folder"):
        library.export_adapter("liver", tmp_path)
    tensors = source / library.TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-1] + b"\x7f")
    with pytest.raises(InputError, match="changed or damaged"):
        library.export_adapter("liver", tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


def test_delete(made, env, tmp_path):
    root = tmp_path / "lib"
    install(made, root)
    outside = install(made, tmp_path / "elsewhere")
    (root / "notes").mkdir()
    for target, fragment in ((str(root / "notes"), "not an adapter folder"), (str(outside), "not an adapter in"),
                             ("missing", "no such adapter"), (str(root / "notes" / ".." / ".." / "elsewhere" / "liver"), "not an adapter in")):
        assert fragment in one_error_line(fseft(["adapters", "delete", target, "--root", str(root)], env))
    assert outside.is_dir() and (root / "notes").is_dir()
    result = fseft(["adapters", "delete", "liver", "--root", str(root)], env)
    assert result.returncode == 0 and result.stdout.strip() == f"deleted {root / 'liver'}", result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["notes"]
