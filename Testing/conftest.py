"""Shared fixtures. `mrml_scene`: real Slicer MRML, headless, from the PyPI `slicer-core` wheel.

Tests that must prove "Slicer reads what we write" load our files with Slicer's own storage
nodes instead of trusting our reader. Bootstrap as in shared/notes/slicer-facts.md, section A.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(ROOT))

#: Shared test data (never committed): ../shared/data from the project root, as the data README says.
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def mrml_scene():
    """A fresh MRML scene with the application, Colors, Volumes, Segmentations and SubjectHierarchy
    logics registered, plus the `slicer.mrmlScene` / `slicer.modules` stand-ins that slicer.util's
    array helpers need. The logics are on `slicer.modules.<name>.logic()`. Skips without slicer-core."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
    saved = {name: getattr(slicer, name) for name in ("mrmlScene", "modules") if hasattr(slicer, name)}
    scene, _, _ = bootstrap_scene(slicer)
    try:
        yield scene
    finally:
        scene.Clear(1)
        for name in ("mrmlScene", "modules"):
            if name in saved:
                setattr(slicer, name, saved[name])
            elif hasattr(slicer, name):
                delattr(slicer, name)


from headless_slicer import bootstrap_scene  # noqa: E402  (after the path setup above)
from synthetic import tiny_checkpoint  # noqa: E402

# A random feature-size-12 network registered with a coarse working space (4.5 mm, 64^3 windows),
# so a whole real CT takes seconds: the pipeline is checked, not accuracy.
TINY_ARCHITECTURE = {"feature_size": 12, "out_channels": 29, "patch_size": 64, "spacing_mm": 4.5, "hu_window": [-175, 250]}


@pytest.fixture(scope="session")
def environment(tmp_path_factory):
    """FSEFT_CACHE and FSEFT_REGISTRY pointing at a private registry holding `tiny-test`, imported."""
    root = tmp_path_factory.mktemp("fseft-env")
    registry = root / "models.json"
    registry.write_text(json.dumps({"models": [{
        "name": "tiny-test", "description": "random feature-size-12 network for tests",
        "architecture": TINY_ARCHITECTURE,
        "files": [{"url": "http://127.0.0.1:9/tiny.pt", "filename": "tiny.pt", "sha256": None, "size": None}],
    }]}), encoding="utf-8")
    env = dict(os.environ, FSEFT_CACHE=str(root / "cache"), FSEFT_REGISTRY=str(registry), PYTHONUNBUFFERED="1")
    checkpoint = tiny_checkpoint(root / "tiny.pt")
    result = fseft(["models", "import", str(checkpoint), "--name", "tiny-test"], env)
    assert result.returncode == 0, result.stderr
    return env


def fseft(args, env, cwd=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "FSEFTSegmentLib", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)


def terminate_on_event(args, env, event: str) -> tuple[int, str, float]:
    """Run `fseft ARGS --progress json`, send SIGTERM at the first `event`; (exit code, stderr, seconds to exit)."""
    process = subprocess.Popen([sys.executable, "-m", "FSEFTSegmentLib", *args, "--progress", "json"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if f'"event": "{event}"' in line:
            break
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr, time.monotonic() - sent

