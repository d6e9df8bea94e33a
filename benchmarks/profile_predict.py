"""Where a prediction's time goes, read to write, as a user meets it: `fseft predict`, stage by stage.

Runs the real command (`python -m FSEFTSegmentLib predict ... --progress json`), one process per
case, and reads the `stage_seconds` of its `study_done` event: read, preprocess (RAS, resampling,
HU window, crop), network (windows + blending), to native grid (inverse resampling + threshold),
[body mask + largest component,] write. Also the process's own start (imports, model load: the
wall time outside the study) and its peak resident memory. Cases:

- the real abdomen CT of ../shared/data (122 x 101 x 112 at 3 mm, NIfTI);
- a DICOM series made from it: resampled to 512 x 512 x 20 (0.71 mm in-plane, 5 mm slices),
  int16, one file a slice (the shape of a clinical thick-slice series; its content is the
  same CT, so the network sees the same anatomy);

each with the bundled fseft-mini (trained weights) and the full-size network (feature size 48,
random weights: timing does not depend on them). Default settings, torch's default threads.

`--keep DIR` keeps each case's .seg.nrrd under DIR/<model>/<case>/; `--compare DIR` scores them
against those of an earlier `--keep` (mask Dice per structure: the check that a speed-up left the
outputs as they were).

    .venv/bin/python benchmarks/profile_predict.py [--models fseft-mini,full] [--largest-component]
        [--keep DIR] [--compare DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))
from common import SHARED_DATA  # noqa: E402  (beside this script)

ABDOMEN = SHARED_DATA / "real-ct" / "totalseg-abdomen" / "ct.nii.gz"


def thick_slice_series(ct: Path, folder: Path) -> Path:
    """The CT resampled onto a 512 x 512 x 20 grid of 5 mm slices over its centre, as a DICOM series."""
    import SimpleITK as sitk
    from synthetic import write_dicom_series

    image = sitk.ReadImage(str(ct), sitk.sitkFloat32)
    size = (512, 512, 20)
    spacing = (image.GetSize()[0] * image.GetSpacing()[0] / 512, image.GetSize()[1] * image.GetSpacing()[1] / 512, 5.0)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(image.GetDirection())
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    offset = grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
    grid.SetOrigin([c - o for c, o in zip(centre, offset)])
    series = sitk.Cast(sitk.Round(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0)), sitk.sitkInt16)
    write_dicom_series(series, folder, "1.2.826.0.1.3680043.2.1125.16.512")
    return folder


def full_size_checkpoint(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in FoundationSwinUNETR(Architecture()).state_dict().items()}, str(path))
    return path


def run_case(model: str, image: Path, out: Path, largest_component: bool) -> dict:
    """One `fseft predict` process: its study's stage seconds, its start, its peak memory."""
    command = [sys.executable, "-m", "FSEFTSegmentLib", "predict", str(image), "--model", model, "--out", str(out), "--progress", "json"]
    command += ["--largest-component"] if largest_component else []
    with tempfile.TemporaryFile("w+") as errors:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT)
        stdout = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)  # reaps it with its own resource usage
        wall = time.perf_counter() - started
        child.stdout.close()
        if os.waitstatus_to_exitcode(status):
            errors.seek(0)
            raise SystemExit(f"fseft predict failed on {image}:\n{errors.read().strip()}")
    done = next(json.loads(line) for line in stdout.splitlines() if '"study_done"' in line)
    stages = done["stage_seconds"]
    study = sum(stages.values())
    return {
        "stage_seconds": stages,
        "read_to_write_seconds": round(study, 3),
        "share_outside_network": round(1 - stages["network"] / study, 3),
        "process_seconds": round(wall, 2),
        "start_seconds": round(wall - done["seconds"], 2),  # imports, model load, event stream
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def mask_agreement(ours: Path, theirs: Path) -> dict:
    """Dice of two .seg.nrrd files of the same study over all their segments' voxels together
    (as benchmarks/predict.py scores masks), the worst segment's Dice, and the voxels that differ."""
    import numpy as np
    import SimpleITK as sitk
    import slicerio

    from FSEFTSegmentLib.io.segmentations import read_structure_mask

    overlap = total = differing = 0
    worst = 1.0
    for segment in slicerio.read_segmentation(str(ours), skip_voxels=True)["segments"]:
        a, b = (sitk.GetArrayFromImage(read_structure_mask(path, segment["id"])).astype(bool) for path in (ours, theirs))
        both, size = int(np.count_nonzero(a & b)), int(a.sum() + b.sum())
        overlap, total, differing = overlap + both, total + size, differing + int(np.count_nonzero(a != b))
        if size:
            worst = min(worst, 2 * both / size)
    return {"dice": round(2 * overlap / max(total, 1), 6), "worst_segment_dice": round(worst, 6), "differing_voxels": differing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fseft-mini,full", help="comma-separated: fseft-mini (bundled), full (full-size, random weights), or checkpoint paths")
    parser.add_argument("--largest-component", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the outputs under DIR/<model>/<case>/")
    parser.add_argument("--compare", type=Path, help="score the outputs against those kept earlier under DIR")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not ABDOMEN.exists():
        print(f"no CT at {ABDOMEN} (set FSEFT_SHARED_DATA, or put ../shared/data beside the project)", file=sys.stderr)
        return 2
    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="fseft-profile-") as scratch:
        scratch = Path(scratch)
        cases = {"abdomen-nifti": ABDOMEN, "dicom-512x512x20": thick_slice_series(ABDOMEN, scratch / "dicom")}
        for model in args.models.split(","):
            weights = str(full_size_checkpoint(scratch / "full.safetensors")) if model == "full" else model
            for case, image in cases.items():
                out = (args.keep or scratch / "out") / model / case
                result = {"model": model, "case": case, "threads": torch.get_num_threads(), **run_case(weights, image, out, args.largest_component)}
                if args.compare:
                    result["against_earlier"] = mask_agreement(next(out.glob("*.seg.nrrd")), next((args.compare / model / case).glob("*.seg.nrrd")))
                results.append(result)
                stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in result["stage_seconds"].items())
                print(f"{model:10} {case:32} {result['read_to_write_seconds']:7.2f} s read to write "
                      f"({100 * result['share_outside_network']:.0f} % outside the network: {stages}); "
                      f"process {result['process_seconds']:.1f} s, start {result['start_seconds']:.1f} s, peak {result['peak_rss_mb']} MB"
                      + (f"; against earlier: {result['against_earlier']}" if args.compare else ""), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
