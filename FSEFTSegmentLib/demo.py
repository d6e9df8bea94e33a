"""`fseft demo`: the whole few-shot workflow on procedural phantoms, offline, in minutes on a CPU.

Why: a fresh install should show what each adaptation method costs and what it gives without any
download, data set or GPU. The demo draws phantoms (`pretraining.phantoms`), adapts the registry's
default model with K = 1 and K = 5 supports to a structure the model knows (spleen: its head row
starts from the model's output row) and one it has no output for (bone), with four methods, segments
held-out phantoms and scores them against their labels.

Short schedules: a fixed budget of gradient steps per run (epochs = steps // K, no early stopping),
and LoRA, whose every step backpropagates through the whole backbone, takes one crop per step and
far fewer steps; the paper trains up to 200 epochs of six crops. The numbers show the workflow and
the relative cost of the methods, not the methods' accuracy.

Sharing: the frozen features of the supports are computed once and read by every black-box head
(`TrainingCase.features`); at prediction all black-box heads and the zero-shot head read one
backbone pass per window, and each LoRA model runs its own copy of the network.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .adaptation import parse_support, parse_target, prepare_support, pretrained_rows
from .errors import InputError
from .evaluation import dice
from .inference import Head, InferenceSettings, SegmentationPredictor
from .io.files import atomic_write
from .io.images import read_image
from .io.studies import default_id
from .methods import get_method
from .methods.adapted import AdaptedModel
from .model import load_foundation_model
from .prediction import plan_outputs, write_outputs
from .preprocessing import CTPreprocessing
from .pretraining.phantoms import phantom_dataset
from .progress import Progress
from .registry_file import default_model
from .training import TrainingCase, TrainingSettings, adapt, cache_features

#: (name, label value in the phantoms): one structure fseft-mini knows, one outside its 16 classes
TARGETS = ("spleen=1", "bone=23")


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    size_prior: bool = False

    @property
    def slug(self) -> str:
        return self.label.replace(" + ", "-").replace(" ", "-").lower()


VARIANTS = (
    Variant("linear probe", "linear-probe"),
    Variant("spatial adapter", "spatial-adapter"),
    Variant("spatial adapter + size prior", "spatial-adapter", size_prior=True),
    Variant("LoRA", "lora"),
)


@dataclass(frozen=True)
class DemoPlan:
    """Sizes chosen so the full demo fits in about five minutes on two CPU cores."""

    phantom_size: tuple[int, int, int]
    shots: tuple[int, ...]  # K values; a run with K supports uses the first K phantoms
    queries: int
    black_box_steps: int  # gradient steps per black-box run
    black_box_crops: int
    lora_steps: int  # one crop per step
    seed: int = 0

    def settings(self, variant: Variant, k: int) -> TrainingSettings:
        black_box = get_method(variant.method).black_box
        steps = self.black_box_steps if black_box else self.lora_steps
        return TrainingSettings(
            max_epochs=max(steps // k, 1),
            crops_per_step=self.black_box_crops if black_box else 1,
            early_stop=False,
            size_prior=variant.size_prior,
            size_prior_mode="joint",  # one adapter per variant, for every query, so each query's table row compares like with like
            seed=self.seed,
        )


FULL = DemoPlan(phantom_size=(96, 96, 64), shots=(1, 5), queries=2, black_box_steps=25, black_box_crops=6, lora_steps=5)
# One 64^3 window per phantom; runs in the test suite.
QUICK = DemoPlan(phantom_size=(64, 64, 48), shots=(1, 2), queries=1, black_box_steps=4, black_box_crops=2, lora_steps=1)


@dataclass
class Run:
    variant: Variant
    k: int
    trainable: int
    epochs: int
    seconds: float
    curve: list[dict]
    dice: dict[str, list[float]] = field(default_factory=dict)  # structure -> per query


def default_out_dir() -> Path:
    return Path(f"fseft-demo-{datetime.now():%Y%m%d-%H%M%S}")


def _write_image(image: sitk.Image, path: Path) -> Path:
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return path


def write_phantoms(plan: DemoPlan, folder: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Supports then queries as (image, label map) .nii.gz pairs that open in Slicer as they are."""
    pairs = []
    names = [f"support-{n}" for n in range(1, max(plan.shots) + 1)] + [f"query-{n}" for n in range(1, plan.queries + 1)]
    for name, (image, labels) in zip(names, phantom_dataset(len(names), plan.seed, size=plan.phantom_size)):
        pairs.append((_write_image(image, folder / f"{name}.nii.gz"), _write_image(labels, folder / f"{name}.labels.nii.gz")))
    return pairs[: max(plan.shots)], pairs[max(plan.shots) :]


def run_demo(out: Path, quick: bool = False, device: torch.device | None = None, progress: Progress | None = None) -> dict:
    """Everything the demo does; returns the results that `results.json` holds.

    It all goes into a hidden staging folder beside `out`, renamed to `out` at the end: a failed or
    cancelled demo leaves nothing behind, and a rerun with the same --out works.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("exists and is not empty; choose a new --out", out)
    _require_matplotlib()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        results = _run_demo(staging, out, quick, device or torch.device("cpu"), progress or Progress())
        if out.exists():
            out.rmdir()  # empty, as checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return results


def _run_demo(work: Path, out: Path, quick: bool, device: torch.device, progress: Progress) -> dict:
    """The demo written into `work`; its results name `out`, where `work` will be moved."""
    started, cpu_started = time.monotonic(), time.process_time()
    plan = QUICK if quick else FULL
    model_name = default_model()
    progress.info(f"loading model {model_name}")
    network = load_foundation_model(model_name)
    targets = [parse_target(text) for text in TARGETS]
    rows = pretrained_rows(network, [t.structure for t in targets])

    progress.info(f"drawing {max(plan.shots)} support and {plan.queries} query phantoms")
    supports, queries = write_phantoms(plan, work / "phantoms")
    runs, models, seconds = adapt_all(network, plan, targets, rows, supports, queries, device, progress)

    progress.info(f"segmenting {len(queries)} held-out phantom(s) with every adapted model")
    predict_started = time.monotonic()
    zero_shot, slices = predict_all(network, model_name, targets, rows, runs, models, queries, work / "predictions", device, progress)
    seconds["prediction"] = time.monotonic() - predict_started
    results = {
        "model": model_name,
        "plan": {**plan.__dict__, "quick": quick},
        "device": str(device),
        "structures": [{"name": t.structure.name, "label_value": int(t.selector), "known": row is not None} for t, row in zip(targets, rows)],
        "zero_shot_dice": zero_shot,
        "runs": [{**run.__dict__, "variant": run.variant.label, "method": run.variant.method, "size_prior": run.variant.size_prior} for run in runs],
        "out": str(out),
    }
    progress.info("writing the report")
    write_report(work / "report.png", results, runs, slices, [t.structure for t in targets], network.architecture.hu_window)
    seconds.update(total=time.monotonic() - started, cpu=time.process_time() - cpu_started)
    results["seconds"] = {key: round(value, 1) for key, value in seconds.items()}
    with atomic_write(work / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def adapt_all(network, plan: DemoPlan, targets, rows, supports, queries, device, progress) -> tuple[list[Run], list[AdaptedModel], dict]:
    """Every method for every K, black-box heads on one shared feature cache per support."""
    preprocessing = CTPreprocessing(network.architecture)
    prepared = [prepare_support(parse_support(str(image), str(labels)), targets, preprocessing) for image, labels in supports]
    query_cases = [TrainingCase(default_id(image), preprocessing(read_image(image))) for image, _ in queries]
    names = [t.structure.name for t in targets]
    progress.info("frozen features of the supports, computed once for every black-box method")
    features_started = time.monotonic()
    caches = [cache_features(network, p.case, device) for p in prepared]
    seconds = {"features": time.monotonic() - features_started}
    runs, models = [], []
    try:
        for k in plan.shots:
            for variant in VARIANTS:
                method = get_method(variant.method)
                settings = plan.settings(variant, k)
                cases = [
                    TrainingCase(p.case.id, p.case.volume, p.case.label, features=cache if method.black_box else None)
                    for p, cache in zip(prepared[:k], caches)
                ]
                progress.info(f"{variant.label}, K = {k}: {settings.max_epochs} epoch(s)")
                torch.manual_seed(plan.seed)  # new head rows and adapter weights are drawn here
                model = AdaptedModel(network if method.black_box else copy.deepcopy(network), method, rows)
                run_started = time.monotonic()
                result = adapt(model, cases, settings, device, progress, queries=query_cases if variant.size_prior else (), structure_names=names)
                runs.append(Run(variant, k, model.trainable_count(), result.epochs, time.monotonic() - run_started, result.curve))
                models.append(model)
    finally:
        for cache in caches:
            cache.close()
    return runs, models, seconds


def predict_all(network, model_name: str, targets, rows, runs: list[Run], models, queries, out: Path, device, progress) -> tuple[dict, tuple]:
    """Segment each query with the zero-shot head and every adapted model in one sliding window,
    write one .seg.nrrd per model and query, and score them; returns the zero-shot Dice and the
    first query's arrays for the report."""
    structures = [t.structure for t in targets]
    names = [s.name for s in structures]
    values = [int(t.selector) for t in targets]
    known = [name for name, row in zip(names, rows) if row is not None]
    zero_shot_heads, zero_shot_structures, _ = plan_outputs(network, names=known, model_name=model_name) if known else ([], [], {})
    predictor = SegmentationPredictor(network, device, InferenceSettings(), progress)
    heads = zero_shot_heads + [Head.of(model) for model in models]
    zero_shot = {name: [] for name in known}
    slices = ()
    for image_path, labels_path in queries:
        image, study = read_image(image_path), default_id(image_path)
        reference = sitk.GetArrayFromImage(read_image(labels_path))
        outputs = split_outputs(predictor.segment(image, heads, study=study), len(known), len(names))
        if known:
            write_outputs(outputs[0], image, zero_shot_structures, out / "zero-shot", study, ("seg.nrrd",))
            for name, mask in zip(known, outputs[0]):
                zero_shot[name].append(dice(mask > 0, reference == values[names.index(name)]))
        for run, own in zip(runs, outputs[1:]):
            write_outputs(own, image, structures, out / f"{run.variant.slug}-k{run.k}", study, ("seg.nrrd",))
            for name, mask, value in zip(names, own, values):
                run.dice.setdefault(name, []).append(dice(mask > 0, reference == value))
        slices = slices or (sitk.GetArrayFromImage(image), reference, values, outputs)
    return zero_shot, slices


def split_outputs(masks: np.ndarray, zero_shot: int, per_run: int) -> list[np.ndarray]:
    """The predictor's channels, in head order: the zero-shot ones, then each run's."""
    adapted = masks[zero_shot:]
    return [masks[:zero_shot]] + [adapted[n : n + per_run] for n in range(0, len(adapted), per_run)]


def _require_matplotlib() -> None:
    """Fail before minutes of work, not at the report."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("the demo's report needs matplotlib: pip install 'fseft-segment[demo]'") from None


def _mean(values) -> float:
    return float(np.mean(values))


def results_table(results: dict) -> str:
    """The table printed at the end: one row per method and K, Dice averaged over the queries."""
    names = [s["name"] for s in results["structures"]]
    header = ["method", "K", "trainable", "epochs", "train s"] + [
        f"Dice {s['name']} ({'known' if s['known'] else 'novel'})" for s in results["structures"]
    ]
    zero_shot = ["zero-shot (no adaptation)", "-", "0", "-", "-"] + [
        f"{_mean(results['zero_shot_dice'][n]):.3f}" if n in results["zero_shot_dice"] else "-" for n in names
    ]
    rows = [header, zero_shot] + [
        [run["variant"], str(run["k"]), f"{run['trainable']:,}", str(run["epochs"]), f"{run['seconds']:.1f}"]
        + [f"{_mean(run['dice'][n]):.3f}" for n in names]
        for run in results["runs"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    seconds = results["seconds"]
    notes = [
        f"model {results['model']} on {results['device']}; Dice on {results['plan']['queries']} held-out phantom(s); "
        + "short demo schedules (not the paper's 200 epochs): compare costs, not accuracy",
        f"frozen support features {seconds['features']:.1f} s (shared by the black-box methods), prediction "
        + f"{seconds['prediction']:.1f} s, total {seconds['total']:.1f} s (CPU time {seconds['cpu']:.1f} s)",
    ]
    return "\n".join(lines + [""] + notes)


def write_report(path: Path, results: dict, runs: list[Run], slices: tuple, structures, hu_window) -> None:
    """One PNG: a coronal slice of the first query per method and K, loss curves, Dice bars.

    A bare `Figure` renders with Agg and leaves pyplot's global state (and Slicer's) alone."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, reference, values, outputs = slices
    names = [s.name for s in structures]
    known = list(results["zero_shot_dice"])
    colors = {s.name: tuple(c / 255 for c in s.color) for s in structures}
    row = int(np.argwhere(reference == values[0])[:, 1].mean())  # coronal plane through the spleen
    shots = sorted({run.k for run in runs})
    columns = 1 + len(VARIANTS)
    figure = Figure(figsize=(3 * columns, 3 * len(shots) + 3.5), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[len(shots), 1.1])
    axes = top.subplots(len(shots), columns, squeeze=False)

    def overlay(axis, title: str, channels: list[tuple[str, np.ndarray]]) -> None:
        axis.imshow(image[:, row, :], cmap="gray", vmin=hu_window[0], vmax=hu_window[1], origin="lower")
        for name, mask in channels:
            tint = np.zeros((*mask.shape, 4))
            tint[mask > 0] = (*colors[name], 0.55)
            axis.imshow(tint, origin="lower")
        for value in values:
            axis.contour(reference[:, row, :] == value, levels=[0.5], colors="white", linewidths=0.6, origin="lower")
        axis.set_title(title, fontsize=9)
        axis.set_axis_off()

    overlay(axes[0, 0], "reference labels", [(n, reference[:, row, :] == v) for n, v in zip(names, values)])
    for axis in axes[1:, 0]:
        axis.set_axis_off()
    if len(shots) > 1 and known:
        overlay(axes[1, 0], "zero-shot (no adaptation)", [(n, m[:, row, :]) for n, m in zip(known, outputs[0])])
    for run, own in zip(runs, outputs[1:]):
        axis = axes[shots.index(run.k), 1 + VARIANTS.index(run.variant)]
        overlay(axis, f"{run.variant.label}, K = {run.k}", [(n, m[:, row, :]) for n, m in zip(names, own)])

    handles = [Patch(color=colors[name], label=name) for name in names] + [Patch(edgecolor="white", facecolor="black", label="reference outline")]
    top.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=8, facecolor="lightgray")
    plots = bottom.subplots(1, len(shots) + len(names), squeeze=False)[0]
    for axis, k in zip(plots, shots):
        for run in (r for r in runs if r.k == k):
            axis.plot([e["epoch"] for e in run.curve], [e["loss"] for e in run.curve], marker=".", label=run.variant.label)
        axis.set(title=f"training loss, K = {k}", xlabel="epoch", ylabel="Dice loss")
        axis.legend(fontsize=7)
    width = 0.8 / len(shots)
    for axis, name in zip(plots[len(shots) :], names):
        labels = [variant.label for variant in VARIANTS]
        for offset, k in enumerate(shots):
            scores = [_mean(next(r for r in runs if r.k == k and r.variant == v).dice[name]) for v in VARIANTS]
            axis.bar(np.arange(len(labels)) + offset * width, scores, width, label=f"K = {k}")
        if name in results["zero_shot_dice"]:
            axis.axhline(_mean(results["zero_shot_dice"][name]), color="gray", linestyle="--", label="zero-shot")
        axis.set_xticks(np.arange(len(labels)) + width * (len(shots) - 1) / 2, labels, rotation=20, ha="right", fontsize=7)
        axis.set(title=f"Dice, {name}", ylim=(0, 1))
        axis.legend(fontsize=7)
    figure.suptitle(f"fseft demo: {results['model']} on phantoms, short schedules (costs, not accuracy)")
    with atomic_write(path) as tmp:
        figure.savefig(tmp, dpi=80)
