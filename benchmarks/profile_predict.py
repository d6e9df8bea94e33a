"""Where a prediction's time goes, read to write, stage by stage (issue 16's starting point).

Runs the prediction pipeline's own functions one after the other on the real abdomen CT of
../shared/data (or a file given with --image) and times each: reading, preprocessing (RAS,
resampling, HU window, crop), the network's windows, the inverse onto the native grid, the
threshold, the optional body mask + largest component, and the .seg.nrrd writer. One process,
torch's default threads; `--model` picks the bundled fseft-mini (default) or any checkpoint.

    .venv/bin/python benchmarks/profile_predict.py [--model NAME|PATH] [--largest-component] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHARED_DATA  # noqa: E402
from FSEFTSegmentLib.inference import InferenceSettings, SegmentationPredictor, body_mask, keep_largest_component  # noqa: E402
from FSEFTSegmentLib.io.images import read_image  # noqa: E402
from FSEFTSegmentLib.model import load_foundation_model  # noqa: E402
from FSEFTSegmentLib.prediction import model_structures, write_outputs  # noqa: E402

ABDOMEN = SHARED_DATA / "real-ct" / "totalseg-abdomen" / "ct.nii.gz"


def profile(model: str, image_path: Path, largest_component: bool) -> dict:
    stages: dict[str, float] = {}

    def timed(name: str, work):
        started = time.perf_counter()
        result = work()
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - started
        return result

    network = timed("load model", lambda: load_foundation_model(model))
    predictor = SegmentationPredictor(network, torch.device("cpu"), InferenceSettings(largest_component=largest_component))
    image = timed("read", lambda: read_image(image_path))
    volume = timed("preprocess", lambda: predictor.preprocessing(image))
    logits = timed("network (windows + blending)", lambda: predictor.logits(volume, [network.classifier]))
    masks = np.empty((logits.shape[0],) + tuple(reversed(image.GetSize())), dtype=np.uint8)
    body = timed("body mask", lambda: body_mask(image)) if largest_component else None
    for channel in range(logits.shape[0]):
        probability = timed("sigmoid + inverse to native grid", lambda: predictor.preprocessing.to_native(torch.sigmoid(logits[channel]), volume, image))
        masks[channel] = timed("threshold", lambda: probability > 0.5)
        if largest_component:
            masks[channel] = timed("largest component", lambda: keep_largest_component(masks[channel] & body))
    with tempfile.TemporaryDirectory() as folder:
        timed("write .seg.nrrd", lambda: write_outputs(masks, image, model_structures(network.architecture), Path(folder), "ct", ("seg.nrrd",)))
    read_to_write = sum(seconds for name, seconds in stages.items() if name != "load model")
    return {
        "model": model,
        "image": str(image_path),
        "native_size": list(image.GetSize()),
        "model_space_size": list(volume.shape[1:]),
        "threads": torch.get_num_threads(),
        "seconds": {name: round(seconds, 3) for name, seconds in stages.items()},
        "read_to_write_seconds": round(read_to_write, 3),
        "share_outside_network": round(1 - stages["network (windows + blending)"] / read_to_write, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fseft-mini")
    parser.add_argument("--image", type=Path, default=ABDOMEN)
    parser.add_argument("--largest-component", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.image.exists():
        print(f"no image at {args.image} (give --image, or put ../shared/data beside the project)", file=sys.stderr)
        return 2
    result = profile(args.model, args.image, args.largest_component)
    width = max(map(len, result["seconds"]))
    for name, seconds in result["seconds"].items():
        print(f"{name:{width}}  {seconds:8.3f} s")
    print(f"{'read to write':{width}}  {result['read_to_write_seconds']:8.3f} s  "
          f"({100 * result['share_outside_network']:.0f} % outside the network)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
