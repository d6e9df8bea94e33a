"""`fseft device`: what PyTorch can compute on, as the Slicer panel reads it."""

from __future__ import annotations

import json
import os

import torch

from conftest import fseft
from FSEFTSegmentLib import inference
from FSEFTSegmentLib.inference import device_report

KEYS = ["torch", "build", "cuda_available", "gpus", "cpu_threads", "cpu_count", "native_bf16_cpu"]


def test_device_json_and_text():
    result = fseft(["device", "--json"], dict(os.environ))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report) == KEYS and report["torch"] == torch.__version__
    assert report["cuda_available"] is torch.cuda.is_available()  # False on the CI machines
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        assert report["build"] == "CPU-only"
    assert len(report["gpus"]) == (torch.cuda.device_count() if report["cuda_available"] else 0)
    assert report["cpu_threads"] >= 1 and report["cpu_count"] >= 1 and isinstance(report["native_bf16_cpu"], bool)

    result = fseft(["device"], dict(os.environ))
    assert result.returncode == 0 and result.stdout.startswith(f"torch {torch.__version__}") and "CPU:" in result.stdout, result.stderr


def test_gpus_are_listed_and_a_failing_one_is_reported(monkeypatch):
    """The GPU rows, with CUDA faked: one GPU answers, the other is busy (exclusive mode)."""

    def memory(index):
        if index == 1:
            raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable\nmore")
        return (3 * 2**30, 80 * 2**30)

    monkeypatch.setattr(inference.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(inference.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(inference.torch.cuda, "get_device_name", lambda index: f"GPU model {index}")
    monkeypatch.setattr(inference.torch.cuda, "mem_get_info", memory)
    monkeypatch.setattr(inference.torch.version, "cuda", "12.8")
    report = device_report()
    assert report["build"] == "CUDA 12.8" and report["cuda_available"] is True
    assert report["gpus"] == [
        {"index": 0, "name": "GPU model 0", "free_bytes": 3 * 2**30, "total_bytes": 80 * 2**30},
        {"index": 1, "name": "GPU model 1", "free_bytes": None, "total_bytes": None,
         "error": "CUDA error: all CUDA-capable devices are busy or unavailable"},
    ]
    json.dumps(report)
