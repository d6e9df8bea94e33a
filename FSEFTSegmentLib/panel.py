"""The Slicer panel's decisions, without Qt: what it lists, what it enables, what a method costs,
which volumes are supports and queries, how a job's progress reads, what a result is called.

The widget (`FSEFTSegment/FSEFTSegment.py`) copies these into Qt widgets and back, nothing more, so
every decision here is tested against real MRML (slicer-core) and real engine subprocesses. The
state lives in the module's parameter node (`PanelParameters`), so it survives saving and reloading
the scene. Torch never loads here: what needs it (the model list, the methods' costs, the device)
comes from short engine subprocesses run in the background (`EngineQueries`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import slicer

from . import adapter_library, scene
from .errors import InputError
from .jobs import (
    ADAPTATION_METHODS,
    EngineJob,
    JobState,
    adapt_command,
    adapter_folder,
    engine_environment,
    missing_requirements,
    predict_command,
    python_executable,
)
from .registry_file import default_model, model_names

MODULE_NAME = "FSEFTSegment"
#: Model statuses (`fseft models list --json`) whose weights are on this machine.
USABLE = ("bundled", "available", "imported")


# ---------------------------------------------------------------- state (the parameter node)


class PanelParameters:
    """Typed access to the module's `vtkMRMLScriptedModuleNode`: plain values as parameters, the
    chosen volumes as node references (so they follow the nodes through save and reload)."""

    TEXT = {"model": "", "device": "auto", "method": "linear-probe", "predictStructures": "", "adapter": ""}
    FLAGS = {"tuneDecoder": False, "sizePrior": False, "softmaxHead": False}
    NUMBERS = {"seed": 0, "maxEpochs": 200}
    LISTS = ("structures",)  # target segment names, JSON
    ROLES = ("support", "query", "segment")  # volume references: adapt supports, adapt queries, volumes to segment

    def __init__(self, node):
        self.node = node

    @classmethod
    def of(cls, mrml_scene) -> PanelParameters:
        """The module's singleton parameter node in `mrml_scene`, created on first use, as Slicer's
        `ScriptedLoadableModuleLogic.getParameterNode()` makes it (so both see the same node)."""
        node = mrml_scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(MODULE_NAME)
            node.SetModuleName(MODULE_NAME)
            node.SetName(f"{MODULE_NAME} parameters")
            node = mrml_scene.AddNode(node)
        return cls(node)

    def __getattr__(self, name):
        node = self.__dict__["node"]
        value = node.GetParameter(name)
        if name in self.TEXT:
            return value if name in node.GetParameterNames() else self.TEXT[name]
        if name in self.FLAGS:
            return value == "true" if value else self.FLAGS[name]
        if name in self.NUMBERS:
            return int(value) if value else self.NUMBERS[name]
        if name in self.LISTS:
            return json.loads(value) if value else []
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name == "node":
            object.__setattr__(self, name, value)
        elif name in self.TEXT or name in self.NUMBERS:
            self.node.SetParameter(name, str(value))
        elif name in self.FLAGS:
            self.node.SetParameter(name, "true" if value else "false")
        elif name in self.LISTS:
            self.node.SetParameter(name, json.dumps(list(value)))
        else:
            raise AttributeError(name)

    def volumes(self, role: str) -> list:
        """The volume nodes referenced under `role`, in order (removed nodes drop out)."""
        nodes = (self.node.GetNthNodeReference(role, i) for i in range(self.node.GetNumberOfNodeReferences(role)))
        return [n for n in nodes if n is not None]

    def set_volumes(self, role: str, nodes) -> None:
        if role not in self.ROLES:
            raise ValueError(f"unknown volume role {role!r}")
        self.node.RemoveNodeReferenceIDs(role)
        for node in nodes:
            self.node.AddNodeReferenceID(role, node.GetID())


# ---------------------------------------------------------------- engine queries (background)


class EngineQueries:
    """The engine's JSON answers the panel needs (`models list`, `methods`, `device`), each fetched
    once per command line in a background thread: the panel never waits on torch's import."""

    def __init__(self, python: str | None = None, timeout_s: float = 300):
        self.python = python
        self.timeout_s = timeout_s
        self._answers: dict[tuple, object] = {}
        self._errors: dict[tuple, str] = {}
        self._running: set[tuple] = set()
        self._lock = threading.Lock()
        self.version = 0  # grows with every answer or error: the widget refreshes when it changes

    def get(self, *args: str):
        """The parsed answer of `fseft ARGS --json`, or None while it is being fetched (started now
        if not yet). A failed query is remembered in `error()`, not retried until `forget()`."""
        key = tuple(args)
        with self._lock:
            if key in self._answers or key in self._errors:
                return self._answers.get(key)
            if key not in self._running:
                self._running.add(key)
                threading.Thread(target=self._fetch, args=(key,), name="FSEFTSegment query", daemon=True).start()
        return None

    def wait(self, *args: str, timeout: float | None = None):
        """`get`, blocking: for scripts, the self-test and tests."""
        key, event = tuple(args), threading.Event()
        if self.get(*args) is None and key not in self._errors:
            while key in self._running and not event.wait(0.05):
                if timeout is not None and (timeout := timeout - 0.05) <= 0:
                    raise TimeoutError(f"fseft {' '.join(args)} is still running")
        if key in self._errors:
            raise InputError(self._errors[key])
        return self._answers[key]

    def error(self, *args: str) -> str:
        return self._errors.get(tuple(args), "")

    def pending(self) -> bool:
        with self._lock:
            return bool(self._running)

    def forget(self, *args: str) -> None:
        """Drop a cached answer (e.g. the model list after a download), so the next `get` refetches."""
        with self._lock:
            self._answers.pop(tuple(args), None)
            self._errors.pop(tuple(args), None)

    def _fetch(self, key: tuple) -> None:
        command = [self.python or python_executable(), "-m", "FSEFTSegmentLib", *key, "--json"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                                  env=engine_environment(), timeout=self.timeout_s, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
                raise RuntimeError(lines[-1].removeprefix("fseft: error: "))
            answer, error = json.loads(done.stdout), None
        except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired) as failure:
            answer, error = None, f"fseft {' '.join(key)}: {failure}"
        with self._lock:
            if error is None:
                self._answers[key] = answer
            else:
                self._errors[key] = error
            self._running.discard(key)
            self.version += 1


# ---------------------------------------------------------------- dependencies and model


def dependencies_problem() -> str:
    """What must be installed before the engine can answer, as the sentence the panel shows; ''
    when nothing (looked up in package metadata: nothing is imported)."""
    missing = (["PyTorch"] if find_spec("torch") is None else []) + missing_requirements()
    if not missing:
        return ""
    return f"Needs {', '.join(missing)}: press Adapt or Apply once to install (you will be asked first)."



def model_rows(listed: list[dict] | None) -> list[dict]:
    """The model picker's rows: name, status, label, usable. Before the engine has answered, the
    registry file's names with status "checking"."""
    if listed is None:
        return [{"name": name, "status": "checking", "label": f"{name} (checking…)", "usable": False}
                for name in model_names()]
    return [{**row, "label": f"{row['name']} ({row['status']})", "usable": row["status"] in USABLE} for row in listed]


def downloadable(rows: list[dict], name: str) -> bool:
    row = next((r for r in rows if r["name"] == name), None)
    return row is not None and row["status"] == "not downloaded"


def model_problem(rows: list[dict], name: str) -> str:
    """Why `name` cannot be used now, saying what to do; '' when it can (or while checking)."""
    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        return f"Model '{name}' is unknown here: pick one from the list or import a checkpoint with Import from file."
    if row["usable"] or row["status"] == "checking":
        return ""
    if row["status"] == "not downloaded":
        return f"Model '{name}' is not downloaded yet: press Download (or pick a bundled model)."
    return f"Model '{name}' is {row['status']}: pick another model, reinstall the extension or import the file again."


def chosen_model(parameters: PanelParameters) -> str:
    return parameters.model or default_model()


# ---------------------------------------------------------------- annotated volumes, supports, queries


def structure_choices(annotations: Sequence) -> list[tuple[str, int]]:
    """(segment name, K) for every segment name drawn on a loaded volume: K = the volumes on which
    it is non-empty. The target picker lists these, the most annotated first."""
    counts: dict[str, int] = {}
    for annotation in annotations:
        for name in annotation.segment_names:
            counts[name] = counts.get(name, 0) + (name in annotation.non_empty)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0].casefold()))


def support_candidates(annotations: Sequence, structures: Sequence[str]) -> list:
    """The annotations on which every target structure is drawn (non-empty): the possible supports."""
    if not structures:
        return []
    return [a for a in annotations if all(name in a.non_empty for name in structures)]


def default_queries(mrml_scene, annotations: Sequence, structures: Sequence[str]) -> list:
    """Every loaded scalar volume that is not annotated with the targets: what a clinician wants
    segmented once the model has learnt them."""
    annotated = {a.volume.GetID() for a in support_candidates(annotations, structures)}
    return [v for v in scalar_volumes(mrml_scene) if v.GetID() not in annotated]


def scalar_volumes(mrml_scene) -> list:
    """Loaded scalar volumes, label maps excluded (they are annotations, not images)."""
    nodes = (mrml_scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
             for i in range(mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
    return [n for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode")]


# ---------------------------------------------------------------- methods and device


def method_rows(summaries: list[dict] | None, device: dict | None = None) -> list[dict]:
    """One row per method for the picker: its name, a label with trainable parameters, training
    memory and black-box mark, and `fits` against the chosen device's free memory (None: unknown)."""
    if summaries is None:
        return [{"method": name, "label": f"{name} (estimating cost…)", "black_box": None, "fits": None}
                for name in ADAPTATION_METHODS]
    free_gb = (device or {}).get("free_gb")
    rows = []
    for row in summaries:
        memory = row.get("training_memory_gb")
        parts = [f"{row['trainable_parameters']:,} trainable"]
        if memory is not None:
            parts.append(f"≈{memory:.2f} GB to train")
        if row["black_box"]:
            parts.append("black-box")
        fits = None if memory is None or free_gb is None else memory <= free_gb
        rows.append({**row, "label": f"{row['method']} — {', '.join(parts)}", "fits": fits})
    return rows


def methods_query(model: str, structures: int, tune_decoder: bool) -> tuple[str, ...]:
    """The `EngineQueries` key of the methods' costs for this model and head."""
    return ("methods", "--model", model, "--structures", str(max(structures, 1)), *(["--tune-decoder"] if tune_decoder else []))


def device_summary(report: dict | None, choice: str) -> dict:
    """What the device line says and the memory a method's estimate is held against: for CUDA the
    GPU's free memory, for the CPU none (system memory is not the limit we can estimate)."""
    if report is None:
        return {"text": "checking the PyTorch installation…", "free_gb": None, "cuda": None}
    build = f"torch {report.get('torch', '?')} ({report.get('build', '?')})"
    gpus = report.get("gpus") or []
    cuda = bool(report.get("cuda_available"))
    if not cuda:
        text = f"{build}; CUDA not available: adapting runs on the CPU ({report.get('cpu_threads', '?')} threads)"
        return {"text": text, "free_gb": None, "cuda": False}
    gpu = gpus[0] if gpus else {}
    if gpu.get("free_bytes") is None:
        return {"text": f"{build}; {gpu.get('name', 'GPU')}: free memory unknown ({gpu.get('error', '?')})", "free_gb": None, "cuda": True}
    free = gpu["free_bytes"] / 2**30
    text = f"{build}; {gpu.get('name', 'GPU')}: {free:.1f} of {gpu['total_bytes'] / 2**30:.1f} GB free"
    return {"text": text, "free_gb": free if choice in ("auto", "cuda") else None, "cuda": True}


# ---------------------------------------------------------------- readiness


@dataclass
class Readiness:
    """Whether a button may be pressed, and if not, the one sentence that says what to do."""

    ok: bool
    reason: str = ""


def adapt_readiness(*, running: bool, model_issue: str, structures: Sequence[str], supports: Sequence,
                    method: str, size_prior: bool, black_box: bool | None, queries: Sequence) -> Readiness:
    if running:
        return Readiness(False, "A job is running: wait for it or press Cancel.")
    if model_issue:
        return Readiness(False, model_issue)
    if not structures:
        return Readiness(False, "Pick the structure(s) to learn: draw them in the Segment Editor first.")
    if not supports:
        return Readiness(False, f"Tick at least one volume on which {', '.join(structures)} is drawn.")
    if method not in ADAPTATION_METHODS:
        return Readiness(False, f"Pick a method ({method!r} is not one).")
    if size_prior and black_box is False:
        return Readiness(False, f"The size prior needs a black-box method; {method} is not one.")
    if size_prior and not queries:
        return Readiness(False, "The size prior is fitted on the query volumes: tick at least one.")
    return Readiness(True)


def segment_readiness(*, running: bool, volumes: Sequence, model_issue: str = "", adapter: str = "") -> Readiness:
    if running:
        return Readiness(False, "A job is running: wait for it or press Cancel.")
    if not volumes:
        return Readiness(False, "Tick the volumes to segment.")
    if not adapter and model_issue:
        return Readiness(False, model_issue)
    return Readiness(True)


def size_prior_allowed(black_box: bool | None, tune_decoder: bool) -> bool:
    """The size prior adapts black-box methods only (the paper's transductive setting)."""
    return black_box is not False and not tune_decoder


# ---------------------------------------------------------------- progress and results


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_text(job) -> str:
    """The line under the progress bar: epoch, loss, learning rate and ETA while training, else the
    job's latest message."""
    epoch = job.epoch
    if epoch and job.phase == "training":
        return (f"epoch {epoch['epoch']}/{epoch['epochs']} · loss {float(epoch['loss']):.4f} · "
                f"lr {float(epoch['lr']):.1e} · at most {duration(epoch.get('eta'))} left (early stopping may end sooner)")
    return job.message


def result_name(volume_name: str, structures: Sequence[str], source: str) -> str:
    """How an imported result is called: '<volume> – <structures> (<method or model>)'."""
    listed = ", ".join(structures) if structures else "all structures"
    return f"{volume_name} – {listed} ({source})"


def quality_summary(node) -> list[str]:
    """One line per flagged segment of an imported result, for the panel's results list."""
    return [f"{node.GetName()}: {segment}: {flag}" for segment, flag in scene.quality_flags(node).items()]


# ---------------------------------------------------------------- adapters


def adapter_rows(root: str | os.PathLike | None = None) -> list[dict]:
    """The adapters table, read from disk: one row per saved adapter with its cells as text."""
    rows = []
    for adapter in adapter_library.list_adapters(root):
        if adapter.get("error"):
            rows.append({"path": adapter["path"], "cells": [adapter.get("name", "?"), "unreadable", "", "", "", "",
                                                             adapter["error"]]})
            continue
        method = adapter["method"] + (" + decoder" if adapter.get("tune_decoder") else "") + (" + size prior" if adapter.get("size_prior") else "")
        dice, loss = adapter.get("training_dice"), adapter.get("loss")
        quality = " / ".join(filter(None, [f"Dice {dice:.3f}" if dice is not None else "", f"loss {loss:.4f}" if loss is not None else ""]))
        rows.append({"path": adapter["path"], "cells": [
            ", ".join(adapter.get("structures") or []), method, str(adapter.get("k", "?")), adapter.get("base_model", "?"),
            (adapter.get("created") or "")[:16].replace("T", " "), adapter_library.size_text(adapter.get("size_bytes") or 0), quality]})
    return rows


def adapter_summary(metadata: dict) -> str:
    """What an adapter zip says it is, shown before it is imported."""
    structures = ", ".join(s.get("display_name") or s["name"] for s in metadata["structures"])
    base = metadata["base_model"]
    lines = [f"structures: {structures}", f"method: {metadata['method']}" + (" + decoder" if metadata.get("tune_decoder") else ""),
             f"K = {metadata.get('k', '?')} supports, seed {metadata.get('seed', '?')}",
             f"base model: {base['name']} (sha256 {base['sha256'][:12]}…)", f"created: {metadata.get('created', '?')}"]
    if metadata.get("head") == "softmax":
        lines.append("softmax head: one structure per voxel")
    if metadata.get("size_prior"):
        lines.append("trained with the size prior")
    return "\n".join(lines)


ADAPTER_COLUMNS = ("structures", "method", "K", "base model", "created", "size", "training Dice / loss")


@dataclass
class JobRecord:
    """What the panel remembers of the job it started: what to import where, and under which names."""

    kind: str  # "adapt", "segment", "download", "import-model", "import-adapter"
    job: object
    folder: Path | None = None  # the job's temporary files, removed when it ends
    names: dict[str, str] = field(default_factory=dict)  # study id -> result node name
    settled: bool = False  # its end has been handled


class LossCurve:
    """The live training curve as MRML: a table (epoch, loss) plotted by a chart, so Slicer's plot
    widget shows it and it is saved with the scene like any other node."""

    NAME = "FSEFT training loss"

    def __init__(self, mrml_scene):
        self.scene = mrml_scene
        self.table = self.series = self.chart = None

    def reset(self, title: str) -> None:
        """An empty curve for a new run (the nodes are reused, or made on first use)."""
        if self.table is None or self.scene.GetNodeByID(self.table.GetID()) is None:
            self.table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.NAME)
            self.series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", self.NAME)
            self.chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.NAME)
            self.series.SetAndObserveTableNodeID(self.table.GetID())
            self.series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            self.series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            self.chart.AddAndObservePlotSeriesNodeID(self.series.GetID())
            self.chart.SetXAxisTitle("epoch")
            self.chart.SetYAxisTitle("soft Dice loss")
        self.table.RemoveAllColumns()
        for name in ("epoch", "loss"):
            column = self.table.AddColumn()
            column.SetName(name)
        self.series.SetXColumnName("epoch")
        self.series.SetYColumnName("loss")
        self.chart.SetTitle(title)

    def add(self, epoch: int, loss: float) -> None:
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        table.SetValue(row, 0, float(epoch))
        table.SetValue(row, 1, float(loss))
        table.Modified()

    def points(self) -> list[tuple[float, float]]:
        table = self.table.GetTable() if self.table is not None else None
        if table is None or table.GetNumberOfColumns() < 2:
            return []
        return [(table.GetValue(r, 0).ToFloat(), table.GetValue(r, 1).ToFloat()) for r in range(table.GetNumberOfRows())]


class PanelLogic:
    """Everything the panel does, one job at a time: export what the user picked, start the engine,
    follow it (log, loss curve), import its results under their names, clean up.

    `poll()` is called from the widget's timer on the main thread (the importer touches the scene).
    Nothing is imported from a failed or cancelled job beyond what the engine finished and verified,
    and a job's temporary folder is removed whatever happens."""

    LOG_LINES = 5000

    def __init__(self, mrml_scene, work_root: str | os.PathLike, adapters_root: str | os.PathLike | None = None,
                 python: str | None = None):
        self.scene = mrml_scene
        self.work_root = Path(work_root)
        self.adapters_root = Path(adapters_root) if adapters_root else adapter_library.adapters_home()
        self.python = python
        self.queries = EngineQueries(python)
        self.curve = LossCurve(mrml_scene)
        self.record: JobRecord | None = None
        self.log: list[str] = []  # the last LOG_LINES lines: job commands, states and engine messages
        self.log_count = 0  # lines said since the start, trimmed ones included
        self.results: list[dict] = []  # of the last job: {"node", "name", "flags"}

    # -- state

    @property
    def parameters(self) -> PanelParameters:
        return PanelParameters.of(self.scene)

    @property
    def running(self) -> bool:
        return self.record is not None and not self.record.job.state.finished

    def annotations(self) -> list:
        return scene.annotations(self.scene)

    # -- jobs

    def start_adapt(self):
        """Adapt the chosen model to the chosen structures from the ticked supports; the queries'
        predictions come back as segmentations. Returns the started job."""
        self._refuse_second_job()
        p = self.parameters
        structures, supports, queries = p.structures, p.volumes("support"), p.volumes("query")
        if not structures:
            raise InputError("Pick the structure(s) to learn.")
        if not supports:
            raise InputError(f"Tick at least one volume on which {', '.join(structures)} is drawn.")
        folder = self._new_folder([*supports, *queries])
        try:
            pairs = scene.annotated_volumes(self.scene, supports, structures)
            exported = scene.export_supports(self.scene, pairs, structures, folder / "supports")
            for notice in exported.notices:
                self._say(f"notice: {notice}")
            query_paths = [scene.export_volume(node, folder / "queries") for node in queries]
            self._warn_if_not_ct(queries)
        except BaseException:
            _remove_tree(folder)
            raise
        out = adapter_folder(self.adapters_root, "+".join(structures), p.method)
        command = adapt_command(
            chosen_model(p), p.method, exported.supports, [f"{name}={i + 1}" for i, name in enumerate(structures)], out,
            queries=query_paths, tune_decoder=p.tuneDecoder, softmax_head=p.softmaxHead, size_prior=p.sizePrior and bool(query_paths),
            predict_queries=bool(query_paths), seed=p.seed, max_epochs=p.maxEpochs, device=p.device, python=self.python)
        volumes = {path.stem: node for path, node in zip(query_paths, queries)}
        names = {study: result_name(node.GetName(), structures, p.method) for study, node in volumes.items()}
        self.curve.reset(f"{', '.join(structures)} ({p.method}, K = {len(supports)})")
        return self._start("adapt", command, folder, volumes, names)

    def start_segment(self, adapter: str | os.PathLike | None = None):
        """Segment the ticked volumes with the chosen model (its `predictStructures`, default all)
        or, given `adapter`, with that adapter (its own structures and base model)."""
        self._refuse_second_job()
        p = self.parameters
        volumes_to_segment = p.volumes("segment")
        if not volumes_to_segment:
            raise InputError("Tick the volumes to segment.")
        folder = self._new_folder(volumes_to_segment)
        try:
            study_list, volumes = scene.export_studies(volumes_to_segment, folder)
            self._warn_if_not_ct(volumes_to_segment)
        except BaseException:
            _remove_tree(folder)
            raise
        structures = [s.strip() for s in p.predictStructures.split(",") if s.strip()] if adapter is None else []
        if adapter is None:
            source, listed = chosen_model(p), structures
        else:
            metadata = adapter_library.read_folder_metadata(Path(adapter))
            source = metadata["method"]
            listed = [s.get("display_name") or s["name"] for s in metadata["structures"]]
        command = predict_command([study_list], None if adapter else chosen_model(p), structures=structures,
                                  adapters=[adapter] if adapter else [], out=folder / "results", device=p.device,
                                  python=self.python)
        names = {study: result_name(node.GetName(), listed, source) for study, node in volumes.items()}
        return self._start("segment", command, folder, volumes, names)

    def start_download(self, name: str):
        """Download a registry model into the per-user cache (resumable, checksummed), as a job."""
        self._refuse_second_job()
        return self._start("download", self._engine("models", "pull", name, "--progress", "json"))

    def start_model_import(self, path: str | os.PathLike, name: str):
        """Register a checkpoint file the user has, as a job (the engine checks its layout)."""
        self._refuse_second_job()
        if not name.strip():
            raise InputError("Give the imported model a name.")
        return self._start("import-model", self._engine("models", "import", os.fspath(path), "--name", name.strip(),
                                                        "--progress", "json"))

    def start_adapter_import(self, zip_path: str | os.PathLike):
        """Verify and unpack a shared adapter zip into the adapters folder, as a job (the engine
        checks its tensors against the base model's architecture)."""
        self._refuse_second_job()
        return self._start("import-adapter", self._engine("adapters", "import", os.fspath(zip_path),
                                                          "--root", str(self.adapters_root)))

    def cancel(self) -> None:
        if self.running:
            self.record.job.cancel()

    def stop(self) -> None:
        """Cancel a running job and wait until its processes are gone (scene close, module exit)."""
        if self.running:
            job = self.record.job
            job.cancel()
            self._handle(job.wait(timeout=job.grace_s + 10))

    def poll(self) -> list[dict]:
        """The job's new events, after following them (log, curve) and, once it ended, cleaning up."""
        if self.record is None:
            return []
        events = self.record.job.poll()
        self._handle(events)
        return events

    def wait(self, timeout: float | None = None) -> list[dict]:
        """Poll until the job ends: for scripts, the self-test and tests."""
        events = self.record.job.wait(timeout=timeout)
        self._handle(events)
        return events

    # -- internals

    def _engine(self, *args: str) -> list[str]:
        return [self.python or python_executable(), "-m", "FSEFTSegmentLib", *args]

    def _refuse_second_job(self) -> None:
        if self.running:
            raise InputError(f"A job is already running ({self.record.kind}): wait for it to finish or press Cancel.")

    def _new_folder(self, volumes) -> Path:
        self.work_root.mkdir(parents=True, exist_ok=True)
        scene.check_free_space(self.work_root, volumes)
        return Path(tempfile.mkdtemp(prefix="FSEFTSegment-", dir=self.work_root))

    def _warn_if_not_ct(self, volumes) -> None:
        for node in volumes:
            warning = scene.ct_warning(node)
            if warning:
                self._say(f"warning: {node.GetName()}: {warning}")

    def _start(self, kind: str, command: list[str], folder: Path | None = None, volumes: dict | None = None,
               names: dict | None = None):
        self.results = []

        def importer(outputs):
            nodes = scene.import_results(self.scene, outputs, volumes, names=names)
            self.results = [{"node": n, "name": n.GetName(), "flags": quality_summary(n)} for n in nodes]

        job = EngineJob(command, importer=importer if volumes is not None else None)
        self.record = JobRecord(kind, job, folder, names or {})
        self._say(f"--- {kind}: {' '.join(command[3:])}")
        job.start()
        self._handle(job.poll())
        return job

    def _handle(self, events: list[dict]) -> None:
        for event in events:
            kind = event["event"]
            if kind == "epoch" and self.record.kind == "adapt":
                self.curve.add(int(event.get("epoch") or 0), float(event.get("loss") or 0.0))
            if kind == "state":
                self._say(f"[{event['state'].value}] {event.get('message', '')}")
            elif kind != "progress" and event.get("message"):
                self._say(str(event["message"]) if kind in ("log", "info", "epoch", "study_done") else f"{kind}: {event['message']}")
        if self.record is not None and self.record.job.state.finished and not self.record.settled:
            self._finish()

    def _finish(self) -> None:
        record = self.record
        record.settled = True
        if record.folder is not None:
            _remove_tree(record.folder)
        job = record.job
        if record.kind == "adapt" and job.state is JobState.COMPLETED and job.adapter is not None:
            self.parameters.adapter = str(job.adapter)
        if record.kind in ("download", "import-model"):
            self.queries.forget("models", "list")
        for result in self.results:
            for flag in result["flags"]:
                self._say(f"quality flag: {flag}")

    def log_since(self, seen: int) -> list[str]:
        """The lines said after the first `seen` (for a log pane that appends)."""
        return self.log[max(len(self.log) - (self.log_count - seen), 0):] if self.log_count > seen else []

    def _say(self, line: str) -> None:
        self.log.append(line)
        self.log_count += 1
        del self.log[:-self.LOG_LINES]


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
