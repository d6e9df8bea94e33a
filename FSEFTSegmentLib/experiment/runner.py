"""Running an experiment: every run of the grid adapted, predicted, scored and stored as it finishes.

Sharing (why the grid is affordable): each case is read and preprocessed once per experiment; the
frozen backbone features of a case (`FeatureCache`, fp16, spilled to unlinked temporary files past
`feature_cache.ram_gb`) are computed once and read by every black-box run (zero-shot, linear probe,
spatial and 1x1 adapters, with or without the size prior), whatever its task, K or draw: such a run
trains and predicts with its head alone. Their test predictions apply the head, window by window
with the same Gaussian blending, to the cached features of the whole volume (what the head was
trained on); for the linear probe that equals `fseft predict` exactly, for the spatial adapter it
differs only where windows overlap (Testing/test_experiment.py measures it). Methods that change
the backbone train on a copy of the network and predict with the full sliding window.

Results: `runs/<key>.json` per run, written atomically when the run is scored, so an interrupted
experiment keeps every finished run and a rerun skips them. With `torchrun`, each rank takes every
world-th run, and rank 0 writes the merged report once all ranks are done.
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from ..adaptation import SupportSpec, Target, prepare_support, pretrained_rows, target_mask
from ..errors import Cancelled, FSEFTError, InputError
from ..evaluation import paper_dice, score_masks
from ..feature_cache import FeatureCache
from ..inference import Head, InferenceSettings, SegmentationPredictor, choose_device, keep_largest_component, structure_maps, windows_per_batch
from ..io.files import atomic_write, ensure_folder
from ..io.images import read_image
from ..methods import get_method
from ..methods.adapted import AdaptedModel
from ..model import load_foundation_model
from ..model.network import Architecture
from ..model.registry import model_sha256
from ..prediction import model_structures
from ..preprocessing import CTPreprocessing
from ..progress import Progress
from ..training import TrainingCase, TrainingSettings, adapt, adapt_per_query, cache_features
from . import report
from .config import ExperimentConfig, Task
from .grid import RECORD_FORMAT, RunSpec, plan_runs, rank_share


@dataclass
class _Case:
    image: sitk.Image
    volume: torch.Tensor  # model space (MetaTensor: carries the inverse)


class CaseStore:
    """Cases read, preprocessed, labelled and featurised once per experiment, on demand."""

    def __init__(self, config: ExperimentConfig, network, device: torch.device, progress: Progress):
        self.config, self.network, self.device, self.progress = config, network, device, progress
        self.preprocessing = CTPreprocessing(network.architecture)
        self.settings = TrainingSettings(**config.training)
        self._cases: dict[str, _Case] = {}
        self._labels: dict[tuple[str, str], TrainingCase] = {}
        self._references: dict[tuple[str, str], list[sitk.Image]] = {}
        self._features: dict[str, FeatureCache] = {}
        self.ram_bytes = 0
        self.feature_seconds = 0.0

    def case(self, case_id: str) -> _Case:
        if case_id not in self._cases:
            image = read_image(self.config.data.image_path(case_id))
            self._cases[case_id] = _Case(image, self.preprocessing(image))
        return self._cases[case_id]

    def _spec(self, task: Task, case_id: str) -> tuple[SupportSpec, list[Target]]:
        data = self.config.data
        if data.per_structure_files:  # one binary mask per structure: the task has exactly one
            labels = data.labels_path(case_id, task.file_names[0])
            return SupportSpec(data.image_path(case_id), labels, "1"), [Target(task.structures[0], "1")]
        targets = [Target(s, selector) for s, selector in zip(task.structures, task.selectors)]
        return SupportSpec(data.image_path(case_id), data.labels_path(case_id, "")), targets

    def labelled(self, task: Task, case_id: str) -> TrainingCase:
        """The case in model space with the task's labels (S, X, Y, Z)."""
        key = (task.name, case_id)
        if key not in self._labels:
            case = self.case(case_id)
            spec, targets = self._spec(task, case_id)
            prepared = prepare_support(spec, targets, self.preprocessing, image=case.image, volume=case.volume)
            self._labels[key] = TrainingCase(case_id, case.volume, prepared.case.label)
        return self._labels[key]

    def references(self, task: Task, case_id: str) -> list[sitk.Image]:
        """The task's reference masks on the case's native grid, one per structure."""
        key = (task.name, case_id)
        if key not in self._references:
            spec, targets = self._spec(task, case_id)
            self._references[key] = [target_mask(spec, target, single=len(targets) == 1) for target in targets]
        return self._references[key]

    def features(self, case_id: str) -> FeatureCache:
        if case_id not in self._features:
            started = time.monotonic()
            left = max(int(self.config.cache_ram_gb * 1024**3) - self.ram_bytes, 0)  # a cache larger than this spills
            settings = TrainingSettings(**{**self.config.training, "cache_spill_bytes": left, "cache_dir": self.config.cache_dir})
            cache = cache_features(self.network, TrainingCase(case_id, self.case(case_id).volume), self.device, settings)
            self.progress.info(f"frozen features of {case_id} ({'spilled to disk' if cache.spilled else 'RAM'})")
            self.ram_bytes += 0 if cache.spilled else cache.nbytes
            self._features[case_id] = cache
            self.feature_seconds += time.monotonic() - started
        return self._features[case_id]

    def close(self) -> None:
        for cache in self._features.values():
            cache.close()
        self._features.clear()


class PeakMemory:
    """Peak memory while the block runs: CUDA's peak allocation, or the process's resident set on the
    CPU, sampled every 20 ms from /proc (Linux; None elsewhere)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.kind = device, None, "cuda" if device.type == "cuda" else "rss"
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float | None:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = self._rss_mb()
            if rss is not None:
                self.peak_mb = max(self.peak_mb or 0.0, rss)

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = self._rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            rss = self._rss_mb()
            if rss is not None and self.peak_mb is not None:
                self.peak_mb = max(self.peak_mb, rss)


class _RunProgress(Progress):
    """A run's own progress mapped onto the whole grid's bar, with the grid's ETA."""

    def __init__(self, parent: Progress, grid: GridProgress):
        super().__init__()
        self.parent, self.grid = parent, grid

    def emit(self, event: str, **fields) -> None:
        if event == "progress":
            self.grid.update(fields.get("fraction", 0.0))
        elif event == "warning":
            self.parent.emit(event, **fields)

    def warning(self, message: str, **fields) -> None:
        self.parent.warning(f"{self.grid.current}: {message}", **fields)


class GridProgress:
    """Progress over the runs still to do, with an ETA from the time spent so far."""

    def __init__(self, progress: Progress, total: int):
        self.progress, self.total, self.done, self.current = progress, max(total, 1), 0, ""
        self.started = time.monotonic()

    def start(self, name: str) -> Progress:
        self.current = name
        self.update(0.0)
        return _RunProgress(self.progress, self)

    def update(self, within: float) -> None:
        fraction = (self.done + min(max(within, 0.0), 1.0)) / self.total
        elapsed = time.monotonic() - self.started
        eta = f", ETA {_clock(elapsed / fraction * (1 - fraction))}" if fraction > 0.01 else ""
        self.progress.step(fraction, f"run {self.done + 1}/{self.total}{eta}", study=self.current)

    def finish(self) -> None:
        self.done += 1
        self.update(0.0)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


# ------------------------------------------------------------------------------------ one run


def head_logits(head: torch.nn.Module, cache: FeatureCache, architecture: Architecture, settings: TrainingSettings, device: torch.device) -> torch.Tensor:
    """A head applied to cached whole-volume features in prediction's windows and Gaussian blending:
    (C, X, Y, Z) logits on the unpadded volume."""
    head = head.to(device).eval()
    roi = architecture.patch_size

    def window_logits(_, coordinates) -> torch.Tensor:  # MONAI gives each window's slices; the cache its features
        starts = [[int(s.start) for s in window[2:]] for window in coordinates]
        return head(cache.crops(starts, roi).to(device)).float()

    placeholder = torch.zeros((1, 1, *cache.shape))  # MONAI's window grid over the cache, in float32
    with torch.inference_mode():
        logits = sliding_window_inference(
            placeholder, (roi,) * 3, windows_per_batch(device, architecture, settings.sw_batch_size), window_logits, overlap=settings.overlap, mode="gaussian",
            sw_device=device, device=torch.device("cpu"), with_coord=True,
        )[0]
    offset, shape = cache.valid
    return logits[(slice(None), *(slice(o, o + n) for o, n in zip(offset, shape)))]


def _metrics(pred: np.ndarray, ref: np.ndarray, spacing, tolerance: float, dice: float | None = None) -> dict:
    image_pred, image_ref = sitk.GetImageFromArray(pred.astype(np.uint8)), sitk.GetImageFromArray(ref.astype(np.uint8))
    for image in (image_pred, image_ref):
        image.SetSpacing(tuple(float(s) for s in spacing))
    score = score_masks("", image_pred, image_ref, tolerance)
    return {
        "dice": round(score.dice if dice is None else dice, 6),
        "surface_dice": round(score.surface_dice, 6),
        "hd95_mm": None if math.isinf(score.hd95_mm) else round(score.hd95_mm, 4),
    }


def score_case(maps: torch.Tensor, store: CaseStore, task: Task, case_id: str) -> dict:
    """Per structure and space: Dice, surface Dice, HD95 of one test case from its model-space
    structure maps (`inference.structure_maps`: > 0.5 is the mask; see the README's Scoring)."""
    scoring = store.config.scoring
    labelled = store.labelled(task, case_id)
    case = store.case(case_id)
    binary_task = len(task.structures) == 1
    scores = {}
    for channel, structure in enumerate(task.structures):
        spaces = {}
        if "model_space" in scoring.spaces:
            pred = (maps[channel] > 0.5).numpy().astype(np.uint8)
            ref = labelled.label[channel].numpy().astype(np.uint8)
            if scoring.prediction_largest_component:
                pred = keep_largest_component(pred)
            if scoring.largest_component and binary_task:
                ref = keep_largest_component(ref)
            spacing = (store.network.architecture.spacing_mm,) * 3
            spaces["model_space"] = _metrics(pred, ref, spacing, scoring.surface_tolerance_mm, paper_dice(pred > 0, ref > 0))
        if "native" in scoring.spaces:
            reference = store.references(task, case_id)[channel]
            pred = store.preprocessing.to_native_mask(maps[channel], case.volume, case.image).astype(np.uint8)
            if scoring.prediction_largest_component:
                pred = keep_largest_component(pred)
            spaces["native"] = _metrics(pred, sitk.GetArrayViewFromImage(reference) > 0, reference.GetSpacing(), scoring.surface_tolerance_mm)
        scores[structure.name] = spaces
    return scores


def execute(run: RunSpec, store: CaseStore, progress: Progress) -> dict:
    """Adapt (unless zero-shot), predict the task's test cases and score them: the run's record."""
    config, network, device = store.config, store.network, store.device
    task, spec = run.task, run.method
    names = [s.name for s in task.structures]
    rows = pretrained_rows(network, task.structures)
    settings = config.settings(spec, run.draw) if spec.method else store.settings
    black_box = spec.black_box
    if black_box:  # shared features first, outside the run's clock
        for case_id in (*run.supports, *task.test):
            store.features(case_id)
    tests = [store.labelled(task, case_id) for case_id in task.test]
    started = time.monotonic()
    with PeakMemory(device) as memory:
        method = get_method(spec.method or "linear-probe")  # zero-shot: the pretrained rows as a probe

        def build_model() -> AdaptedModel:
            torch.manual_seed(run.draw)  # new head rows and adapter weights are drawn here
            softmax = task.softmax and bool(spec.method)  # zero-shot reads the pretrained rows: sigmoid
            return AdaptedModel(network if black_box else copy.deepcopy(network), method, rows, spec.tune_decoder, softmax)

        results = []
        if spec.method:
            supports = [store.labelled(task, case_id) for case_id in run.supports]
            cases = [TrainingCase(c.id, c.volume, c.label, features=store.features(c.id) if black_box else None) for c in supports]
            queries = [TrainingCase(c.id, c.volume, features=store.features(c.id)) for c in tests] if spec.size_prior else []
        if spec.method and settings.adapts_per_query(len(tests)):  # one episode per test case
            episodes = adapt_per_query(build_model, cases, queries, settings, device, progress, structure_names=names)
            models = {test.id: model for test, (model, _) in zip(tests, episodes)}
            results = [result for _, result in episodes]
        else:
            model = build_model()
            if spec.method:
                results = [adapt(model, cases, settings, device, progress, queries=queries, structure_names=names)]
            models = {test.id: model for test in tests}
        trained = time.monotonic()
        scores = {}
        for test in tests:
            model = models[test.id]
            if black_box:
                maps = structure_maps(head_logits(model.head, store.features(test.id), network.architecture, settings, device), model.softmax)
            else:
                predictor = SegmentationPredictor(model.network, device, InferenceSettings(
                    sw_batch_size=settings.sw_batch_size, overlap=settings.overlap, precision=settings.precision))
                heads = [Head.of(model)]
                maps = predictor.maps(predictor.logits(test.volume, heads, study=test.id), heads)
            scores[test.id] = score_case(maps, store, task, test.id)
    finished = time.monotonic()
    return {
        "format": RECORD_FORMAT,
        "task": task.name,
        "group": task.group,
        "structures": names,
        "k": run.k,
        "supports_used": len(run.supports),
        "draw": run.draw,
        "seed": run.draw,
        "method": spec.label,
        "supports": list(run.supports),
        "validation": run.validation,
        "tests": list(task.test),
        "trainable_parameters": model.trainable_count() if spec.method else 0,
        "epochs": round(float(np.mean([r.epochs for r in results])), 1) if results else 0,  # mean over episodes
        "stopped_early": all(r.stopped_early for r in results) if results else False,
        "train_seconds": round(trained - started, 3),
        "predict_seconds": round(finished - trained, 3),
        "seconds": round(finished - started, 3),
        "peak_memory_mb": None if memory.peak_mb is None else round(memory.peak_mb, 1),
        "memory": memory.kind,
        "device": str(device),
        "learning_rate": results[0].learning_rate if results else None,
        "scores": scores,
    }


# ------------------------------------------------------------------------------------ the grid


@dataclass
class ExperimentResult:
    out: Path
    runs: int  # in the grid
    ran: int  # by this process
    skipped: int  # found done
    table: str | None  # the markdown table (rank 0)
    notes: list[str]


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _read_record(path: Path, key: str) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def _write_json(path: Path, value) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def write_phantoms(config: ExperimentConfig, folder: Path) -> None:
    """The phantom cases of `data.phantoms`, as (image, label map) .nii.gz pairs; kept across reruns."""
    from ..pretraining.phantoms import phantom_dataset

    spec, data = config.data.phantoms, config.with_phantom_root(folder).data
    if all(data.labels_path(case, "").is_file() for case in spec.case_ids):
        return
    for case, pair in zip(spec.case_ids, phantom_dataset(spec.count, spec.seed, size=spec.size)):
        for path, volume in zip((data.image_path(case), data.labels_path(case, "")), pair):
            with atomic_write(path) as tmp:
                sitk.WriteImage(volume, str(tmp), True)


def run_experiment(config: ExperimentConfig, out: Path, device_name: str | None = None, progress: Progress | None = None,
                   dry_run: bool = False) -> ExperimentResult:
    """The whole grid (this rank's share of it), then the merged report; see the module doc."""
    progress = progress or Progress()
    rank, world, local_rank = _world()
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder; choose another --out", out)
    if not dry_run:
        ensure_folder(out)
    device = choose_device(device_name or config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    network = load_foundation_model(config.model)
    known = {s.name for s in model_structures(network.architecture)}
    runs, notes = plan_runs(config, known)
    sha = model_sha256(config.model)
    keys = {id(run): run.key(config, sha) for run in runs}
    records_dir = out / "runs"
    done = {id(r) for r in runs if _read_record(records_dir / f"{keys[id(r)]}.json", keys[id(r)]) is not None}
    mine = [r for r in rank_share(runs, rank, world) if id(r) not in done]
    progress.info(f"{len(runs)} runs in the grid, {len(done)} done, {len(mine)} to run"
                  + (f" on rank {rank} of {world}" if world > 1 else "") + f" ({config.model} on {device})")
    stale = len({p.stem for p in records_dir.glob("*.json")} - set(keys.values())) if records_dir.is_dir() else 0
    if stale:
        notes.append(f"{stale} stored run(s) in {records_dir} are not in this grid (an earlier config, or a part not selected now): kept, not in the table")
    for note in notes:
        progress.info(note)
    if dry_run:
        return ExperimentResult(out, len(runs), 0, len(done), None, notes)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(days=30))  # barriers only; a long grid may run for days
    try:
        if config.data.phantoms is not None:
            if rank == 0:
                write_phantoms(config, out / "phantoms")
            _barrier(world)
            config = config.with_phantom_root(out / "phantoms")
        store = CaseStore(config, network.to(device), device, progress)
        grid = GridProgress(progress, len(mine))
        try:
            for run in mine:
                run_progress = grid.start(run.name)
                try:
                    record = execute(run, store, run_progress)
                except FSEFTError as error:  # e.g. an empty label: name the run, keep the finished ones
                    if isinstance(error, Cancelled):
                        raise
                    raise type(error)(f"{run.name}: {error} ({grid.done} finished run(s) are kept)") from None
                record["key"] = keys[id(run)]
                _write_json(records_dir / f"{record['key']}.json", record)
                grid.finish()
                progress.info(f"{run.name}: {config.table_metric} {report.run_value(record, config.table_metric):.3f} "
                              f"({record['seconds']:.1f} s)")
        except KeyboardInterrupt:
            raise Cancelled(f"cancelled; {grid.done} finished run(s) are kept in {records_dir}: rerun to continue") from None
        finally:
            store.close()
        _barrier(world)
        table = _write_report(config, out, runs, keys, notes, store.feature_seconds) if rank == 0 else None
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return ExperimentResult(out, len(runs), len(mine), len(done), table, notes)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _write_report(config: ExperimentConfig, out: Path, runs: list[RunSpec], keys: dict, notes: list[str], feature_seconds: float) -> str:
    records = []
    for run in runs:
        record = _read_record(out / "runs" / f"{keys[id(run)]}.json", keys[id(run)])
        if record is None:
            raise InputError(f"run {run.name} has no result after every rank finished", out / "runs")
        records.append(record)
    synthetic = " (synthetic phantoms)" if config.data.phantoms else ""
    title = f"{config.name}: {config.model}{synthetic}"
    methods = [m.label for m in config.methods]
    notes = [
        *notes,
        f"scoring: {', '.join(config.scoring.spaces)}; model_space = the paper's (cropped {config.model} space, "
        f"Dice 2TP/(|P|+|G|+1), reference cut to its largest component for binary tasks: {config.scoring.largest_component}); "
        "native = the image's own grid (plain Dice)",
        "a black-box run's seconds leave out the frozen features, computed once per case for all of them "
        "(experiment.json: feature_seconds of the last invocation)",
    ]
    report.write_runs_csv(records, out / "runs.csv")
    report.write_table_md(records, out / "table.md", config.table_metric, methods=methods, shots=list(config.shots), title=title, notes=notes)
    report.write_plots(records, out / "plots", config.table_metric, methods=methods)
    _write_json(out / "experiment.json", {"config": str(config.source), "name": config.name, "model": config.model,
                                          "runs": [keys[id(r)] for r in runs], "table_metric": config.table_metric,
                                          "feature_seconds": round(feature_seconds, 1)})
    return (out / "table.md").read_text(encoding="utf-8")
