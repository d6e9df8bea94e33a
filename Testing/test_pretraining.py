"""Pretraining: the partial-label Dice loss, the YAML config, exact resume, and a 2-process DDP run."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import SHARED_DATA

from FSEFTSegmentLib.errors import Cancelled, FSEFTError, InputError
from FSEFTSegmentLib.model.checkpoint import build_from_checkpoint
from FSEFTSegmentLib.inference import native_bf16_cpu
from FSEFTSegmentLib.model.network import Architecture
from FSEFTSegmentLib.pretraining.config import DatasetSpec, PretrainConfig, validation_indices
from FSEFTSegmentLib.pretraining.loop import (
    CHECKPOINT_NAME,
    VOLUME_CACHE_NAME,
    export_model,
    lr_factor,
    main_pretrain,
    pretrain,
    pretraining_dtype,
    random_axial_rot90,
    validate_checkpoint,
)
from FSEFTSegmentLib.pretraining.loss import partial_label_dice_loss
from FSEFTSegmentLib.pretraining.validation import summary, table, validate
from FSEFTSegmentLib.pretraining.volume_cache import _file_digest, _VolumeCache
from FSEFTSegmentLib.progress import JsonProgress, Progress

ROOT = Path(__file__).resolve().parents[1]
#: the smallest network that trains: 64-voxel crops (at 32 the bottleneck is one voxel), one block a stage
TINY = {"feature_size": 12, "out_channels": 4, "patch_size": 64, "depths": [1, 1, 1, 1]}


# ------------------------------------------------------------------------------------------- loss


def _dice(p, y):
    return (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)


def test_loss_ignores_unannotated_channels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    loss = partial_label_dice_loss(logits, target, annotated)
    loss.backward()
    grad = logits.grad
    assert torch.all(grad[0, 1] == 0) and torch.all(grad[1, 0] == 0) and torch.all(grad[1, 2] == 0)
    assert grad[0, 0].abs().sum() > 0 and grad[0, 2].abs().sum() > 0 and grad[1, 1].abs().sum() > 0
    p = torch.sigmoid(logits.detach())
    first = ((1 - _dice(p[0, 0], target[0, 0])) + (1 - _dice(p[0, 2], target[0, 2]))) / 2
    second = 1 - _dice(p[1, 1], target[1, 1])
    assert float(loss.detach()) == pytest.approx(float((first + second) / 2), abs=1e-6)


def test_loss_values_on_hand_made_cases():
    big = 50.0  # sigmoid(±50) is 1 / 0 in float32
    target = torch.zeros(1, 2, 2, 2, 2)
    target[0, 0, 0] = 1  # 4 voxels
    perfect = torch.where(target > 0, big, -big)
    annotated = torch.ones(1, 2, dtype=torch.bool)
    # channel 0 perfect; channel 1 empty and predicted empty: dice (0+1)/(0+0+1) = 1
    assert float(partial_label_dice_loss(perfect, target, annotated)) == pytest.approx(0.0, abs=1e-6)
    # channel 0 all wrong (predicts the other 4 voxels): dice = 1 / (4 + 4 + 1); channel 1 unannotated
    wrong = -perfect
    wrong[0, 1] = big  # would cost a lot if it counted
    loss = partial_label_dice_loss(wrong, target, torch.tensor([[True, False]]))
    assert float(loss) == pytest.approx(1 - 1 / 9, abs=1e-6)
    # no annotated class at all: zero, still differentiable
    logits = torch.zeros(1, 2, 2, 2, 2, requires_grad=True)
    none = partial_label_dice_loss(logits, target, torch.zeros(1, 2, dtype=torch.bool))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.all(logits.grad == 0)


def test_loss_all_annotated_is_mean_of_one_minus_dice():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 5, 5, 5)
    target = (torch.rand(3, 4, 5, 5, 5) > 0.7).float()
    p = torch.sigmoid(logits)
    expected = torch.stack([1 - _dice(p[b, c], target[b, c]) for b in range(3) for c in range(4)]).mean()
    loss = partial_label_dice_loss(logits, target, torch.ones(3, 4, dtype=torch.bool))
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)


def test_loss_without_absent_class_dice_leaves_absence_to_the_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.6).float()
    target[0, 1] = 0  # class 1 absent from the first patch
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    dice_only = partial_label_dice_loss(logits, target, annotated, absent_class_dice=False)
    dice_only.backward()
    # the absent class gets no Dice gradient, the unannotated one none at all
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[0, 2] == 0)
    p = torch.sigmoid(logits.detach())
    first = 1 - _dice(p[0, 0], target[0, 0])
    second = sum(1 - _dice(p[1, c], target[1, c]) for c in range(3)) / 3
    assert float(dice_only.detach()) == pytest.approx(float((first + second) / 2), abs=1e-6)
    # with the cross-entropy, the absent class is pushed towards 0 on every voxel, the unannotated
    # class still gets nothing
    logits.grad = None
    partial_label_dice_loss(logits, target, annotated, bce_weight=1.0, absent_class_dice=False).backward()
    assert torch.all(logits.grad[0, 1] > 0) and torch.all(logits.grad[0, 2] == 0)
    # a batch where no annotated class is present: the cross-entropy alone
    empty = torch.zeros_like(target)
    alone = partial_label_dice_loss(logits, empty, annotated, bce_weight=1.0, absent_class_dice=False)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach(), empty, reduction="none").mean((2, 3, 4))
    assert float(alone.detach()) == pytest.approx(float(bce[annotated].mean()), abs=1e-6)


def test_lr_schedule_warms_up_from_a_tenth_then_cosine():
    factors = [lr_factor(s, 2, 6) for s in range(6)]
    assert factors[0] == pytest.approx(0.1) and factors[1] == pytest.approx(0.55)
    assert factors[2] == pytest.approx(1.0)
    assert factors[3:] == sorted(factors[3:], reverse=True) and factors[-1] > 0
    held = [lr_factor(s, 2, 10, decay_from=6) for s in range(10)]  # a hold ended by step 6's validation
    assert held[:6] == pytest.approx([0.1, 0.55, 1, 1, 1, 1]) and held[6] == pytest.approx(1.0)
    assert held[7:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)])


# ------------------------------------------------------------------------------------------- data


def test_rot90_turns_crops_within_the_axial_plane_only():
    """Each Z slice keeps its own voxels (the official code turns in the axial plane only); every turn
    of 1-3 quarters is drawn, and the target turns with the image."""
    image = torch.arange(1 * 6 * 6 * 5, dtype=torch.float32).reshape(1, 6, 6, 5)  # every voxel distinct
    target = torch.cat([image % 3 == 0, image % 5 == 0])  # (2, X, Y, Z), as the per-class targets
    slices = [set(image[..., z].flatten().tolist()) for z in range(5)]
    turns_seen = set()
    for seed in range(30):
        turned, turned_target = random_axial_rot90(image, target, 1.0, torch.Generator().manual_seed(seed))
        assert [set(turned[..., z].flatten().tolist()) for z in range(5)] == slices
        assert torch.equal(turned_target, torch.cat([turned % 3 == 0, turned % 5 == 0]))
        turns_seen |= {k for k in (1, 2, 3) if torch.equal(turned, torch.rot90(image, k, (1, 2)))}
    assert turns_seen == {1, 2, 3}
    unturned = random_axial_rot90(image, target, 0.0, torch.Generator().manual_seed(0))
    assert unturned[0] is image and unturned[1] is target


def _phantom(path_image: Path, path_label: Path, seed: int, size: int = 40) -> None:
    """A noisy soft-tissue box holding two spheres (labels 1 and 2), 1.5 mm voxels."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices((size,) * 3, dtype=float)
    body = (np.abs(np.stack([i, j, k]) - (size - 1) / 2) < 0.4 * size).all(0)
    centre = (size - 1) / 2 + rng.uniform(-3, 3, 3)
    first = ((i - centre[0] + 6) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2) <= 25
    second = ((i - centre[0] - 6) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2) <= 16
    array = np.where(body, 40.0, -1000.0) + np.where(first, 150.0, 0) + np.where(second, -80.0, 0)
    array += rng.normal(0, 10, array.shape)
    label = np.where(first, 1, 0) + np.where(second, 2, 0)
    for array_, path in ((array.astype(np.float32), path_image), (label.astype(np.uint8), path_label)):
        image = sitk.GetImageFromArray(array_)
        image.SetSpacing((1.5, 1.5, 1.5))
        sitk.WriteImage(image, str(path))


def _config(tmp_path: Path, **overrides) -> Path:
    """Two datasets: A annotates ids 1 and 2 (two volumes), B annotates id 3 only (its label 2)."""
    for name, count in (("a", 2), ("b", 1)):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        for n in range(count):
            if not (folder / f"img{n}.nii.gz").exists():
                _phantom(folder / f"img{n}.nii.gz", folder / f"lab{n}.nii.gz", seed=n + 10 * len(name + str(count)))
    values = {
        "datasets": [
            {"name": "A", "images": "a/img*.nii.gz", "labels": "a/lab*.nii.gz", "label_template": {1: 1, 2: 2}},
            {"name": "B", "images": ["b/img0.nii.gz"], "labels": ["b/lab0.nii.gz"], "label_template": {2: 3}, "annotated": [3]},
        ],
        "architecture": TINY,
        "volumes_per_step": 1,
        "crops_per_volume": 1,
        "warmup_epochs": 1,
        "steps_per_epoch": 2,
        "steps": 6,
        "checkpoint_every": 2,
        "rot90_prob": 0.5,
        "out": "out",
    }
    values.update(overrides)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def _bad_config(tmp_path, values) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    with pytest.raises(InputError) as raised:
        PretrainConfig.from_yaml(path)
    assert str(path) in str(raised.value)
    return str(raised.value)


def test_config_loads_and_bad_keys_are_named(tmp_path):
    config = PretrainConfig.from_yaml(_config(tmp_path))
    assert [len(d.images) for d in config.datasets] == [2, 1]
    assert config.datasets[0].annotated == (1, 2) and config.datasets[1].label_template == {2: 3}
    assert config.architecture == Architecture.from_dict(TINY)
    assert config.out == str(tmp_path / "out") and config.lr == 1e-4
    good = yaml.safe_load((tmp_path / "pretrain.yaml").read_text())
    assert "'datasets[1].label_template'" in _bad_config(tmp_path, {**good, "datasets": [good["datasets"][0], {**good["datasets"][1], "label_template": {2: 9}}]})
    assert "'datasets[0].images'" in _bad_config(tmp_path, {**good, "datasets": [{**good["datasets"][0], "images": "nothing/*.nii"}]})
    assert "'lr'" in _bad_config(tmp_path, {**good, "lr": "fast"})
    assert "'epoch'" in _bad_config(tmp_path, {**good, "epoch": 3})
    assert "'architecture.feature'" in _bad_config(tmp_path, {**good, "architecture": {"feature": 3}})
    assert "'absent_class_dice'" in _bad_config(tmp_path, {**good, "absent_class_dice": "no"})
    assert "needs bce_weight" in _bad_config(tmp_path, {**good, "absent_class_dice": False})
    assert "'synthesis_workers': must not be negative" in _bad_config(tmp_path, {**good, "synthesis_workers": -1})


def _lrs(out: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (out / "loss.jsonl").read_text().splitlines()]


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    """3 steps, stop, resume to 6 == 6 steps at once (warm-up 2 steps, then cosine): lr and weights.

    On one thread: with several, some CPU kernels' reductions vary when other processes compete for
    the cores (seen as rare bitwise differences), which is not what this test is about."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_stopped_and_whole_runs(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_stopped_and_whole_runs(tmp_path):
    whole = PretrainConfig.from_yaml(_config(tmp_path, out="whole"))
    result = pretrain(whole, Progress())
    assert result["steps"] == 6 and np.isfinite(result["last_loss"])

    parts = PretrainConfig.from_yaml(_config(tmp_path, out="parts"))
    calls = []
    with pytest.raises(Cancelled):
        pretrain(parts, Progress(), should_stop=lambda: calls.append(1) or len(calls) > 3)
    state = torch.load(tmp_path / "parts" / "checkpoint-last.pt", weights_only=True)
    assert state["step"] == 3 and not (tmp_path / "parts" / "model.pt").exists()
    pretrain(parts, Progress())

    assert _lrs(tmp_path / "parts") == _lrs(tmp_path / "whole")
    lrs = _lrs(tmp_path / "whole")
    assert lrs[0] == pytest.approx(1e-5) and max(lrs) == pytest.approx(1e-4) and lrs[-1] < lrs[3] < lrs[2]
    first = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    second = torch.load(tmp_path / "parts" / "model.pt", weights_only=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert build_from_checkpoint(tmp_path / "whole" / "model.pt").architecture.out_channels == 4
    assert not list((tmp_path / "whole").glob("*.tmp"))


def test_a_run_resized_on_resume_continues_its_cosine_toward_the_new_end(tmp_path):
    """Stopped at step 3 of 6, resumed as a 10-step run: the lr follows the 10-step schedule from step 3."""
    calls = []
    with pytest.raises(Cancelled):
        pretrain(PretrainConfig.from_yaml(_config(tmp_path)), Progress(), should_stop=lambda: calls.append(1) or len(calls) > 3)
    result = pretrain(PretrainConfig.from_yaml(_config(tmp_path, steps=10)), Progress())
    assert result["steps"] == 10
    lrs = _lrs(tmp_path / "out")
    assert len(lrs) == 10
    assert lrs[3:] == pytest.approx([1e-4 * lr_factor(step, 2, 10) for step in range(3, 10)])
    assert lrs[:3] == pytest.approx([1e-4 * lr_factor(step, 2, 6) for step in range(3)])


def test_a_bf16_run_trains_in_mixed_precision_and_keeps_float32_weights(tmp_path):
    stream = io.StringIO()
    result = pretrain(PretrainConfig.from_yaml(_config(tmp_path, precision="bf16", steps=1)), JsonProgress(stream))
    assert result["steps"] == 1 and np.isfinite(result["last_loss"])
    weights = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()} == {torch.float32}
    assert all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point())
    warnings = [json.loads(line)["message"] for line in stream.getvalue().splitlines() if '"warning"' in line]
    # An explicit bf16 is obeyed; where the CPU would emulate it, the user is told what it costs.
    emulation = [w for w in warnings if "precision: auto" in w]
    assert bool(emulation) == (not native_bf16_cpu())
    # The only other warning: a step whose gradients were not finite was skipped. Seen now and then under
    # bf16 autocast on an AVX512-BF16 CPU (a loss that is finite, then NaN weights before the guard).
    assert all(w == "step 1: non-finite gradients; the step is skipped (no update)" for w in warnings if w not in emulation)
    good = yaml.safe_load((tmp_path / "pretrain.yaml").read_text())
    assert "'precision'" in _bad_config(tmp_path, {**good, "precision": "fp16"})


def test_auto_precision_takes_bf16_only_where_the_hardware_computes_it():
    cpu = torch.device("cpu")
    assert pretraining_dtype("fp32", cpu) is None and pretraining_dtype("bf16", cpu) is torch.bfloat16
    assert pretraining_dtype("auto", cpu) is (torch.bfloat16 if native_bf16_cpu() else None)


def test_the_volume_cache_stores_prepared_volumes_keyed_by_their_inputs(tmp_path):
    config = PretrainConfig.from_yaml(_config(tmp_path, volume_cache=True, steps=3))
    pretrain(config, Progress())
    stored = sorted((tmp_path / "out" / VOLUME_CACHE_NAME).glob("*.pt"))
    assert stored and all(path.name.startswith(("A-", "B-")) for path in stored)

    crop = config.architecture.patch_size
    cached, fresh = _VolumeCache(config, crop, tmp_path / "out" / VOLUME_CACHE_NAME), _VolumeCache(config, crop)
    for dataset, index in ((0, 0), (0, 1), (1, 0)):
        assert torch.equal(cached.get(dataset, index).image, fresh.get(dataset, index).image)
        assert torch.equal(cached.get(dataset, index).label, fresh.get(dataset, index).label)
    assert len(list((tmp_path / "out" / VOLUME_CACHE_NAME).glob("*.pt"))) == 3

    label = tmp_path / "b" / "lab0.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))  # copied: same bytes
    _VolumeCache(config, crop, tmp_path / "out" / VOLUME_CACHE_NAME).get(1, 0)
    assert len(list((tmp_path / "out" / VOLUME_CACHE_NAME).glob("B-0-*.pt"))) == 1
    edited = sitk.ReadImage(str(label))
    edited[0, 0, 0] = 2  # an edited label map
    sitk.WriteImage(edited, str(label))
    _file_digest.cache_clear()  # a new process
    _VolumeCache(config, crop, tmp_path / "out" / VOLUME_CACHE_NAME).get(1, 0)
    assert len(list((tmp_path / "out" / VOLUME_CACHE_NAME).glob("B-0-*.pt"))) == 2


def test_background_workers_prepare_the_same_volumes_and_the_same_run(tmp_path):
    config = PretrainConfig.from_yaml(_with_validation(tmp_path, steps=2, synthesis_workers=2, validate_every=2, out="workers"))
    background, inline = _VolumeCache(config, config.crop), _VolumeCache(config, config.crop)
    background.prepare_in_background(2)
    try:
        assert list(background.pending) == [(0, 1), (0, 0), (1, 0)]  # the validation volume first
        for key in ((1, 0), (0, 0), (0, 1)):
            assert torch.equal(background.get(*key).image, inline.get(*key).image)
            assert torch.equal(background.get(*key).label, inline.get(*key).label)
        assert not background.pending
    finally:
        background.close()

    pretrain(config, Progress())
    pretrain(PretrainConfig.from_yaml(_with_validation(tmp_path, steps=2, validate_every=2, out="inline")), Progress())
    for log in ("loss.jsonl", "validation.jsonl"):
        ours, theirs = ([json.loads(line) for line in (tmp_path / run / log).read_text().splitlines()] for run in ("workers", "inline"))
        key = "loss" if log == "loss.jsonl" else "mean"
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], abs=1e-5)


def test_a_run_from_initial_weights_scores_them_first_and_keeps_only_better_weights(tmp_path):
    start = PretrainConfig.from_yaml(_with_validation(tmp_path, steps=2, out="start"))
    pretrain(start, Progress())
    export_model(start, tmp_path / "start.safetensors")
    config = PretrainConfig.from_yaml(_with_validation(tmp_path, steps=2, validate_every=2, init="start.safetensors", out="continued"))
    pretrain(config, Progress())
    records = [json.loads(line) for line in (tmp_path / "continued" / "validation.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [0, 2] and records[0]["init"] == str(tmp_path / "start.safetensors")
    assert records[0]["dice"] == validate_checkpoint(start, tmp_path / "start.safetensors")["dice"]  # the weights as given
    assert (tmp_path / "continued" / "checkpoint-best.pt").exists() == (records[1]["mean"] > records[0]["mean"])


def test_non_finite_gradients_skip_the_step_and_stop_the_run_after_several(tmp_path):
    from safetensors.torch import load_file, save_file

    start = PretrainConfig.from_yaml(_config(tmp_path, steps=1, out="start"))
    pretrain(start, Progress())
    export_model(start, tmp_path / "start.safetensors")
    tensors = load_file(tmp_path / "start.safetensors")
    tensors["classifier.bias"][0] = float("nan")  # class 1's logits, and so the loss and every gradient
    save_file(tensors, str(tmp_path / "poisoned.safetensors"))
    config = PretrainConfig.from_yaml(_config(tmp_path, steps=8, init="poisoned.safetensors", out="poisoned"))
    with pytest.raises(FSEFTError, match="5 steps in a row had non-finite gradients"):
        pretrain(config, Progress())
    records = [json.loads(line) for line in (tmp_path / "poisoned" / "loss.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(record["skipped"] for record in records)  # the fifth raised before its line
    kept = torch.load(tmp_path / "poisoned" / "nonfinite-batch.pt", weights_only=True)
    assert kept["step"] == 1 and kept["images"].shape[0] == config.volumes_per_step * config.crops_per_volume
    weights = torch.load(tmp_path / "poisoned" / CHECKPOINT_NAME, weights_only=True)["model"]
    assert torch.equal(weights["classifier.weight"], tensors["classifier.weight"])  # no update was applied


def test_main_pretrain_reports_a_bad_config(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("datasets: []\n")
    assert main_pretrain(str(path), "none") == InputError.exit_code
    assert "'datasets'" in capsys.readouterr().err


def test_sigterm_checkpoints_the_current_step_and_the_rerun_continues(tmp_path):
    """`fseft pretrain` stopped by SIGTERM between checkpoints loses no step."""
    config = _config(tmp_path, steps=1000, checkpoint_every=100)
    command = [sys.executable, "-m", "FSEFTSegmentLib.cli", "pretrain", "--config", str(config), "--progress", "json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        steps_seen = 0
        for line in run.stdout:
            steps_seen += '"progress"' in line
            if steps_seen == 2:
                run.send_signal(signal.SIGTERM)
                break
        _, stderr = run.communicate(timeout=300)
    assert run.returncode == Cancelled.exit_code, stderr[-2000:]
    assert "stopping after this step" in stderr and "Traceback" not in stderr
    assert "fseft: pretraining stopped at step" in stderr and "resumes it" in stderr and "error" not in stderr
    state = torch.load(tmp_path / "out" / "checkpoint-last.pt", weights_only=True)
    logged = [json.loads(line)["step"] for line in (tmp_path / "out" / "loss.jsonl").read_text().splitlines()]
    assert 2 <= state["step"] < 100 and logged == list(range(1, state["step"] + 1))


def test_two_process_ddp_run_writes_one_checkpoint(tmp_path):
    """Rank 0 alone writes the checkpoints and validates (the other rank waits at a barrier)."""
    config = _config(tmp_path, steps=2, checkpoint_every=100, out="ddp", validate_every=2)
    values = yaml.safe_load(config.read_text())
    values["datasets"][0]["validation"] = 1
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FSEFT_PROGRESS": "none", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         "-m", "FSEFTSegmentLib.pretraining.loop", str(config)],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "ddp"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-best.pt", "checkpoint-last.pt", "loss.jsonl", "model.pt", "validation.jsonl"]
    state = torch.load(out / "checkpoint-last.pt", weights_only=True)
    assert state["step"] == 2
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(line)["step"] for line in (out / "validation.jsonl").read_text().splitlines()] == [2]


# ------------------------------------------------------------------------------------- validation


def _with_validation(tmp_path: Path, **overrides) -> Path:
    """`_config` with dataset A's second pair held out for validation."""
    path = _config(tmp_path, **overrides)
    values = yaml.safe_load(path.read_text())
    values["datasets"][0]["validation"] = 1
    path.write_text(yaml.safe_dump(values))
    return path


def test_validation_volumes_are_held_out_pairs_or_new_syntheses(tmp_path):
    config = PretrainConfig.from_yaml(_with_validation(tmp_path))
    held_out = config.datasets[0]
    assert held_out.volumes == 1 and validation_indices(held_out) == [1]
    assert config.datasets[1].volumes == 1 and validation_indices(config.datasets[1]) == []

    synthetic = DatasetSpec("s", [], [f"map{n}.nii.gz" for n in range(30)], {1: 1}, (1,), synthesize=4, validation=4)
    indices = validation_indices(synthetic)
    assert indices == [120, 127, 135, 142] and min(indices) >= synthetic.volumes == 120  # variant 4: never drawn
    assert [synthetic.sources(i)[0] for i in indices] == ["map0.nii.gz", "map7.nii.gz", "map15.nii.gz", "map22.nii.gz"]

    good = yaml.safe_load((tmp_path / "pretrain.yaml").read_text())
    all_held_out = {**good, "datasets": [{**good["datasets"][0], "validation": 2}, good["datasets"][1]]}
    assert "'datasets[0].validation'" in _bad_config(tmp_path, all_held_out)
    no_volumes = {**good, "datasets": [{**good["datasets"][0], "validation": 0}, good["datasets"][1]], "validate_every": 2}
    assert "'validate_every'" in _bad_config(tmp_path, no_volumes)


class _IntensityOracle(torch.nn.Module):
    """Segments the phantom's spheres by intensity (window -175..250 HU): bright (190 HU) -> channel 0,
    dark (-40 HU) -> channel 1; channels 2-3 never fire."""

    def forward(self, x):
        bright = (x - 0.7) * 100
        dark = (0.07 - (x - (135 / 425)).abs()) * 100
        return torch.cat([bright, dark, torch.full_like(x, -100.0), torch.full_like(x, -100.0)], 1)


class _Swapped(torch.nn.Module):
    """The oracle with its first two channels swapped: every class segmented as the other."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle

    def forward(self, x):
        return self.oracle(x)[:, [1, 0, 2, 3]]


def test_validation_scores_each_annotated_class_on_the_held_out_volume(tmp_path):
    config = PretrainConfig.from_yaml(_with_validation(tmp_path))
    cache = _VolumeCache(config, config.crop)
    result = validate(_IntensityOracle(), config, cache, torch.device("cpu"))
    assert result["volumes"] == 1 and list(result["dice"]) == ["spleen", "kidney_right"]  # universal ids 1, 2
    assert min(result["dice"].values()) > 0.9 and result["mean"] == pytest.approx(np.mean(list(result["dice"].values())), abs=1e-4)
    oracle = _IntensityOracle().train()
    swapped = validate(_Swapped(oracle), config, cache, torch.device("cpu"))
    assert max(swapped["dice"].values()) < 0.1 and oracle.training  # channels matter; the mode is restored
    assert "lowest: " in summary(result) and table(result).splitlines()[-1].startswith("mean")


def test_a_run_validates_logs_per_class_dice_and_keeps_the_best_weights(tmp_path):
    from safetensors import safe_open

    config = PretrainConfig.from_yaml(_with_validation(tmp_path, validate_every=2, steps=4))
    pretrain(config, Progress())
    records = [json.loads(line) for line in (tmp_path / "out" / "validation.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    assert all(set(record["dice"]) == {"spleen", "kidney_right"} and 0 <= record["mean"] <= 1 for record in records)
    best = torch.load(tmp_path / "out" / "checkpoint-best.pt", weights_only=True)
    chosen = max(records, key=lambda record: record["mean"])
    assert best["step"] == chosen["step"] and "optimizer" not in best

    again = validate_checkpoint(config, tmp_path / "out" / "checkpoint-best.pt")
    assert again["step"] == chosen["step"] and again["dice"] == chosen["dice"]
    export_model(config, tmp_path / "best.safetensors", tmp_path / "out" / "checkpoint-best.pt")
    with safe_open(str(tmp_path / "best.safetensors"), "pt") as exported:
        assert json.loads(exported.metadata()["fseft.validation_dice"]) == chosen["dice"]
    exported = validate_checkpoint(config, tmp_path / "best.safetensors")  # exported weights score the same
    assert exported["step"] == chosen["step"] and exported["dice"] == chosen["dice"]
    with pytest.raises(InputError, match="not a pretraining checkpoint"):
        export_model(config, tmp_path / "x.safetensors", tmp_path / "out" / "model.pt")

    # A run continued from the exported weights records the steps that made them, in all
    continued = PretrainConfig.from_yaml(_with_validation(tmp_path, steps=2, init="best.safetensors", out="continued"))
    pretrain(continued, Progress())
    export_model(continued, tmp_path / "continued.safetensors")
    with safe_open(str(tmp_path / "continued.safetensors"), "pt") as exported:
        assert exported.metadata()["fseft.steps"] == "2 of 2" and exported.metadata()["fseft.steps_before"] == str(chosen["step"])


def test_lr_holds_until_every_class_reaches_the_dice_then_decays(tmp_path):
    def lrs(out):
        return [json.loads(line)["lr"] for line in (out / "loss.jsonl").read_text().splitlines()]

    # Dice 1e-6: every class reaches it at the first validation (step 2, the end of the warm-up),
    # so the cosine runs from there, as without a hold
    reached = PretrainConfig.from_yaml(_with_validation(tmp_path, validate_every=2, steps=6, hold_lr_until_dice=1e-6, out="reached"))
    pretrain(reached, Progress())
    assert torch.load(tmp_path / "reached" / CHECKPOINT_NAME, weights_only=True)["decay_start"] == 2
    assert lrs(tmp_path / "reached") == pytest.approx([1e-4 * lr_factor(step, 2, 6) for step in range(6)])

    # Dice 1 is never reached: the lr stays at its peak after the warm-up
    held = PretrainConfig.from_yaml(_with_validation(tmp_path, validate_every=2, steps=6, hold_lr_until_dice=1.0, out="held"))
    pretrain(held, Progress())
    assert torch.load(tmp_path / "held" / CHECKPOINT_NAME, weights_only=True)["decay_start"] is None
    assert lrs(tmp_path / "held")[2:] == pytest.approx([1e-4] * 4)

    # resumed longer with a reachable Dice: still at its peak until the next validation (step 8),
    # then the cosine from step 8 to the new end
    longer = PretrainConfig.from_yaml(_with_validation(tmp_path, validate_every=2, steps=10, hold_lr_until_dice=1e-6, out="held"))
    pretrain(longer, Progress())
    assert torch.load(tmp_path / "held" / CHECKPOINT_NAME, weights_only=True)["decay_start"] == 8
    assert lrs(tmp_path / "held")[6:] == pytest.approx([1e-4, 1e-4, 1e-4 * lr_factor(8, 2, 10, decay_from=8), 1e-4 * lr_factor(9, 2, 10, decay_from=8)])

    good = yaml.safe_load((tmp_path / "pretrain.yaml").read_text())
    assert "needs validate_every" in _bad_config(tmp_path, {**good, "validate_every": 0, "hold_lr_until_dice": 0.1})
    assert "'hold_lr_until_dice'" in _bad_config(tmp_path, {**good, "hold_lr_until_dice": 2})


def test_single_label_is_split_into_left_and_right(tmp_path):
    """Both spheres labelled as one organ: the one on the patient's left (higher i in LPS, lower axis-0
    index after RAS) becomes the left organ's id; the volume is cached in model space."""
    from FSEFTSegmentLib.pretraining.volume_cache import _VolumeCache

    _config(tmp_path)
    values = {
        "datasets": [{"name": "K", "images": ["a/img0.nii.gz"], "labels": ["a/lab0.nii.gz"],
                      "label_template": {1: 1, 2: 1}, "split_left_right": {1: 2}}],
        "architecture": TINY,
    }
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    config = PretrainConfig.from_yaml(path)
    assert config.datasets[0].annotated == (1, 2)
    volume = _VolumeCache(config, 64).get(0, 0)
    label = volume.label[0]
    assert volume.image.shape == (1, 64, 64, 64) and label.dtype == torch.uint8
    right, left = torch.nonzero(label == 1)[:, 0], torch.nonzero(label == 2)[:, 0]
    assert len(right) > 100 and len(left) > 100
    assert left.max() < right.min()
    assert "'datasets[0].split_left_right'" in _bad_config(tmp_path, {**values, "datasets": [{**values["datasets"][0], "split_left_right": {5: 2}}]})


def test_the_papers_config_documents_nine_datasets_drawn_equally(tmp_path):
    """The shipped paper config parses once its expected folder layout exists (one file a folder)."""
    source = ROOT / "Resources" / "pretraining" / "paper-9-datasets.yaml"
    values = yaml.safe_load(source.read_text(encoding="utf-8"))
    for dataset in values["datasets"]:
        for key in ("images", "labels"):
            folder = tmp_path / Path(dataset[key]).parent
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "case0.nii.gz").touch()
    (tmp_path / "paper.yaml").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    config = PretrainConfig.from_yaml(tmp_path / "paper.yaml")
    assert config.architecture == Architecture()  # the released model's shape and space
    assert (config.lr, config.epochs, config.volumes_per_step, config.crops_per_volume) == (1e-4, 1000, 2, 3)
    groups: dict[str, float] = {}
    for spec in config.datasets:
        paper_dataset = "MSD" if spec.name.startswith("MSD-") else spec.name
        groups[paper_dataset] = groups.get(paper_dataset, 0.0) + spec.weight
    assert len(groups) == 9 and all(weight == pytest.approx(1.0, abs=1e-3) for weight in groups.values())
    kits = next(spec for spec in config.datasets if spec.name == "KiTS19")
    assert kits.split_left_right == {2: 3} and kits.annotated == (2, 3, 18)


def test_the_bundled_models_config_reads_the_shared_label_maps():
    path = ROOT / "Resources" / "pretraining" / "fseft-mini.yaml"
    if not (SHARED_DATA / "label-maps" / "btcv-abdct").is_dir():
        pytest.skip(f"shared label maps not found ({SHARED_DATA / 'label-maps'})")
    config = PretrainConfig.from_yaml(path)
    assert [(spec.name, len(spec.labels), spec.mirror_left_right) for spec in config.datasets] == [
        ("btcv-synthetic", 30, True), ("amos-synthetic", 1, False)]
    assert all(spec.synthesize and not spec.images for spec in config.datasets)
    assert config.architecture.out_channels == 16 and config.class_balanced
