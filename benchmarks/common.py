"""What the benchmark scripts share: where the test data lies and a clock that waits for the GPU."""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: ../shared/data beside the project, or $FSEFT_SHARED_DATA (on the GPU machine the data travels elsewhere)
SHARED_DATA = Path(os.environ.get("FSEFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def clock(device) -> float:
    """The time once the device has finished the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter()
