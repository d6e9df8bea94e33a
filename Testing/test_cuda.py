"""The engine's CUDA paths on a real GPU: prediction under autocast, the out-of-memory fallback to the
CPU, adaptation of a black-box and a PEFT method, and the quick demo.

Skipped where PyTorch sees no GPU (CI, most machines). `make device` runs them on a lent GPU machine
(DEVELOPERS.md); the bundled model and procedural phantoms only, so nothing has to travel with them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FSEFTSegmentLib.adapter_library import METADATA_FILE
from FSEFTSegmentLib.inference import InferenceSettings, SegmentationPredictor, autocast_dtype
from FSEFTSegmentLib.io.segmentations import read_structure_mask
from FSEFTSegmentLib.model import load_foundation_model
from FSEFTSegmentLib.prediction import predict_with_adapters
from FSEFTSegmentLib.pretraining.phantoms import make_phantom
from FSEFTSegmentLib.progress import JsonProgress

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: `make device` runs these on a lent GPU machine (DEVELOPERS.md)")

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = ["liver", "spleen", "kidney_left", "aorta"]
SPLEEN = 1  # the phantom's label value (universal ids)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """Phantom seed 7 (96 x 96 x 80 at 3 mm, as the shipped-model test) and its label map."""
    folder = tmp_path_factory.mktemp("cuda-phantom")
    image, labels = make_phantom(7, size=(96, 96, 80), spacing=(3.0, 3.0, 3.0))
    sitk.WriteImage(image, str(folder / "phantom.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    return folder


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def predicted_masks(phantom: Path, out: Path, names, device: str, precision: str, adapters=()) -> dict[str, np.ndarray]:
    result = predict_with_adapters(None, adapters=adapters, inputs=[phantom / "phantom.nii.gz"], out=out, device=device,
                                   structures=names, settings=InferenceSettings(precision=precision))
    assert not result.failures, result.failures
    segmentation = result.outputs["phantom"][0]
    return {name: sitk.GetArrayFromImage(read_structure_mask(segmentation, name)) > 0 for name in names}


def fseft(*args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "FSEFTSegmentLib", *args], capture_output=True, text=True, env=environment, timeout=300)


def test_prediction_under_autocast_agrees_with_fp32_on_the_cpu(phantom, tmp_path):
    assert autocast_dtype(torch.device("cuda"), "auto") in (torch.bfloat16, torch.float16)
    cpu = predicted_masks(phantom, tmp_path / "cpu", STRUCTURES, "cpu", "fp32")
    gpu = predicted_masks(phantom, tmp_path / "cuda-fp32", STRUCTURES, "cuda", "fp32")
    mixed = predicted_masks(phantom, tmp_path / "cuda-auto", STRUCTURES, "cuda", "auto")
    for name in STRUCTURES:
        assert cpu[name].any(), name
        assert dice(gpu[name], cpu[name]) >= 0.995, name  # cuDNN may run fp32 convolutions in TF32
        assert dice(mixed[name], cpu[name]) >= 0.98, name


def test_cuda_out_of_memory_falls_back_to_the_cpu_with_a_warning(phantom):
    image = sitk.ReadImage(str(phantom / "phantom.nii.gz"))
    network = load_foundation_model("fseft-mini")
    expected = SegmentationPredictor(network, torch.device("cpu"), InferenceSettings(precision="fp32")).segment(image, [network.classifier])
    log = io.StringIO()
    predictor = SegmentationPredictor(network, torch.device("cuda"), InferenceSettings(precision="fp32"), JsonProgress(log))
    torch.cuda.empty_cache()
    # a real out-of-memory error: the allocator may reserve 1 MiB beyond the weights it holds
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2**20) / total)
    try:
        masks = predictor.segment(image, [network.classifier])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    warnings = [json.loads(line)["message"] for line in log.getvalue().splitlines() if json.loads(line)["event"] == "warning"]
    assert predictor.device.type == "cpu" and any("ran out of memory" in message for message in warnings), warnings
    assert masks.shape == expected.shape
    for channel in range(masks.shape[0]):
        assert dice(masks[channel] > 0, expected[channel] > 0) >= 0.9999 or not expected[channel].any()


@pytest.mark.parametrize("method", ["linear-probe", "lora"])  # black-box (feature cache) and PEFT (through the backbone)
def test_adaptation_trains_on_cuda_and_the_adapter_predicts_alike_on_the_cpu(method, phantom, tmp_path):
    adapter = tmp_path / "adapter"
    run = fseft("adapt", "--method", method, "--support", str(phantom / "phantom.nii.gz"), str(phantom / "labels.nii.gz"),
                "--structure", f"spleen={SPLEEN}", "--max-epochs", "6", "--device", "cuda", "--progress", "none", "--out", str(adapter))
    assert run.returncode == 0, run.stderr
    metadata = json.loads((adapter / METADATA_FILE).read_text())
    assert metadata["device"].startswith("cuda") and metadata["epochs"] == 6
    losses = [entry["loss"] for entry in metadata["training_curve"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    on_gpu = predicted_masks(phantom, tmp_path / "gpu", ["spleen"], "cuda", "fp32", adapters=[adapter])
    on_cpu = predicted_masks(phantom, tmp_path / "cpu", ["spleen"], "cpu", "fp32", adapters=[adapter])
    assert on_cpu["spleen"].any() and dice(on_gpu["spleen"], on_cpu["spleen"]) >= 0.995


def test_quick_demo_runs_on_cuda(tmp_path):
    run = fseft("demo", "--quick", "--device", "cuda", "--progress", "none", "--out", str(tmp_path / "demo"))
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["plan"]["quick"] is True and (tmp_path / "demo" / "report.png").is_file()
