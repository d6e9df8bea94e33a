"""Time and peak memory of predicting a real CT with the full-size network, on the CPU or a CUDA GPU.

Ours (FSEFTSegmentLib's predictor, in several settings) against a plain MONAI
`sliding_window_inference` loop (the paper's settings: one window per batch, fp32, `torch.no_grad`,
MONAI's default attention) over the same network and the same preprocessed volume, each
variant in its own process so its peak memory is its own. Weights are random (timing does
not depend on them); agreement with the baseline is reported as the max probability difference
and the Dice of the thresholded masks over all 29 channels.

On `--device cuda` both run their windows on the GPU and blend on the CPU (MONAI's `sw_device` and
`device`, as our predictor does), the variants are the CUDA set (`precision=auto`: bf16 autocast,
fp16 where the GPU lacks bf16), each is timed on its second pass (the first one sets up the CUDA
context and picks kernels) with the GPU synchronised before the clock is read, and memory is the
peak of GPU memory allocated during the timed pass (`peak_gpu_mb`, weights included; the
ratio is `gpu_memory_ratio_vs_baseline`); on the CPU it is the process's peak resident memory.
`--quick` uses a tiny network (feature size 12, 64^3 windows) on a centred 64x64x96 cut of the CT (two
windows): a dry run that proves the script runs.
The CT is read from $FSEFT_SHARED_DATA (default ../shared/data)/real-ct/totalseg-abdomen/ct.nii.gz.

    .venv/bin/python benchmarks/predict.py [--device cpu|cuda] [--variants baseline,ours-fp32,...] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import SHARED_DATA, clock  # noqa: E402  (beside this script)
CT = SHARED_DATA / "real-ct" / "totalseg-abdomen" / "ct.nii.gz"
# name: (our predictor?, sw_batch_size (None: our default), precision, channels_last (None: our default))
VARIANTS = {
    "cpu": {
        "baseline": (False, 1, "fp32", False),
        "ours-fp32-contiguous": (True, None, "fp32", False),  # inference mode + fused attention alone
        "ours-fp32": (True, None, "fp32", None),  # the default: + channels-last (with its instance norm)
        "ours-fp32-sw2": (True, 2, "fp32", None),
        "ours-bf16": (True, None, "bf16", None),
    },
    "cuda": {
        "baseline": (False, 1, "fp32", False),
        "ours-fp32": (True, None, "fp32", None),
        "ours-auto": (True, None, "auto", None),
        "ours-auto-sw4": (True, 4, "auto", None),
    },
}


def run_variant(name: str, device_name: str, quick: bool, probabilities_out: Path) -> dict:
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference

    from FSEFTSegmentLib.inference import InferenceSettings, SegmentationPredictor
    from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR
    from FSEFTSegmentLib.preprocessing import CTPreprocessing

    ours, batch, precision, channels_last = VARIANTS[device_name][name]
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    network = FoundationSwinUNETR(Architecture(feature_size=12, patch_size=64) if quick else Architecture()).eval().to(device)
    image = sitk.ReadImage(str(CT), sitk.sitkFloat32)
    volume = CTPreprocessing(network.architecture)(image)
    if quick:  # a centred cut one window by one by 1.5: two overlapping windows
        window = network.architecture.patch_size
        cut = (window, window, window * 3 // 2)
        volume = volume[(slice(None), *(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(volume.shape[1:], cut)))]
    if ours:
        predictor = SegmentationPredictor(network, device, InferenceSettings(sw_batch_size=batch, precision=precision, channels_last=channels_last))

        def predict():
            return predictor.logits(volume, [network.classifier])
    else:
        for module in network.modules():  # plain MONAI Swin-UNETR attention (its default)
            if hasattr(module, "use_flash_attention"):
                module.use_flash_attention = False
        roi = (network.architecture.patch_size,) * 3

        def predict():
            with torch.no_grad():
                return sliding_window_inference(
                    volume[None].as_tensor(), roi, batch, network, overlap=0.25, mode="gaussian", sw_device=device, device="cpu"
                )[0]
    if cuda:
        predict()  # warm-up: CUDA context, kernel selection
        torch.cuda.reset_peak_memory_stats(device)
    started = clock(device)
    logits = predict()
    seconds = clock(device) - started
    torch.save(torch.sigmoid(logits.float()).to(torch.float16), probabilities_out)
    result = {
        "variant": name,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_space_shape": list(volume.shape[1:]),
        "threads": torch.get_num_threads(),
    }
    if cuda:
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    if quick:
        result["quick"] = True
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=tuple(VARIANTS), default="cpu")
    parser.add_argument("--variants", help="comma-separated (default: every variant of the device's set)")
    parser.add_argument("--quick", action="store_true", help="tiny network on a two-window cut: a dry run that proves the script runs")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--probabilities", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.device, args.quick, args.probabilities)))
        return
    variants = VARIANTS[args.device]
    names = args.variants.split(",") if args.variants else list(variants)
    unknown = [name for name in names if name not in variants]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)} for --device {args.device}; choose from {', '.join(variants)}")
    if not CT.exists():
        sys.exit(f"benchmark needs the real CT at {CT}")
    import tempfile

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch sees no CUDA GPU here")
    memory_key, ratio_key = ("peak_gpu_mb", "gpu_memory_ratio_vs_baseline") if args.device == "cuda" else ("peak_rss_mb", "memory_ratio_vs_baseline")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            out = Path(scratch) / f"{name}.pt"
            child = subprocess.run(
                [sys.executable, __file__, "--child", name, "--device", args.device, "--probabilities", str(out)]
                + (["--quick"] if args.quick else []),
                capture_output=True, text=True,
            )
            if child.returncode:
                sys.exit(f"variant {name} failed:\n{child.stderr.strip()}")
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        baseline = next((r for r in results if r["variant"] == "baseline"), None)
        if baseline:
            reference = torch.load(Path(scratch) / "baseline.pt").float()
            for result in results:
                probabilities = torch.load(Path(scratch) / f"{result['variant']}.pt").float()
                a, b = probabilities > 0.5, reference > 0.5
                result["speedup_vs_baseline"] = round(baseline["seconds"] / result["seconds"], 2)
                result[ratio_key] = round(result[memory_key] / baseline[memory_key], 2)
                result["max_probability_difference"] = round(float((probabilities - reference).abs().max()), 4)
                result["mask_dice_vs_baseline"] = round(float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1)), 5)
    memory_header = "GPU MB" if args.device == "cuda" else "peak MB"
    print(f"\n{'variant':26} {'seconds':>8} {'speed-up':>9} {memory_header:>8} {'mem ratio':>9} {'max |dp|':>9} {'mask Dice':>9}")
    for r in results:
        print(f"{r['variant']:26} {r['seconds']:8.1f} {r.get('speedup_vs_baseline', 0):9.2f} {r[memory_key]:8.0f} "
              f"{r.get(ratio_key, 0):9.2f} {r.get('max_probability_difference', 0):9.4f} {r.get('mask_dice_vs_baseline', 0):9.5f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
