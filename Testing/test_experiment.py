"""`fseft experiment`: the shipped configs, bad input before any work, the grid's keys and draws, a real phantom
experiment that is interrupted, resumed and rerun, the cached black-box prediction against `fseft predict`'s, and
a torchrun split over 2 CPU processes against one process."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from FSEFTSegmentLib.cli import main
from FSEFTSegmentLib.experiment.config import MethodSpec, load_config, parse_config
from FSEFTSegmentLib.experiment.grid import draw_supports, plan_runs, rank_share
from FSEFTSegmentLib.experiment.report import run_value

CONFIGS = ROOT / "Resources" / "experiments"
PHANTOM = CONFIGS / "phantom.yaml"
#: the part of the phantom config the suite runs (about a minute on 2 cores): 13 runs
SUITE_PART = ["--tasks", "spleen", "--shots", "1,5", "--draws", "0,1", "--methods", "zero-shot,linear-probe,spatial-adapter+size-prior,lora"]
BASE_ORGANS = ["spleen", "kidney_left", "gallbladder", "esophagus", "liver", "pancreas", "stomach", "duodenum", "aorta"]


def fseft(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, against the extension's own registry (bundled fseft-mini), a private cache."""
    return subprocess.run([sys.executable, "-m", "FSEFTSegmentLib", *args], env=_env(cwd), cwd=cwd, capture_output=True,
                          text=True, encoding="utf-8", timeout=900, check=False, **kwargs)


def _env(cwd: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "FSEFT_REGISTRY"}
    env.update(FSEFT_CACHE=str(cwd / "cache"), PYTHONUNBUFFERED="1")
    return env


def records(out: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in (out / "runs").glob("*.json")}


# ------------------------------------------------------------------------------ shipped configs


def touch_cases(root: Path, cases: list[str], files: list[str]) -> None:
    """A data tree of empty files: the config checks that every named file exists, before reading any."""
    for case in cases:
        for template in files:
            path = root / template.format(case=case)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()


def test_the_totalsegmentator_configs_give_the_papers_splits_and_grid(tmp_path, monkeypatch):
    base, novel = (yaml.safe_load((CONFIGS / f"totalsegmentator-{part}.yaml").read_text(encoding="utf-8")) for part in ("base", "novel"))
    structures = sorted({s for config in (base, novel) for task in config["tasks"] for s in task["structures"]})
    touch_cases(tmp_path, [f"s{n:04d}" for n in range(46)], ["{case}/ct.nii.gz"] + [f"{{case}}/segmentations/{s}.nii.gz" for s in structures])
    monkeypatch.setenv("TOTALSEGMENTATOR", str(tmp_path))
    config = load_config(CONFIGS / "totalsegmentator-base.yaml")
    assert [t.name for t in config.tasks] == BASE_ORGANS
    for task in config.tasks:
        assert (len(task.train), len(task.test)) == ((29, 5) if task.name == "pancreas" else (30, 5))
        assert not set(task.train) & set(task.test)
    runs, notes = plan_runs(config, known=set(BASE_ORGANS))
    assert not notes
    # per task: zero-shot once; 9 methods x (K = 1, 5, 10 with 3 draws + K = 30, which is the pool or more: 1 run)
    pancreas = [r for r in runs if r.task.name == "pancreas" and r.method.label == "lora" and r.k == 30]
    assert len(runs) == 9 * (1 + 9 * 10) and len(pancreas) == 1 and len(pancreas[0].supports) == 28  # 29 cases: one validates
    spleen_30 = [r for r in runs if r.task.name == "spleen" and r.method.label == "lora" and r.k == 30]
    assert len(spleen_30) == 1 and len(spleen_30[0].supports) == 29  # the paper's "30-shot" trains on 29

    config = load_config(CONFIGS / "totalsegmentator-novel.yaml")
    assert {t.group for t in config.tasks} == {"lung", "heart", "gluteus"} and len(config.tasks) == 16
    assert all(t.structures[0].index == -1 for t in config.tasks)  # novel: no template row, no zero-shot
    assert {(t.group, len(t.train)) for t in config.tasks} == {("lung", 30), ("heart", 35), ("gluteus", 41)}


def test_the_flare22_config_adapts_nine_organs_together(tmp_path, monkeypatch):
    values = yaml.safe_load((CONFIGS / "flare22.yaml").read_text(encoding="utf-8"))
    task = values["tasks"][0]
    touch_cases(tmp_path, task["train"] + task["test"], ["images/{case}_0000.nii.gz", "labels/{case}.nii.gz"])
    monkeypatch.setenv("FLARE22", str(tmp_path))
    config = load_config(CONFIGS / "flare22.yaml")
    (task,) = config.tasks
    assert [s.name for s in task.structures] == BASE_ORGANS and len(task.train) == 50 and len(task.test) == 22
    assert dict(zip([s.name for s in task.structures], task.selectors))["liver"] == "1"
    assert config.scoring.largest_component is False


# ------------------------------------------------------------------------------ bad input


def folder_config(tmp_path: Path, **changes) -> Path:
    """A folder-layout config over 8 cases of empty files, changed by `changes`, written to a file."""
    touch_cases(tmp_path / "data", [f"c{n}" for n in range(8)], ["{case}.nii.gz", "{case}.labels.nii.gz"])
    values = {
        "name": "bad", "data": {"root": "data", "image": "{case}.nii.gz", "labels": "{case}.labels.nii.gz"},
        "tasks": [{"name": "spleen", "structures": {"spleen": 1}, "train": ["c0", "c1", "c2", "c3"], "test": ["c6", "c7"]}],
        "shots": [1, 2], "methods": ["linear-probe"],
    }
    for key, value in changes.items():
        target, _, field = key.rpartition(".")
        (values["tasks"][0] if target == "task" else values)[field] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"task.train": ["c0", "c1", "c9"]}, "case 'c9' is not among the data's cases"),
    ({"methods": ["linear-probe", "lora2"]}, "unknown method 'lora2'"),
    ({"methods": ["spatial-adapter+decoder+size-prior"]}, "the size prior needs a black-box method"),
    ({"task.structures": {"spleeen": 1}}, "unknown structure 'spleeen' (did you mean 'spleen'?)"),
    ({"task.test": ["c3", "c7"]}, "case 'c3' is also a training case"),
    ({"shots": [1, 5]}, "K = 5 is larger than the training pool of task 'spleen' (4 cases)"),
    ({"training": {"max_epoch": 3}}, "'training.max_epoch': unknown setting"),
    ({"training": {"seed": 3}}, "'training.seed': is set per run by the harness"),
    ({"data": {"root": "${NO_SUCH_FSEFT_VARIABLE}", "image": "{case}.nii.gz", "labels": "{case}.labels.nii.gz"}},
     "the environment variable NO_SUCH_FSEFT_VARIABLE is not set"),
    ({"tables": 1}, "'tables': unknown key"),
])
def test_bad_configs_fail_with_one_line_before_any_work(tmp_path, capsys, changes, message):
    config = folder_config(tmp_path, **changes)
    out = tmp_path / "out"
    assert main(["experiment", "--config", str(config), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(config) in error and len(error.strip().splitlines()) == 1, error
    assert not out.exists()


def test_a_missing_case_file_is_named(tmp_path, capsys):
    config = folder_config(tmp_path)
    (tmp_path / "data" / "c2.labels.nii.gz").unlink()
    assert main(["experiment", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(f"case 'c2': no such file {tmp_path / 'data' / 'c2.labels.nii.gz'}") and "\n" not in error


def test_a_run_that_fails_on_its_data_names_the_run_and_the_file(tmp_path, capsys):
    """A test case whose label lacks the structure: found when the run reads it, one line, exit 2."""
    import SimpleITK as sitk

    from FSEFTSegmentLib.pretraining.phantoms import phantom_dataset

    data = tmp_path / "data"
    data.mkdir()
    for n, (image, labels) in enumerate(phantom_dataset(3, 0, size=(64, 64, 48))):
        sitk.WriteImage(image, str(data / f"c{n}.nii.gz"))
        sitk.WriteImage(labels * 0 if n == 2 else labels, str(data / f"c{n}.labels.nii.gz"))
    config = tmp_path / "empty.yaml"
    config.write_text(encoding="utf-8", data=yaml.safe_dump({
        "model": "fseft-mini", "data": {"root": "data", "image": "{case}.nii.gz", "labels": "{case}.labels.nii.gz"},
        "tasks": [{"name": "spleen", "structures": {"spleen": 1}, "train": ["c0", "c1"], "test": ["c2"]}],
        "shots": [1], "draws": [0], "methods": ["linear-probe"], "training": {"max_epochs": 1}}))
    assert main(["experiment", "--config", str(config), "--out", str(tmp_path / "out"), "--progress", "none"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fseft: error: spleen / linear-probe / K=1 / draw 0: ") and "\n" not in error, error
    assert f"{data / 'c2.labels.nii.gz'}: has no voxel with label 1" in error and error.endswith("(0 finished run(s) are kept)")
    assert not list((tmp_path / "out").rglob("*.json"))


def test_narrowing_to_something_the_config_lacks_is_refused(tmp_path, capsys):
    config = folder_config(tmp_path)
    assert main(["experiment", "--config", str(config), "--methods", "lora", "--out", str(tmp_path / "out")]) == 2
    assert "--methods lora: not in the config (it has linear-probe)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the grid


def test_draws_are_nested_across_k_and_the_whole_pool_keeps_one_case_to_validate():
    pool = tuple(f"c{n:02d}" for n in range(30))
    one, five, ten = (draw_supports(pool, k, seed=1) for k in (1, 5, 10))
    assert five[0][:1] == one[0] and ten[0][:5] == five[0] and ten[1] not in ten[0]
    assert draw_supports(pool, 5, seed=2)[0] != five[0]
    assert draw_supports(tuple(reversed(pool)), 5, seed=1) == five  # the pool's listing order does not matter
    supports, validation = draw_supports(pool, 30, seed=0)
    assert len(supports) == 29 and validation not in supports and set(supports) | {validation} == set(pool)


def test_changing_the_config_changes_exactly_the_keys_of_the_runs_it_changes():
    values = yaml.safe_load(PHANTOM.read_text(encoding="utf-8"))
    config = parse_config(copy.deepcopy(values), PHANTOM)
    values["method_training"]["lora"]["max_epochs"] = 3
    changed = parse_config(values, PHANTOM)
    known = {"spleen", "liver"}
    keys = {r.name: r.key(config, "sha") for r in plan_runs(config, known)[0]}
    new_keys = {r.name: r.key(changed, "sha") for r in plan_runs(changed, known)[0]}
    assert keys.keys() == new_keys.keys() and len(set(keys.values())) == len(keys)
    differ = {name for name in keys if keys[name] != new_keys[name]}
    assert differ and differ == {name for name in keys if "/ lora" in name}  # lora and lora+decoder: its base method
    other_model = {r.name: r.key(config, "other-sha") for r in plan_runs(config, known)[0]}
    assert not set(other_model.values()) & set(keys.values())


def test_ranks_split_the_grid_into_disjoint_shares():
    runs = list(range(17))
    shares = [rank_share(runs, rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == runs and [len(s) for s in shares] == [6, 6, 5]


def test_method_labels():
    assert MethodSpec.parse("lora+decoder") == MethodSpec("lora+decoder", "lora", tune_decoder=True)
    assert MethodSpec.parse("spatial-adapter+size-prior").black_box
    assert not MethodSpec.parse("linear-probe+decoder").black_box
    with pytest.raises(ValueError, match="already trains the decoder"):
        MethodSpec.parse("full+decoder")


# ------------------------------------------------------------------------------ a real phantom experiment


@pytest.fixture(scope="module")
def phantom_experiment(tmp_path_factory):
    """The suite's part of the phantom config: interrupted after its first stored run (SIGINT), resumed, then
    rerun with everything done. Returns (out, [the three completed processes], seconds of each)."""
    cwd = tmp_path_factory.mktemp("experiment")
    out = cwd / "out"
    args = ["experiment", "--config", str(PHANTOM), "--out", str(out), *SUITE_PART]  # bar: its lines on stderr
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "FSEFTSegmentLib", *args], env=_env(cwd), cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    while not list((out / "runs").glob("*.json")) and process.poll() is None and time.monotonic() - started < 600:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    interrupted = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    seconds = [time.monotonic() - started]
    completed = []
    for _ in range(2):
        started = time.monotonic()
        completed.append(fseft(args, cwd))
        seconds.append(time.monotonic() - started)
    return out, [interrupted, *completed], seconds


def test_an_interrupted_experiment_keeps_its_finished_runs_and_the_rerun_continues(phantom_experiment):
    out, (interrupted, resumed, rerun), seconds = phantom_experiment
    print(f"phantom experiment (13 runs): interrupted after {seconds[0]:.0f} s, resumed {seconds[1]:.0f} s, rerun {seconds[2]:.0f} s")
    assert interrupted.returncode == 130, interrupted.stderr
    assert "finished run(s) are kept" in interrupted.stderr and "Traceback" not in interrupted.stderr
    assert resumed.returncode == 0, resumed.stderr
    done_before = int(resumed.stderr.split(" done, ")[0].rsplit(" ", 1)[1])
    assert 1 <= done_before < 13 and f"{13 - done_before} to run" in resumed.stderr
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix in (".tmp", ".partial")]  # no half-written file
    assert len(records(out)) == 13
    assert rerun.returncode == 0 and "13 done, 0 to run" in rerun.stderr
    assert rerun.stdout == resumed.stdout  # the same table, from the stored runs alone


def test_the_phantom_experiment_writes_the_papers_outputs(phantom_experiment):
    out, _, _ = phantom_experiment
    rows = (out / "runs.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 14 and rows[0].startswith("task,group,method,k,")
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "| zero-shot |" in table and "| spatial-adapter+size-prior |" in table and "K = 5" in table
    for name in ("dice-vs-k.png", "dice-vs-parameters.png", "dice-vs-time.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list(records(out).values())
    zero_shot = next(r for r in runs if r["method"] == "zero-shot")
    assert run_value(zero_shot, "model_space.dice") > 0.5  # fseft-mini knows the spleen, phantoms are synthetic
    for run in runs:
        assert len(run["tests"]) == 3 and set(run["scores"]) == set(run["tests"])
        for space in ("model_space", "native"):
            assert 0.0 <= run_value(run, f"{space}.dice") <= 1.0 and 0.0 <= run_value(run, f"{space}.surface_dice") <= 1.0
        assert run["peak_memory_mb"] > 0 and run["memory"] == "rss"
        if run["method"] != "zero-shot":
            assert run["epochs"] >= 1 and run["trainable_parameters"] > 0 and len(run["supports"]) == run["k"]
            assert run["validation"] not in run["supports"] + run["tests"]
    lora = [r for r in runs if r["method"] == "lora"]
    assert {r["trainable_parameters"] for r in lora} == {lora[0]["trainable_parameters"]} and len(lora) == 4
    five = {r["draw"]: r["supports"] for r in runs if r["method"] == "linear-probe" and r["k"] == 5}
    one = {r["draw"]: r["supports"] for r in runs if r["method"] == "linear-probe" and r["k"] == 1}
    assert all(five[d][:1] == one[d] for d in (0, 1)) and five[0] != five[1]


# ------------------------------------------------------------------------------ cached black-box prediction


def test_a_head_on_cached_features_predicts_as_fseft_predict_does():
    """The linear probe on the shared cache gives `fseft predict`'s logits (up to fp16 features); the spatial
    adapter (3x3 convolutions) differs where windows overlap: measured here with random adapter weights."""
    from FSEFTSegmentLib.evaluation import dice
    from FSEFTSegmentLib.experiment.runner import head_logits
    from FSEFTSegmentLib.inference import Head, SegmentationPredictor
    from FSEFTSegmentLib.methods import get_method
    from FSEFTSegmentLib.methods.adapted import AdaptedModel
    from FSEFTSegmentLib.model import load_foundation_model
    from FSEFTSegmentLib.preprocessing import CTPreprocessing
    from FSEFTSegmentLib.pretraining.phantoms import make_phantom
    from FSEFTSegmentLib.training import TrainingCase, TrainingSettings, cache_features

    network = load_foundation_model("fseft-mini")
    image, _ = make_phantom(size=(96, 96, 64), seed=5)
    volume = CTPreprocessing(network.architecture)(image)
    device, settings = torch.device("cpu"), TrainingSettings()
    predictor = SegmentationPredictor(network, device)
    with cache_features(network, TrainingCase("phantom", volume), device, settings) as cache:
        for method in ("linear-probe", "spatial-adapter"):
            torch.manual_seed(0)
            model = AdaptedModel(network, get_method(method), [0])
            if method == "spatial-adapter":
                torch.nn.init.normal_(model.head[0].conv2.weight, std=0.02)
            cached = head_logits(model.head, cache, network.architecture, settings, device)
            direct = predictor.logits(volume, [Head.of(model)])
            assert cached.shape == direct.shape
            agreement = dice((cached > 0).numpy(), (direct > 0).numpy())
            print(f"{method}: mask Dice cached vs sliding window {agreement:.5f}, max logit difference {float((cached - direct).abs().max()):.4f}")
            assert agreement >= (0.999 if method == "linear-probe" else 0.98)
            if method == "linear-probe":
                assert torch.allclose(cached, direct, atol=0.05)


# ------------------------------------------------------------------------------ torchrun


def test_torchrun_splits_the_grid_across_two_processes_and_merges_one_table(tmp_path):
    values = yaml.safe_load(PHANTOM.read_text(encoding="utf-8"))
    values.update(name="split", data={"phantoms": {"count": 5, "size": [64, 64, 48], "seed": 1}}, shots=[1, 2], draws=[0, 1],
                  methods=["zero-shot", "linear-probe", "spatial-adapter"],
                  tasks=[{"name": "spleen", "structures": {"spleen": 1}, "train": 3, "test": 2}])
    config = tmp_path / "split.yaml"
    config.write_text(yaml.safe_dump(values), encoding="utf-8")
    alone = fseft(["experiment", "--config", str(config), "--out", str(tmp_path / "alone")], tmp_path)
    assert alone.returncode == 0, alone.stderr
    split = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "FSEFTSegmentLib",
         "experiment", "--config", str(config), "--out", str(tmp_path / "split")],
        env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=600, check=False)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "9 runs in the grid, 0 done, 5 to run on rank 0 of 2" in split.stderr
    assert "9 runs in the grid, 0 done, 4 to run on rank 1 of 2" in split.stderr
    assert split.stdout.count("## split: fseft-mini") == 1  # rank 0 alone writes and prints the merged table
    mine, theirs = records(tmp_path / "alone"), records(tmp_path / "split")
    assert mine.keys() == theirs.keys() and len(mine) == 9
    for key, record in mine.items():
        assert run_value(theirs[key], "model_space.dice") == pytest.approx(run_value(record, "model_space.dice"), abs=2e-3)
