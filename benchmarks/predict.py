"""Time and peak memory of predicting a real CT with the full-size network on the CPU.

Ours (FSEFTSegmentLib's predictor, in several settings) against a plain MONAI
`sliding_window_inference` loop (the paper's settings: one window per batch, `torch.no_grad`, MONAI's
default attention) over the same network and the same preprocessed volume, each
variant in its own process so its peak resident memory is its own. Weights are random (timing does
not depend on them); agreement with the baseline is reported as the max probability difference
and the Dice of the thresholded masks over all 29 channels.

    .venv/bin/python benchmarks/predict.py [--variants baseline,ours,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CT = ROOT.parent / "shared" / "data" / "real-ct" / "totalseg-abdomen" / "ct.nii.gz"
VARIANTS = {
    # name: (our predictor?, sw_batch_size, precision, channels_last)
    "baseline": (False, 1, "fp32", False),
    "ours-fp32": (True, 2, "fp32", False),
    "ours-fp32-channels-last": (True, 2, "fp32", True),
    "ours-bf16": (True, 2, "bf16", False),
    "ours-bf16-channels-last": (True, 2, "bf16", True),
}


def run_variant(name: str, probabilities_out: Path) -> dict:
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference

    from FSEFTSegmentLib.inference import InferenceSettings, SegmentationPredictor
    from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR
    from FSEFTSegmentLib.preprocessing import CTPreprocessing

    ours, batch, precision, channels_last = VARIANTS[name]
    torch.manual_seed(0)
    network = FoundationSwinUNETR(Architecture()).eval()
    image = sitk.ReadImage(str(CT), sitk.sitkFloat32)
    volume = CTPreprocessing(network.architecture)(image)
    started = time.perf_counter()
    if ours:
        predictor = SegmentationPredictor(network, torch.device("cpu"), InferenceSettings(sw_batch_size=batch, precision=precision, channels_last=channels_last))
        logits = predictor.logits(volume, [network.classifier])
    else:
        for module in network.modules():  # plain MONAI Swin-UNETR attention (its default)
            if hasattr(module, "use_flash_attention"):
                module.use_flash_attention = False
        with torch.no_grad():
            logits = sliding_window_inference(volume[None].as_tensor(), (96,) * 3, batch, network, overlap=0.25, mode="gaussian")[0]
    seconds = time.perf_counter() - started
    torch.save(torch.sigmoid(logits.float()).to(torch.float16), probabilities_out)
    return {
        "variant": name,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_space_shape": list(volume.shape[1:]),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--probabilities", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.probabilities)))
        return
    if not CT.exists():
        sys.exit(f"benchmark needs the real CT at {CT}")
    import tempfile

    import torch

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.variants.split(","):
            out = Path(scratch) / f"{name}.pt"
            line = subprocess.run(
                [sys.executable, __file__, "--child", name, "--probabilities", str(out)],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            results.append(json.loads(line))
            print(json.dumps(results[-1]), flush=True)
        baseline = next((r for r in results if r["variant"] == "baseline"), None)
        if baseline:
            reference = torch.load(Path(scratch) / "baseline.pt").float()
            for result in results:
                probabilities = torch.load(Path(scratch) / f"{result['variant']}.pt").float()
                a, b = probabilities > 0.5, reference > 0.5
                result["speedup_vs_baseline"] = round(baseline["seconds"] / result["seconds"], 2)
                result["memory_ratio_vs_baseline"] = round(result["peak_rss_mb"] / baseline["peak_rss_mb"], 2)
                result["max_probability_difference"] = round(float((probabilities - reference).abs().max()), 4)
                result["mask_dice_vs_baseline"] = round(float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1)), 5)
    print(f"\n{'variant':26} {'seconds':>8} {'speed-up':>9} {'peak MB':>8} {'mem ratio':>9} {'max |dp|':>9} {'mask Dice':>9}")
    for r in results:
        print(f"{r['variant']:26} {r['seconds']:8.1f} {r.get('speedup_vs_baseline', 0):9.2f} {r['peak_rss_mb']:8.0f} "
              f"{r.get('memory_ratio_vs_baseline', 0):9.2f} {r.get('max_probability_difference', 0):9.4f} {r.get('mask_dice_vs_baseline', 0):9.5f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
