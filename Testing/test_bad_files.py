"""Every file a user hands the engine, spoiled every way a file gets spoiled: one line naming it, no traceback,
a non-zero exit, no partial output.

Inputs: the model (.pt and .safetensors), an adapter folder (its JSON and its tensors), an adapter zip, a
support image and its labels, a study image, a study list (.txt and .csv), a DICOM folder, the pretraining and
experiment configs, and the two inputs of `fseft evaluate`. Spoils: empty, truncated, random bytes, a file of
another format under the right extension, a folder in the file's place, and (as a user without the right)
unreadable permissions. Outputs: a folder that cannot be created, and a full disk (a 64 KiB tmpfs, or an
ENOSPC at write where no tmpfs can be mounted). The CLI runs in this process (`main`), so a test costs its
reading alone."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from synthetic import body_phantom

from FSEFTSegmentLib.cli import main

PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)
FAST = ["--max-epochs", "1", "--crops-per-step", "1", "--progress", "none"]


def spoil(good: Path, bad: Path, how: str) -> Path:
    """`bad` made from `good` the way `how` says; returns `bad`."""
    data = good.read_bytes() if good.is_file() else b""
    bad.parent.mkdir(parents=True, exist_ok=True)
    if how == "folder":
        bad.mkdir()
        return bad
    bad.write_bytes({
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(7).bytes(4096),
        "other-format": PNG,
    }[how])
    return bad


SPOILS = ("empty", "truncated", "random", "other-format", "folder")


@pytest.fixture(scope="module")
def files(tmp_path_factory, environment_module):
    """Good inputs of every kind: a CT and its labels, the tiny model as .pt and .safetensors, an adapter folder
    and zip, a study list, a DICOM series, an evaluation pair."""
    from safetensors.torch import save_file

    from FSEFTSegmentLib.model.checkpoint import read_tensors

    root = tmp_path_factory.mktemp("good")
    image, organ = body_phantom(size=(60, 56, 40), spacing=(1.5, 1.5, 3.0))
    labels = sitk.GetImageFromArray(organ.astype(np.uint8) * 3)
    labels.CopyInformation(image)
    good = {"image": root / "ct.nii.gz", "labels": root / "labels.nii.gz"}
    sitk.WriteImage(image, str(good["image"]))
    sitk.WriteImage(labels, str(good["labels"]))
    good["model"] = Path(environment_module["FSEFT_CACHE"]).parent / "tiny.pt"
    good["safetensors"] = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in read_tensors(good["model"]).items()}, str(good["safetensors"]))
    good["adapter"] = root / "adapter"
    assert main(["adapt", "--model", "tiny-test", "--method", "linear-probe", "--support", str(good["image"]), f"{good['labels']}:3",
                 "--structure", "liver", "--out", str(good["adapter"]), *FAST]) == 0
    good["zip"] = root / "adapter.zip"
    assert main(["adapters", "export", str(good["adapter"]), str(good["zip"])]) == 0
    good["txt"] = root / "studies.txt"
    good["txt"].write_text(f"{good['image']}\n")
    good["csv"] = root / "studies.csv"
    good["csv"].write_text(f"id,image\ncase,{good['image']}\n")
    good["dicom"] = root / "dicom"
    from synthetic import write_dicom_series

    write_dicom_series(sitk.Cast(image, sitk.sitkInt16), good["dicom"], "1.2.826.0.1.3680043.2.1125.2.101")
    good["pretrain.yaml"] = root / "pretrain.yaml"
    shutil.copy(Path(__file__).parents[1] / "Resources" / "pretraining" / "fseft-mini.yaml", good["pretrain.yaml"])
    good["experiment.yaml"] = root / "experiment.yaml"
    shutil.copy(Path(__file__).parents[1] / "Resources" / "experiments" / "phantom.yaml", good["experiment.yaml"])
    return good


@pytest.fixture(scope="module")
def environment_module(environment):
    """The tiny-test registry and cache for the in-process CLI."""
    saved = {key: os.environ.get(key) for key in ("FSEFT_CACHE", "FSEFT_REGISTRY")}
    os.environ.update(FSEFT_CACHE=environment["FSEFT_CACHE"], FSEFT_REGISTRY=environment["FSEFT_REGISTRY"])
    yield environment
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def one_line_error(capsys, code: int, name: str) -> str:
    """The run failed with exactly one `fseft: error:` line that names `name`; returns it."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("fseft: error: ")]
    assert code != 0, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert name in lines[0], lines[0]
    return lines[0]


def nothing_written(folder: Path) -> None:
    written = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    assert not written, written


# (input kind, the command with {bad} in the place of that input, the good file spoiled)
COMMANDS = {
    "model.pt": (["predict", "--model", "{bad}", "{image}", "--out", "{out}"], "model", "tiny.pt"),
    "model.safetensors": (["predict", "--model", "{bad}", "{image}", "--out", "{out}"], "safetensors", "tiny.safetensors"),
    "study image": (["predict", "--model", "tiny-test", "{bad}", "--out", "{out}"], "image", "study.nii.gz"),
    "study list .txt": (["predict", "--model", "tiny-test", "{bad}", "--out", "{out}"], "txt", "studies.txt"),
    "study list .csv": (["predict", "--model", "tiny-test", "{bad}", "--out", "{out}"], "csv", "studies.csv"),
    "support image": (["adapt", "--model", "tiny-test", "--method", "linear-probe", "--support", "{bad}", "{labels}:3",
                       "--structure", "liver", "--out", "{out}", *FAST], "image", "support.nii.gz"),
    "support labels": (["adapt", "--model", "tiny-test", "--method", "linear-probe", "--support", "{image}", "{bad}:3",
                        "--structure", "liver", "--out", "{out}", *FAST], "labels", "support-labels.nii.gz"),
    "adapter zip": (["adapters", "import", "{bad}", "--root", "{out}"], "zip", "adapter.zip"),
    "pretraining config": (["pretrain", "--config", "{bad}"], "pretrain.yaml", "pretrain.yaml"),
    "experiment config": (["experiment", "--config", "{bad}", "--out", "{out}"], "experiment.yaml", "experiment.yaml"),
    "evaluation prediction": (["evaluate", "--pred", "{bad}", "--ref", "{labels}", "--structure", "liver=3"], "labels", "pred.nii.gz"),
    "evaluation reference": (["evaluate", "--pred", "{labels}", "--ref", "{bad}", "--structure", "liver=3"], "labels", "ref.nii.gz"),
}


def argv(template: list[str], files: dict, **values) -> list[str]:
    return [part.format(image=files["image"], labels=files["labels"], **values) for part in template]


@pytest.mark.parametrize("how", SPOILS)
@pytest.mark.parametrize("kind", list(COMMANDS))
def test_a_spoiled_input_fails_in_one_line_naming_it(files, capsys, tmp_path, kind, how):
    template, good, name = COMMANDS[kind]
    if kind.startswith("study list") and how == "other-format":
        pytest.skip("any bytes a study list holds are study paths: covered by 'random'")
    bad = spoil(files[good], tmp_path / "bad" / name, how)
    out = tmp_path / "out"
    code = main(argv(template, files, bad=bad, out=out))
    one_line_error(capsys, code, name)
    nothing_written(out)


@pytest.mark.parametrize("part", ["adapter.json", "adapter.safetensors"])
@pytest.mark.parametrize("how", SPOILS)
def test_a_spoiled_adapter_folder_fails_in_one_line_naming_it(files, capsys, tmp_path, part, how):
    adapter = tmp_path / "adapter"
    shutil.copytree(files["adapter"], adapter)
    (adapter / part).unlink()
    spoil(files["adapter"] / part, adapter / part, how)
    out = tmp_path / "out"
    code = main(["predict", "--adapter", str(adapter), str(files["image"]), "--out", str(out)])
    one_line_error(capsys, code, "adapter")
    nothing_written(out)


@pytest.mark.parametrize("how", ["empty-folder", "a-file", "missing"])
def test_an_adapter_that_is_no_adapter_folder_is_named(files, capsys, tmp_path, how):
    adapter = tmp_path / "adapter"
    if how == "empty-folder":
        adapter.mkdir()
    elif how == "a-file":
        adapter.write_text("not a folder")
    code = main(["predict", "--adapter", str(adapter), str(files["image"]), "--out", str(tmp_path / "out")])
    one_line_error(capsys, code, str(adapter))
    nothing_written(tmp_path / "out")


@pytest.mark.parametrize("how", ["random", "truncated", "text", "empty-folder"])
def test_a_spoiled_dicom_folder_fails_in_one_line_naming_it(files, capsys, tmp_path, how):
    folder = tmp_path / "series"
    if how == "empty-folder":
        folder.mkdir()
    elif how == "truncated":
        shutil.copytree(files["dicom"], folder)
        for path in sorted(folder.iterdir()):
            path.write_bytes(path.read_bytes()[:300])
    else:
        folder.mkdir()
        for n in range(3):
            (folder / f"slice{n}.dcm").write_bytes(np.random.default_rng(n).bytes(2048) if how == "random" else b"not dicom\n")
    code = main(["predict", "--model", "tiny-test", str(folder), "--out", str(tmp_path / "out")])
    one_line_error(capsys, code, "series")
    nothing_written(tmp_path / "out")


# ------------------------------------------------------------------------------ outputs


OUTPUTS = {
    "predict": ["predict", "--model", "tiny-test", "{image}", "--out", "{out}"],
    "adapt": ["adapt", "--model", "tiny-test", "--method", "linear-probe", "--support", "{image}", "{labels}:3", "--structure",
              "liver", "--out", "{out}", *FAST],
    "evaluate --json": ["evaluate", "--pred", "{labels}", "--ref", "{labels}", "--structure", "liver=3", "--json", "{out}/scores.json"],
    "adapters export": ["adapters", "export", "{adapter}", "{out}/adapter.zip"],
}


@pytest.mark.parametrize("command", list(OUTPUTS))
def test_an_output_folder_that_cannot_be_created_is_named(files, capsys, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    out = blocker / "results"
    code = main([part.format(image=files["image"], labels=files["labels"], adapter=files["adapter"], out=out) for part in OUTPUTS[command]])
    line = one_line_error(capsys, code, str(blocker))
    assert "ct.nii.gz" not in line  # the output is at fault, not the input


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a 64 KiB tmpfs (a really full disk), or else a folder where every write ends in ENOSPC."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                                                    capture_output=True, check=False).returncode == 0
    if not mounted:
        import FSEFTSegmentLib.io.files as io_files

        def no_space(source, target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

        monkeypatch.setattr(io_files.os, "replace", no_space)
    if mounted:  # leave about 2 KiB: smaller than any result, so every writer meets the full disk
        (folder / "filler").write_bytes(bytes(os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize - 2048))
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("command", ["predict", "adapt"])
def test_a_full_disk_fails_in_one_line_and_leaves_no_partial_output(files, capsys, full_disk, command):
    out = full_disk / "results"
    code = main([part.format(image=files["image"], labels=files["labels"], adapter=files["adapter"], out=out) for part in OUTPUTS[command]])
    line = one_line_error(capsys, code, str(full_disk))
    assert "No space left on device" in line, line
    nothing_written(out)
    assert {p.name for p in full_disk.iterdir()} <= {"filler", "results"}  # no staging folder or temporary file left


#: as root, permissions stop no read: the CLI then runs without the capabilities that override them
AS_USER = (["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
           if hasattr(os, "geteuid") and os.geteuid() == 0 else [])


@pytest.mark.skipif(AS_USER and not shutil.which("setpriv"), reason="as root, an unreadable file needs util-linux setpriv")
@pytest.mark.parametrize("kind", ["model.pt", "study image", "experiment config", "pretraining config", "evaluation reference"])
def test_an_unreadable_input_is_named(files, environment_module, tmp_path, kind):
    template, good, name = COMMANDS[kind]
    bad = tmp_path / name
    shutil.copy(files[good], bad)
    os.chmod(bad, 0)
    result = subprocess.run([*AS_USER, sys.executable, "-m", "FSEFTSegmentLib", *argv(template, files, bad=bad, out=tmp_path / "out")],
                            env=dict(os.environ), capture_output=True, text=True, timeout=300, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fseft: error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert name in errors[0] and "permission" in errors[0].lower(), errors[0]
    nothing_written(tmp_path / "out")


def test_the_zip_reader_is_not_fooled_by_a_zip_of_something_else(files, capsys, tmp_path):
    bad = tmp_path / "other.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("notes.txt", "hello")
    code = main(["adapters", "import", str(bad), "--root", str(tmp_path / "root")])
    one_line_error(capsys, code, "other.zip")
    nothing_written(tmp_path / "root")
