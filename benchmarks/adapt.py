"""Time and memory of an adaptation step: the frozen-feature cache against recomputing the backbone, and LoRA.

One run, same data and settings for every variant: the real abdominal CT and its liver label
(TotalSegmentator value 5), the full-size network (feature size 48, random weights: timing does not
depend on them), 6 crops of 96^3 per step, one warm-up step then `--steps` timed steps each, on the
CPU or (`--device cuda`) a CUDA GPU.

- `*-recompute`: the paper's recipe, the frozen backbone recomputed on every step's crops (fp32,
  under no_grad);
- `*-cache*`: the frozen features computed once over the whole volume (timed apart: `cache_seconds`),
  each step then runs the head alone on crops of them; `-fp32` in fp32 and channels-first, the
  others with the defaults (channels-last; `precision=auto`: bf16 autocast on a GPU with bf16 and
  where the CPU has native bf16);
- `*-floor*`: the head's forward and backward alone on 6 crops already in memory (no crop cutting,
  no optimiser): the least a step can cost;
- `lora*`: rank-4 LoRA, gradients through the whole backbone (no cache possible), one crop per
  pass, on its own copy of the network; `lora` with `precision=auto` (bf16 autocast on a GPU with
  bf16, fp32 on the CPU), `lora-fp32` in fp32. Not in the CPU default, which stays the set the CPU
  results were made with.

Step times are read from `adapt`'s progress reports (one after every optimiser step), not from its
per-epoch `seconds`: those read the clock with the epoch's optimiser update still queued on CUDA (it
lands in the next epoch's time); here the GPU is synchronised before every clock reading.

Ratios: per-step speed-up of each cached variant over its recompute variant, and its distance to the
floor; `projected_*` totals for the paper's recipe length (200 epochs of one support) including the
one-off caching; `loss_vs_fp32`: the largest difference of the per-step training loss between a
cached variant and its fp32 twin on the same crops (how much bf16 changes the optimisation).

On CUDA, also: `peak_gpu_mb`, the peak GPU memory allocated during the variant, the weights of the
one network it uses included (LoRA's copy is made on the CPU, so the base network is not counted
twice); `cache_peak_gpu_mb` for the variants on the cache, the peak while it was computed;
`fits_12gb`, whether the variant's run, its caching included, stays under 12 GiB (the paper: black-box
runs fit a 12 GB GPU); and every variant's `step_ratio_vs_sa_recompute` and
`gpu_memory_ratio_vs_sa_recompute` against the paper's spatial-adapter recipe, when it ran.
The CT is read from $FSEFT_SHARED_DATA (default ../shared/data)/real-ct/totalseg-abdomen.

    .venv/bin/python benchmarks/adapt.py [--device cpu|cuda] [--steps 3] [--variants lp-cache,...] [--json out.json]
    .venv/bin/python benchmarks/adapt.py --quick   # tiny network, a 64^3 cut, 1 step: proves it runs
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import SHARED_DATA, clock  # noqa: E402  (beside this script)
from FSEFTSegmentLib.progress import Progress  # noqa: E402  (stdlib only; needs the path above)

CT_DIR = SHARED_DATA / "real-ct" / "totalseg-abdomen"
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
    "lora": ("lora", False, "auto", None),
    "lora-fp32": ("lora", False, "fp32", False),
}
DEFAULT_VARIANTS = {
    "cpu": tuple(name for name, (method, *_) in VARIANTS.items() if method != "lora"),
    "cuda": ("lp-cache", "sa-recompute", "sa-cache", "sa-cache-fp32", "sa-floor", "lora", "lora-fp32"),
}
RECIPE_STEPS = 200  # the paper's maximum: 200 epochs of K = 1 support
GPU_12GB_MB = 12 * 1024
# summary table: header, result key, width, format
COLUMNS = (
    ("step s", "step_seconds", 8, ".3f"),
    ("total s", "total_seconds", 8, ".1f"),
    ("speed-up", "speedup_vs_recompute", 9, ".1f"),
    ("x floor", "vs_floor", 8, ".2f"),
    ("200-step s", "projected_recipe_seconds", 10, ".0f"),
    ("200-step x", "projected_speedup_vs_recompute", 10, ".1f"),
    ("break-even", "break_even_steps", 10, ".1f"),
    ("|dloss|", "loss_vs_fp32", 8, ".5f"),
)
GPU_COLUMNS = (
    ("GPU MB", "peak_gpu_mb", 8, ".0f"),
    ("step/sa-rec", "step_ratio_vs_sa_recompute", 11, ".3f"),
    ("mem/sa-rec", "gpu_memory_ratio_vs_sa_recompute", 10, ".2f"),
    ("12 GB", "fits_12gb", 5, ""),
)


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

    from FSEFTSegmentLib.model.network import FoundationSwinUNETR
    from FSEFTSegmentLib.training import TrainingCase, TrainingSettings, cache_features

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    architecture, case = load_case(args.quick)
    torch.manual_seed(0)
    network = FoundationSwinUNETR(architecture).eval().to(device)
    crops = args.crops or (2 if args.quick else 6)
    steps = 1 if args.quick else args.steps
    settings = TrainingSettings(crops_per_step=crops, early_stop=False, max_epochs=1 + steps, seed=0)
    names = [name for name in args.variants.split(",") if name]
    gpu = torch.cuda.get_device_name(device) if cuda else None
    print(f"model space {tuple(case.volume.shape[1:])}, liver {int(case.label.sum())} voxels, "
          f"feature size {architecture.feature_size}, {crops} crops of {architecture.patch_size}^3, "
          f"{steps} timed step(s), {gpu or f'{torch.get_num_threads()} threads'}", flush=True)

    cache = None
    cache_seconds = None
    cache_peak = None
    if any(VARIANTS[name][1] is not False for name in names):
        if cuda:  # warm-up on one window: CUDA context and kernel selection are no part of the caching time
            window = architecture.patch_size
            cache_features(network, TrainingCase(case.id, case.volume[..., :window, :window, :window]), device, settings).close()
            start_gpu_peak(device)
        started = clock(device)
        cache = cache_features(network, case, device, settings)
        cache_seconds = clock(device) - started
        note = ""
        if cuda:
            cache_peak = gpu_peak_mb(device)
            note = f", peak GPU {cache_peak:.0f} MiB"
        print(f"feature cache: {cache_seconds:.1f} s, {cache.nbytes / 2**20:.0f} MiB fp16{note}", flush=True)

    results = []
    for name in names:
        result = run_variant(name, network, case, cache, cache_seconds, settings, device)
        if cuda:
            uses_cache = VARIANTS[name][1] is not False
            result["gpu"] = gpu
            if uses_cache:
                result["cache_peak_gpu_mb"] = cache_peak
            result["fits_12gb"] = max(result["peak_gpu_mb"], cache_peak if uses_cache else 0) < GPU_12GB_MB
        results.append(result)
        print(json.dumps(result), flush=True)
    if cache is not None:
        cache.close()
    summarise(results)
    return results


def run_variant(name, network, case, cache, cache_seconds, base, device) -> dict:
    """One variant's timings (and on CUDA its peak GPU memory); `base` holds the settings every variant shares."""
    import dataclasses

    import torch

    from FSEFTSegmentLib.methods import get_method
    from FSEFTSegmentLib.methods.adapted import AdaptedModel
    from FSEFTSegmentLib.training import TrainingCase, adapt

    method_name, use_cache, precision, channels_last = VARIANTS[name]
    method = get_method(method_name)
    if method.black_box:
        own = network.to(device)  # back from the CPU after a LoRA variant
    else:  # trains through the backbone, changing it: its own copy, made on the CPU so only its weights reach the GPU
        own = copy.deepcopy(network.cpu())
    if device.type == "cuda":
        start_gpu_peak(device)
    torch.manual_seed(1)
    model = AdaptedModel(own, method, [LIVER])
    result = {"variant": name, "method": method_name, "precision": precision}
    if use_cache is None:
        timed_steps = base.max_epochs - 1  # after the warm-up step, as adapt's variants
        result["step_seconds"] = floor_step_seconds(model, cache, base.crops_per_step, timed_steps, precision, channels_last, device)
    else:
        settings = dataclasses.replace(base, feature_cache=use_cache, precision=precision, channels_last=channels_last)
        support = TrainingCase(case.id, case.volume, case.label, features=cache if use_cache else None)
        steps = StepClock(device)
        trained = adapt(model, [support], settings, device, progress=steps)
        if len(steps.seconds) != len(trained.curve):
            raise RuntimeError("adapt's progress reports no longer mark one step each: the step times would be wrong")
        timed = steps.seconds[1:]
        result["step_seconds"] = round(sum(timed) / len(timed), 3)
        result["losses"] = [entry["loss"] for entry in trained.curve]
        result["cache_seconds"] = round(cache_seconds, 2) if use_cache else 0.0
        result["total_seconds"] = round(result["cache_seconds"] + sum(steps.seconds), 2)
        result["projected_recipe_seconds"] = round(result["cache_seconds"] + RECIPE_STEPS * result["step_seconds"], 1)
    if device.type == "cuda":
        result["peak_gpu_mb"] = gpu_peak_mb(device)
    return result


def floor_step_seconds(model, cache, crops, steps, precision, channels_last, device) -> float:
    """The head's forward and backward alone on crops already in memory: the least a step can cost."""
    import torch

    from FSEFTSegmentLib.training import step_autocast_dtype

    dtype = step_autocast_dtype(device, precision, cached=True)
    layout = torch.channels_last_3d if channels_last is not False else torch.contiguous_format
    head = model.head.to(device, memory_format=layout)
    size = model.network.architecture.patch_size
    batch = cache.crops([(0, 0, 0)] * crops, size).to(device).contiguous(memory_format=layout)
    label = torch.zeros((crops, 1, size, size, size), device=device)
    times = []
    for _ in range(1 + steps):
        head.zero_grad()
        started = clock(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = head(batch)
        torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), label).backward()
        times.append(clock(device) - started)
    return round(sum(times[1:]) / steps, 3)


def start_gpu_peak(device) -> None:
    """Restart the peak of allocated GPU memory from what is allocated now (an earlier variant's
    leftovers collected first)."""
    import torch

    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device) -> float:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


class StepClock(Progress):
    """Marks the end of every step of `adapt`, which reports progress after each optimiser step; its
    "adapting with ..." message, the last thing before the first step, starts the clock."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.marks: list[float] = []

    def info(self, message: str, **fields) -> None:
        self.marks = [clock(self.device)]

    def step(self, fraction: float, message: str = "", **fields) -> None:
        self.marks.append(clock(self.device))

    @property
    def seconds(self) -> list[float]:
        """Each step's duration, in order."""
        return [end - start for start, end in zip(self.marks, self.marks[1:])]


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

    sa_recompute = by_name.get("sa-recompute")
    if sa_recompute and "peak_gpu_mb" in sa_recompute:  # CUDA runs only: the CPU results keep their keys
        for r in results:
            r["step_ratio_vs_sa_recompute"] = round(r["step_seconds"] / sa_recompute["step_seconds"], 3)
            r["gpu_memory_ratio_vs_sa_recompute"] = round(r["peak_gpu_mb"] / sa_recompute["peak_gpu_mb"], 2)

    columns = COLUMNS + (GPU_COLUMNS if any("peak_gpu_mb" in r for r in results) else ())
    print(f"\n{'variant':15}" + "".join(f" {header:>{width}}" for header, _, width, _ in columns))
    for r in results:
        print(f"{r['variant']:15}" + "".join(f" {cell(r.get(key), fmt):>{width}}" for _, key, width, fmt in columns))


def cell(value, fmt: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=tuple(DEFAULT_VARIANTS), default="cpu")
    parser.add_argument("--variants", help="comma-separated (default: the device's set, see the module doc)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--crops", type=int, help="crops per step (default 6; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny network on a 64^3 cut, one step: a smoke test")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.variants = args.variants or ",".join(DEFAULT_VARIANTS[args.device])
    unknown = [name for name in args.variants.split(",") if name and name not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not (CT_DIR / "ct.nii.gz").exists():
        sys.exit(f"benchmark needs the real CT at {CT_DIR}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch sees no CUDA GPU here")
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
