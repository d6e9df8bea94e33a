"""`fseft demo --quick` end to end, as a user runs it: the bundled model, real training, real files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import SimpleITK as sitk
import slicerio
from conftest import ROOT

from FSEFTSegmentLib.demo import QUICK, VARIANTS
from FSEFTSegmentLib.methods.summary import method_summaries
from FSEFTSegmentLib.model.registry import load_registry
from FSEFTSegmentLib.registry_file import REGISTRY_FILE, default_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def demo(args, tmp_path):
    """`fseft demo ARGS` against the extension's own registry (the `environment` fixture's private
    one has no bundled model), with a private cache so nothing of the user's is touched."""
    env = {key: value for key, value in os.environ.items() if key != "FSEFT_REGISTRY"}
    env.update(FSEFT_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "FSEFTSegmentLib", "demo", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One quick demo run shared by the tests below: (output folder, completed process, seconds)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    out = tmp_path / "demo-out"
    started = time.monotonic()
    result = demo(["--quick", "--out", str(out), "--progress", "none"], tmp_path)
    assert result.returncode == 0, result.stderr
    return out, result, time.monotonic() - started


def table_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """The printed table as {(method, K): cells after the method name}."""
    rows = {}
    for line in stdout.splitlines():
        for label in [variant.label for variant in VARIANTS] + ["zero-shot (no adaptation)"]:
            if line.startswith(label + "  "):
                cells = line[len(label) :].split()
                rows[(label, cells[0])] = cells
    return rows


def test_quick_demo_prints_one_row_per_method_and_k(quick_demo):
    _, result, seconds = quick_demo
    print(f"fseft demo --quick took {seconds:.0f} s")
    rows = table_rows(result.stdout)
    expected = {(variant.label, str(k)) for variant in VARIANTS for k in QUICK.shots} | {("zero-shot (no adaptation)", "-")}
    assert set(rows) == expected
    header = next(line for line in result.stdout.splitlines() if line.startswith("method "))
    assert "Dice spleen (known)" in header and "Dice bone (novel)" in header  # bone: no fseft-mini output
    architecture = load_registry(REGISTRY_FILE)[default_model()].architecture
    trainable = {row["method"]: row["trainable_parameters"] for row in method_summaries(architecture, structures=2)}
    for (label, _), (k, count, epochs, seconds_cell, *dice) in rows.items():
        if label.startswith("zero-shot"):
            assert (count, dice[1]) == ("0", "-") and 0.0 <= float(dice[0]) <= 1.0
            continue
        method = next(variant.method for variant in VARIANTS if variant.label == label)
        assert int(count.replace(",", "")) == trainable[method]
        assert int(epochs) >= 1 and float(seconds_cell) >= 0  # a cached head step can round to 0.0 s
        assert all(0.0 <= float(value) <= 1.0 for value in dice)
    assert "short demo schedules" in result.stdout


def test_quick_demo_names_its_folder_at_the_end(quick_demo):
    out, result, _ = quick_demo
    last = result.stdout.strip().splitlines()[-1]
    assert last.endswith(str(out)) and out.is_dir()


def test_quick_demo_writes_predictions_slicer_opens(quick_demo):
    out, _, _ = quick_demo
    query = sitk.ReadImage(str(out / "phantoms" / "query-1.nii.gz"))
    folders = [f"{variant.slug}-k{k}" for variant in VARIANTS for k in QUICK.shots]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(folders + ["zero-shot"])
    for folder in folders:
        path = out / "predictions" / folder / "query-1.seg.nrrd"
        segmentation = slicerio.read_segmentation(str(path))
        assert [segment["id"] for segment in segmentation["segments"]] == ["spleen", "bone"]
        assert sitk.ReadImage(str(path)).GetSize()[:3] == query.GetSize()
    zero_shot = slicerio.read_segmentation(str(out / "predictions" / "zero-shot" / "query-1.seg.nrrd"))
    assert [segment["id"] for segment in zero_shot["segments"]] == ["spleen"]
    for name in ("support-1", "support-2", "query-1"):  # the phantoms, to open beside the predictions
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "phantoms" / f"{name}.labels.nii.gz")))
        assert {1, 23} <= set(labels.ravel().tolist())


def test_quick_demo_writes_report_and_results(quick_demo):
    out, _, _ = quick_demo
    report = (out / "report.png").read_bytes()
    assert report.startswith(PNG_SIGNATURE) and len(report) > 20_000
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["model"] == default_model() and results["plan"]["quick"]
    assert [s["known"] for s in results["structures"]] == [True, False]
    assert len(results["runs"]) == len(VARIANTS) * len(QUICK.shots)
    for run in results["runs"]:
        assert len(run["curve"]) == run["epochs"]
        assert all(math.isfinite(entry["loss"]) for entry in run["curve"])
        for scores in run["dice"].values():
            assert len(scores) == QUICK.queries and all(0.0 <= score <= 1.0 for score in scores)
    assert not list(out.rglob(".tmp-*"))  # every file was renamed into place


def test_demo_refuses_a_folder_with_other_files(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    result = demo(["--quick", "--out", str(out)], tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "choose a new --out" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_cancelled_demo_leaves_nothing_behind(tmp_path):
    """SIGTERM once the phantoms are written: no output folder, no staging folder, a one-line message."""
    env = {key: value for key, value in os.environ.items() if key != "FSEFT_REGISTRY"}
    env.update(FSEFT_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "FSEFTSegmentLib", "demo", "--quick", "--out", str(out), "--progress", "none"]
    with subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".out.*.partial/phantoms/query-1.labels.nii.gz")) and run.poll() is None:
            assert time.monotonic() < deadline, "the demo never wrote its phantoms"
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["fseft: cancelled; no partial output was written"]
    assert list(tmp_path.iterdir()) == []  # the bundled model needs no cache either


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_then_runs_the_demo():
    # --no-print-directory: under `make test` the nested make would add "Leaving directory" lines
    result = subprocess.run(["make", "--no-print-directory", "-n", "demo"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == ".venv/bin/fseft demo"
