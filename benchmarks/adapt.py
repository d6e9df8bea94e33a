"""Time of a black-box adaptation step with the frozen-feature cache against recomputing the backbone.

One run, same data and settings for every variant: the real abdominal CT and its liver label
(TotalSegmentator value 5), the full-size network (feature size 48, random weights: timing does not
depend on them), 6 crops of 96^3 per step, one warm-up step then `--steps` timed steps each.

- `*-recompute`: the paper's recipe, the frozen backbone recomputed on every step's crops (fp32,
  under no_grad);
- `*-cache*`: the frozen features computed once over the whole volume (timed apart: `cache_seconds`),
  each step then runs the head alone on crops of them; `-fp32` in fp32 and channels-first, the
  others with the defaults (`precision=auto`: bf16 autocast and channels-last where the CPU has
  native bf16);
- `*-floor*`: the head's forward and backward alone on 6 crops already in memory (no crop cutting,
  no optimiser): the least a step can cost.

Ratios: per-step speed-up of each cached variant over its recompute variant, and its distance to the
floor; `projected_*` totals for the paper's recipe length (200 epochs of one support) including the
one-off caching; `loss_vs_fp32`: the largest difference of the per-step training loss between a
cached variant and its fp32 twin on the same crops (how much bf16 changes the optimisation).

    .venv/bin/python benchmarks/adapt.py [--steps 3] [--variants lp-cache,...] [--json out.json]
    .venv/bin/python benchmarks/adapt.py --quick   # tiny network, a 64^3 cut, 1 step: proves it runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CT_DIR = ROOT.parent / "shared" / "data" / "real-ct" / "totalseg-abdomen"
LIVER = 5

# name: (method, feature cache, precision, channels_last)
VARIANTS = {
    "lp-recompute": ("linear-probe", False, "fp32", False),
    "lp-cache-fp32": ("linear-probe", True, "fp32", False),
    "lp-cache": ("linear-probe", True, "auto", None),
    "sa-recompute": ("spatial-adapter", False, "fp32", False),
    "sa-cache-fp32": ("spatial-adapter", True, "fp32", False),
    "sa-cache": ("spatial-adapter", True, "auto", None),
    "lp-floor": ("linear-probe", None, "auto", None),
    "sa-floor-fp32": ("spatial-adapter", None, "fp32", False),
    "sa-floor": ("spatial-adapter", None, "auto", None),
}
RECIPE_STEPS = 200  # the paper's maximum: 200 epochs of K = 1 support


def load_case(quick: bool):
    import numpy as np
    import SimpleITK as sitk
    import torch

    from FSEFTSegmentLib.model.network import Architecture
    from FSEFTSegmentLib.preprocessing import CTPreprocessing
    from FSEFTSegmentLib.training import TrainingCase

    architecture = Architecture(feature_size=12, patch_size=64) if quick else Architecture()
    image = sitk.ReadImage(str(CT_DIR / "ct.nii.gz"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(CT_DIR / "labels-totalsegmentator.nii.gz"))
    preprocessing = CTPreprocessing(architecture)
    preprocessed = preprocessing(image)
    mask = (sitk.GetArrayFromImage(labels) == LIVER).astype(np.uint8)[None]
    label = preprocessing.masks_to_model_space(mask, labels, preprocessed)
    volume = preprocessed.as_tensor()
    if quick:  # one 64^3 window around the liver's centre
        centre = [int(c.float().mean()) for c in torch.nonzero(label[0], as_tuple=True)]
        start = [min(max(c - 32, 0), n - 64) for c, n in zip(centre, label.shape[1:])]
        cut = tuple(slice(s, s + 64) for s in start)
        volume, label = volume[(slice(None), *cut)].contiguous(), label[(slice(None), *cut)].contiguous()
    return architecture, TrainingCase("totalseg-abdomen", volume, label)


def run(args) -> list[dict]:
    import torch

    from FSEFTSegmentLib.methods import get_method
    from FSEFTSegmentLib.methods.adapted import AdaptedModel
    from FSEFTSegmentLib.model.network import FoundationSwinUNETR
    from FSEFTSegmentLib.training import (
        TrainingCase,
        TrainingSettings,
        adapt,
        cache_features,
        step_autocast_dtype,
    )

    architecture, case = load_case(args.quick)
    torch.manual_seed(0)
    network = FoundationSwinUNETR(architecture).eval()
    device = torch.device("cpu")
    crops = args.crops or (2 if args.quick else 6)
    steps = 1 if args.quick else args.steps
    base = dict(crops_per_step=crops, early_stop=False, max_epochs=1 + steps, seed=0)
    names = [name for name in args.variants.split(",") if name]
    print(f"model space {tuple(case.volume.shape[1:])}, liver {int(case.label.sum())} voxels, "
          f"feature size {architecture.feature_size}, {crops} crops of {architecture.patch_size}^3, "
          f"{steps} timed step(s), {torch.get_num_threads()} threads", flush=True)

    cache = None
    cache_seconds = None
    if any(VARIANTS[name][1] is not False for name in names):
        started = time.perf_counter()
        cache = cache_features(network, case, device, TrainingSettings(**base))
        cache_seconds = time.perf_counter() - started
        print(f"feature cache: {cache_seconds:.1f} s, {cache.nbytes / 2**20:.0f} MiB fp16", flush=True)

    results = []
    for name in names:
        method, use_cache, precision, channels_last = VARIANTS[name]
        torch.manual_seed(1)
        model = AdaptedModel(network, get_method(method), [LIVER])
        result = {"variant": name, "method": method, "precision": precision}
        if use_cache is None:  # the floor: head forward + backward on crops already in memory
            settings = TrainingSettings(**base, precision=precision, channels_last=channels_last)
            dtype = step_autocast_dtype(device, precision, cached=True)
            layout = torch.channels_last_3d if channels_last is not False else torch.contiguous_format
            model.head.to(memory_format=layout)
            size = architecture.patch_size
            starts = [(0, 0, 0)] * crops
            batch = cache.crops(starts, size).contiguous(memory_format=layout)
            label = torch.zeros((crops, 1, size, size, size))
            times = []
            for _ in range(1 + steps):
                model.head.zero_grad()
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                    logits = model.head(batch)
                torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), label).backward()
                times.append(time.perf_counter() - started)
            model.head.to(memory_format=torch.contiguous_format)
            result["step_seconds"] = round(sum(times[1:]) / steps, 3)
            del batch, logits
        else:
            settings = TrainingSettings(**base, feature_cache=use_cache, precision=precision, channels_last=channels_last)
            support = TrainingCase(case.id, case.volume, case.label, features=cache if use_cache else None)
            trained = adapt(model, [support], settings, device)
            timed = trained.curve[1:]
            result["step_seconds"] = round(sum(entry["seconds"] for entry in timed) / len(timed), 3)
            result["losses"] = [entry["loss"] for entry in trained.curve]
            result["cache_seconds"] = round(cache_seconds, 2) if use_cache else 0.0
            result["total_seconds"] = round(result["cache_seconds"] + sum(e["seconds"] for e in trained.curve), 2)
            result["projected_recipe_seconds"] = round(result["cache_seconds"] + RECIPE_STEPS * result["step_seconds"], 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    if cache is not None:
        cache.close()
    summarise(results)
    return results


def summarise(results: list[dict]) -> None:
    by_name = {r["variant"]: r for r in results}
    for r in results:
        prefix = r["variant"].split("-")[0]
        recompute = by_name.get(f"{prefix}-recompute")
        fp32 = by_name.get(f"{prefix}-cache-fp32")
        if r["variant"].startswith(f"{prefix}-cache"):
            if recompute:
                r["speedup_vs_recompute"] = round(recompute["step_seconds"] / r["step_seconds"], 1)
                r["projected_speedup_vs_recompute"] = round(
                    recompute["projected_recipe_seconds"] / r["projected_recipe_seconds"], 1
                )
                saved = recompute["step_seconds"] - r["step_seconds"]
                r["break_even_steps"] = round(r["cache_seconds"] / saved, 1) if saved > 0 else None
            floor = by_name.get(f"{prefix}-floor" if r["precision"] == "auto" else f"{prefix}-floor-fp32")
            if floor:
                r["vs_floor"] = round(r["step_seconds"] / floor["step_seconds"], 2)
            if fp32 and fp32 is not r and fp32.get("losses") and r.get("losses"):
                r["loss_vs_fp32"] = round(max(abs(a - b) for a, b in zip(r["losses"], fp32["losses"])), 5)

    print(f"\n{'variant':15} {'step s':>8} {'total s':>8} {'speed-up':>9} {'x floor':>8} {'200-step s':>10} "
          f"{'200-step x':>10} {'break-even':>10} {'|dloss|':>8}")
    for r in results:
        def cell(key, fmt):
            value = r.get(key)
            return format(value, fmt) if isinstance(value, (int, float)) else "-"
        print(f"{r['variant']:15} {r['step_seconds']:8.3f} {cell('total_seconds', '8.1f'):>8} "
              f"{cell('speedup_vs_recompute', '9.1f'):>9} {cell('vs_floor', '8.2f'):>8} "
              f"{cell('projected_recipe_seconds', '10.0f'):>10} {cell('projected_speedup_vs_recompute', '10.1f'):>10} "
              f"{cell('break_even_steps', '10.1f'):>10} {cell('loss_vs_fp32', '8.5f'):>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--crops", type=int, help="crops per step (default 6; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny network on a 64^3 cut, one step: a smoke test")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    unknown = [name for name in args.variants.split(",") if name and name not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not (CT_DIR / "ct.nii.gz").exists():
        sys.exit(f"benchmark needs the real CT at {CT_DIR}")
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
