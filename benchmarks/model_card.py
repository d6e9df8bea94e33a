"""The measured numbers of a model card: zero-shot agreement with TotalSegmentator on a real CT, and
one-shot cross-patient adaptation of the aorta. Everything runs through the engine's own entry points
(`prediction.predict_with_adapters`, `fseft adapt` in a subprocess, `evaluation.evaluate`).

1. Zero-shot, real abdomen-pelvis CT (`real-ct/totalseg-abdomen`, 3 mm): Dice, surface Dice (2 mm)
   and HD95 of every model structure that the reference holds, against the TotalSegmentator
   ("fast") model output, which is NOT a manual annotation: the numbers are agreement with
   TotalSegmentator, not accuracy. Three post-processings: raw (sigmoid > 0.5), `--largest-component`
   as the engine applies it (restricted to the patient's body, then the largest component), and the
   largest component without the body restriction (ablation). Wall seconds per study.
2. One-shot cross-patient adaptation of the aorta: support = the abdomen CT with its
   TotalSegmentator aorta (id 52, abdominal aorta); query = the cardiac CT angiography
   (`real-ct/totalseg-cardiac-cta`, thoracic aorta and aortic root) scored against its
   TotalSegmentator mask `masks/aorta.nii.gz`. Methods: linear-probe, spatial-adapter, and
   spatial-adapter with the size prior, each with `fseft adapt`'s defaults (the paper's settings),
   plus the model's zero-shot aorta for comparison. Wall seconds per adaptation (including the
   model load and the query's prediction).

Results go to JSON (`--json`) with the weights' sha256 and training step, the date and the thread
count, and a Markdown table is printed for the model card.

    .venv/bin/python benchmarks/model_card.py [--model fseft-mini] [--json OUT] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "model_card.json"

ABDOMEN = Path("real-ct") / "totalseg-abdomen"
CTA = Path("real-ct") / "totalseg-cardiac-cta"
TOTALSEG_CLASSES = Path("real-ct") / "totalsegmentator-classes.json"
#: our structure name -> TotalSegmentator v2 class name, where they differ (the ids come from the
#: classes file). TotalSegmentator has no uterus class: `prostate_or_uterus` is scored on "prostate".
TOTALSEG_NAMES = {"portal_and_splenic_vein": "portal_vein_and_splenic_vein", "prostate_or_uterus": "prostate"}
AORTA_TOTALSEG = "aorta"
METHODS = {  # row name: (method, extra `fseft adapt` options)
    "linear-probe": ("linear-probe", []),
    "spatial-adapter": ("spatial-adapter", []),
    "spatial-adapter + size prior": ("spatial-adapter", ["--size-prior"]),
}
TOLERANCE_MM = 2.0


def _round(value, digits=4):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else round(value, digits)


def weights_info(model: str) -> dict:
    """Name, file, sha256 and (exported pretraining weights) the training step recorded in the file."""
    from FSEFTSegmentLib.model.checkpoint import stored_metadata
    from FSEFTSegmentLib.model.registry import model_sha256, resolve_model

    path, architecture, name = resolve_model(model)
    info = {"model": model, "name": name, "file": str(path), "sha256": model_sha256(model), "steps": None,
            "architecture": {k: v for k, v in architecture.to_dict().items() if k != "class_names"}}
    if str(path).endswith(".safetensors"):
        metadata = stored_metadata(path)
        info["steps"] = metadata.get("fseft.steps")
        info["steps_before"] = int(metadata.get("fseft.steps_before", "0")) or None  # a run continued from earlier weights
        info["training_data"] = metadata.get("fseft.training_data")
        if "fseft.validation_dice" in metadata:  # weights exported from a run's checkpoint-best.pt
            info["synthetic_validation_dice"] = json.loads(metadata["fseft.validation_dice"])
    return info


def recorder():
    from FSEFTSegmentLib.progress import Progress

    class Recorder(Progress):
        """Keeps the events (not the per-window progress); warnings still reach stderr."""

        def __init__(self):
            super().__init__()
            self.events: list[tuple[str, dict]] = []

        def emit(self, event, **fields):
            if event != "progress":
                self.events.append((event, fields))

    return Recorder()


def predict(model: str, image: Path, out: Path, device: str, structures=None, **settings) -> dict:
    """One `predict_with_adapters` run into `out` (.seg.nrrd); wall seconds and the study's own seconds."""
    from FSEFTSegmentLib.inference import InferenceSettings
    from FSEFTSegmentLib.prediction import predict_with_adapters

    progress = recorder()
    started = time.perf_counter()
    result = predict_with_adapters(model, [], [image], out, device, progress, structures, ("seg.nrrd",), InferenceSettings(**settings))
    wall = time.perf_counter() - started
    if result.failures:
        raise RuntimeError(f"prediction of {image} failed: {result.failures}")
    ((_, paths),) = result.outputs.items()
    done = next(fields for event, fields in progress.events if event == "study_done")
    return {"path": paths[0], "wall_seconds": round(wall, 2), "study_seconds": done["seconds"], "volumes_ml": done["volumes_ml"]}


def scores(pred: Path, ref: Path, selectors: list[str]) -> dict[str, dict]:
    """`evaluate` per structure: {name: {dice, surface_dice, hd95_mm, pred_ml, ref_ml}}."""
    from FSEFTSegmentLib.evaluation import evaluate, parse_structure_selectors

    out = {}
    for score in evaluate(pred, ref, parse_structure_selectors(selectors), tolerance_mm=TOLERANCE_MM, progress=recorder()):
        out[score.name] = {
            "dice": _round(score.dice), "surface_dice": _round(score.surface_dice), "hd95_mm": _round(score.hd95_mm, 2),
            "pred_ml": _round(score.pred_volume_ml, 2), "ref_ml": _round(score.ref_volume_ml, 2),
        }
    return out


def zero_shot_abdomen(model: str, data: Path, work: Path, device: str) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from FSEFTSegmentLib.model import load_foundation_model
    from FSEFTSegmentLib.prediction import model_structures

    ct, ref = data / ABDOMEN / "ct.nii.gz", data / ABDOMEN / "labels-totalsegmentator.nii.gz"
    classes = {name: int(value) for value, name in json.loads((data / TOTALSEG_CLASSES).read_text()).items()}
    present = set(np.unique(sitk.GetArrayViewFromImage(sitk.ReadImage(str(ref)))).tolist())
    structures = [s.name for s in model_structures(load_foundation_model(model).architecture)]
    mapping, absent = {}, []
    for name in structures:
        value = classes.get(TOTALSEG_NAMES.get(name, name))
        if value is not None and value in present:
            mapping[name] = value
        else:
            absent.append(name)
    selectors = [f"{name}={name}:{value}" for name, value in mapping.items()]
    variants = {  # name: InferenceSettings fields
        "raw": {},
        "largest_component": {"largest_component": True},  # the engine's --largest-component (body mask first)
        "largest_component_no_body_mask": {"largest_component": True, "body_mask": False},
    }
    runs, per_variant = {}, {}
    for variant, settings in variants.items():
        print(f"zero-shot abdomen: {variant} ...", file=sys.stderr, flush=True)
        runs[variant] = predict(model, ct, work / f"zero-shot-{variant}", device, **settings)
        per_variant[variant] = scores(runs[variant]["path"], ref, selectors)
    image = sitk.ReadImage(str(ct))
    table = {
        name: {"totalsegmentator_id": value, "totalsegmentator_name": TOTALSEG_NAMES.get(name, name),
               **{variant: per_variant[variant][name] for variant in variants}}
        for name, value in mapping.items()
    }
    return {
        "image": str(ct),
        "reference": f"{ref} (TotalSegmentator 'fast' model output, not manual: agreement with TotalSegmentator, not accuracy)",
        "grid": {"size": list(image.GetSize()), "spacing_mm": [round(s, 3) for s in image.GetSpacing()]},
        "structures": table,
        "not_in_reference": absent,
        "mean_dice": {variant: _round(float(np.mean([per_variant[variant][n]["dice"] for n in mapping]))) for variant in variants},
        "mean_surface_dice": {variant: _round(float(np.mean([per_variant[variant][n]["surface_dice"] for n in mapping]))) for variant in variants},
        "seconds": {variant: {"wall": run["wall_seconds"], "study": run["study_seconds"]} for variant, run in runs.items()},
        "inference_seconds_per_study": runs["raw"]["study_seconds"],
        "inference_note": "study seconds: read + preprocess + sliding window + inverse mapping + write, one .seg.nrrd with every structure; wall adds the model load",
    }


def aorta_support(data: Path, work: Path) -> tuple[Path, float]:
    """The abdomen CT's TotalSegmentator aorta as a binary label map (value 1) on the CT's grid, and its mL."""
    import SimpleITK as sitk

    classes = {name: int(value) for value, name in json.loads((data / TOTALSEG_CLASSES).read_text()).items()}
    labels = sitk.ReadImage(str(data / ABDOMEN / "labels-totalsegmentator.nii.gz"))
    mask = sitk.Cast(labels == classes[AORTA_TOTALSEG], sitk.sitkUInt8)
    path = work / "support-aorta.nii.gz"
    sitk.WriteImage(mask, str(path), useCompression=True)
    voxels = int(sitk.GetArrayViewFromImage(mask).sum())
    spacing = mask.GetSpacing()
    return path, voxels * spacing[0] * spacing[1] * spacing[2] / 1000.0


def adapt(model: str, method: str, options: list[str], support: tuple[Path, Path], query: Path, out: Path, device: str) -> dict:
    """`fseft adapt ... --predict-queries` in a subprocess; its wall time and what the adapter records."""
    command = [
        sys.executable, "-m", "FSEFTSegmentLib", "adapt", "--model", model, "--method", method,
        "--support", str(support[0]), f"{support[1]}:1", "--structure", "aorta=1", "--query", str(query),
        "--predict-queries", "--out", str(out), "--device", device, "--progress", "json", *options,
    ]
    print(f"adapt: {method} {' '.join(options)} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"fseft adapt failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    metadata = json.loads((out / "adapter.json").read_text())
    predictions = sorted((out / "predictions").glob("*.seg.nrrd"))
    if len(predictions) != 1:
        raise RuntimeError(f"expected one query prediction in {out / 'predictions'}, found {predictions}")
    prior = (metadata.get("size_prior") or {}).get("aorta")
    return {
        "prediction": predictions[0],
        "wall_seconds": round(wall, 2),
        "training_seconds": metadata.get("training_seconds"),
        "epochs": metadata.get("epochs"),
        "stopped_early": metadata.get("stopped_early"),
        "trainable_parameters": metadata.get("trainable_parameters"),
        "learning_rate": (metadata.get("hyper_parameters") or {}).get("learning_rate")
        or max((epoch["lr"] for epoch in metadata.get("training_curve") or []), default=None),
        "size_prior_ml": _round(prior.get("prior_ml"), 1) if prior else None,
        "command": " ".join(command[1:]),
    }


def cross_patient_aorta(model: str, data: Path, work: Path, device: str, methods: list[str]) -> dict:
    ct, cta, ref = data / ABDOMEN / "ct.nii.gz", data / CTA / "ct.nii.gz", data / CTA / "masks" / "aorta.nii.gz"
    support, support_ml = aorta_support(data, work)
    rows = {}
    for variant, settings in {"zero-shot": {}, "zero-shot + largest component": {"largest_component": True}}.items():
        print(f"cardiac CTA: {variant} ...", file=sys.stderr, flush=True)
        run = predict(model, cta, work / f"cta-{variant.replace(' ', '').replace('+', '-')}", device, ["aorta"], **settings)
        rows[variant] = {**scores(run["path"], ref, ["aorta=aorta:1"])["aorta"], "seconds": run["study_seconds"]}
    for row in methods:
        method, options = METHODS[row]
        out = work / f"adapter-{row.replace(' ', '').replace('+', '-')}"
        run = adapt(model, method, options, (ct, support), cta, out, device)
        rows[row] = {**scores(run.pop("prediction"), ref, ["aorta=aorta:1"])["aorta"], "seconds": run["wall_seconds"], **run}
    return {
        "support": f"{ct} + TotalSegmentator aorta (abdominal aorta)",
        "query": str(cta),
        "reference": f"{ref} (TotalSegmentator model output: agreement, not accuracy)",
        "settings": "fseft adapt defaults (the paper's): max 200 epochs with early stopping, 6 crops per step, K = 1; query predicted without post-processing",
        "support_aorta_ml": round(support_ml, 1),
        "size_prior_note": (
            "the size prior expects the query's aorta to have about the support's volume; here the support shows the abdominal "
            "aorta and the query's field of view the thoracic aorta and root, so the prior's assumption does not hold by design"
        ),
        "rows": rows,
    }


def _cell(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    weights = result["weights"]
    zero = result["zero_shot_abdomen"]
    lines = [
        f"Weights: `{weights['name']}` sha256 `{weights['sha256'][:16]}…`"
        + (f", pretraining steps {weights['steps']}" if weights.get("steps") else "")
        + (f" continuing weights trained {weights['steps_before']} steps" if weights.get("steps_before") else "")
        + f"; measured {result['date'][:10]} on {result['device']} ({result['torch_threads']} torch threads).",
        "",
        (
            "**Zero-shot agreement with TotalSegmentator** (real abdomen-pelvis CT, "
            f"{'×'.join(map(str, zero['grid']['size']))} @ {zero['grid']['spacing_mm'][0]:g} mm; the reference is the "
            "TotalSegmentator model's output, not a manual annotation). Dice; LCC = `--largest-component` "
            "(body mask, then largest component); ablation: largest component without the body mask."
        ),
        "",
        "| structure | Dice raw | Dice LCC | surface Dice LCC (2 mm) | HD95 LCC mm | Dice LCC, no body mask | ref mL |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in zero["structures"].items():
        lcc = row["largest_component"]
        lines.append(
            f"| {name} | {_cell(row['raw']['dice'])} | {_cell(lcc['dice'])} | {_cell(lcc['surface_dice'])} | "
            f"{_cell(lcc['hd95_mm'], 1)} | {_cell(row['largest_component_no_body_mask']['dice'])} | {_cell(lcc['ref_ml'], 1)} |"
        )
    mean, surface = zero["mean_dice"], zero["mean_surface_dice"]
    lines += [
        (
            f"| **mean ({len(zero['structures'])})** | **{_cell(mean['raw'])}** | **{_cell(mean['largest_component'])}** | "
            f"{_cell(surface['largest_component'])} | | {_cell(mean['largest_component_no_body_mask'])} | |"
        ),
        "",
        (
            f"Not in the reference: {', '.join(zero['not_in_reference']) or 'none'}. Inference: "
            f"{zero['inference_seconds_per_study']:.1f} s per study (whole CT, all structures, read to write)."
        ),
    ]
    validation = weights.get("synthetic_validation_dice")
    if validation:
        learnt = sorted(validation.items(), key=lambda item: -item[1])
        lines += [
            "",
            (
                "**Synthetic validation** (recorded in the weights by the pretraining run, which chose them by its mean: "
                "new syntheses of training label maps, images the training never drew; unseen images of seen anatomy, "
                "raw Dice): " + ", ".join(f"{name} {value:.2f}" for name, value in learnt)
                + f"; mean {sum(validation.values()) / len(validation):.3f}."
            ),
        ]
    aorta = result.get("cross_patient_aorta")
    if aorta:
        lines += [
            "",
            (
                "**One-shot cross-patient adaptation, aorta** (support: the abdomen CT with its TotalSegmentator "
                "abdominal aorta; query: a different patient's cardiac CT angiography, thoracic aorta; reference: "
                "TotalSegmentator's aorta mask; `fseft adapt` defaults)."
            ),
            "",
            "| method | Dice | surface Dice (2 mm) | HD95 mm | pred mL / ref mL | epochs | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in aorta["rows"].items():
            epochs = row.get("epochs")
            lines.append(
                f"| {name} | {_cell(row['dice'])} | {_cell(row['surface_dice'])} | {_cell(row['hd95_mm'], 1)} | "
                f"{_cell(row['pred_ml'], 0)} / {_cell(row['ref_ml'], 0)} | {epochs if epochs is not None else '–'} | {row['seconds']:.0f} |"
            )
        reference_ml = next(iter(aorta["rows"].values()))["ref_ml"]
        lines += [
            "",
            (
                "Seconds: adaptation rows = the whole `fseft adapt` run (model load, feature cache, training, query prediction); "
                "zero-shot rows = the prediction. The size prior assumes the query's aorta has about the support's volume "
                f"({aorta['support_aorta_ml']:.0f} mL, abdominal); the query's is {reference_ml:.0f} mL (thoracic), so this "
                "cross-patient test violates its assumption on purpose."
            ),
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fseft-mini", help="registered model name or checkpoint path (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file (default: benchmarks/results/model_card.json)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (default: ../shared/data from the project root)")
    parser.add_argument("--device", default="cpu", help="cpu (default: the card's timings are CPU timings), cuda or auto")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"adaptation rows, comma-separated, '' for none (default: {','.join(METHODS)})")
    parser.add_argument("--keep", type=Path, help="keep the predictions and adapters in this folder (default: a temporary folder)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method row(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    needed = [args.data / ABDOMEN / "ct.nii.gz", args.data / ABDOMEN / "labels-totalsegmentator.nii.gz", args.data / TOTALSEG_CLASSES]
    if methods:
        needed += [args.data / CTA / "ct.nii.gz", args.data / CTA / "masks" / "aorta.nii.gz"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        print(f"model_card: skipped: the shared data is not there ({', '.join(missing)}); see ../shared/data/README.md", file=sys.stderr)
        return 0
    model = str(Path(args.model).resolve()) if Path(args.model).expanduser().is_file() else args.model

    import torch

    started = time.perf_counter()
    result = {
        "weights": weights_info(model),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    print(f"model {result['weights']['name']} ({result['weights']['file']}), steps {result['weights']['steps']}, "
          f"{result['torch_threads']} threads", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="model-card-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        result["zero_shot_abdomen"] = zero_shot_abdomen(model, args.data, work, args.device)
        if methods:
            result["cross_patient_aorta"] = cross_patient_aorta(model, args.data, work, args.device, methods)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(markdown(result))
    print(f"\n(total {result['total_seconds']:.0f} s; results in {args.json})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
