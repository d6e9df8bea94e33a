"""The experiment file (`fseft experiment --config FILE.yaml`), read and checked before any work.

Why a checked file: a grid runs for hours, so everything a user can get wrong in it (a missing
case, an unknown method or structure, a test case that is also a training case, K larger than the
training pool, an unknown key) is found here and reported as one line naming the file and the key.

The keys (the shipped files under `Resources/experiments/` document them in use):

* `name`, `model` (registry name or checkpoint; default: the registry's default model), `device`.
* `data`: either a folder layout, `root` (relative to the config file), `image` and `labels`
  templates with `{case}` (and, for one binary file per structure, `{structure}`), and optionally
  `cases` (a list of ids; default: every id the `image` template matches under `root`); or
  `phantoms: {count, size, seed}`: procedural phantoms written into the output folder (offline).
* `tasks`: each with `name`, `structures` (a list of names, or a mapping name -> label value or
  segment name; names from the universal template unless the task says `novel: true`), optional `group`,
  `head` (`sigmoid`, default: one output per structure; `softmax`: the paper's multi-class head), and its split: `train` and `test` as lists of case ids, or as
  counts drawn with `split_seed` (default 42), test cases first, from the task's own `cases` (e.g.
  those whose field of view shows the structure) or else the data's.
* `shots` (K values), `draws` (support-draw seeds), `methods` (see `MethodSpec`); `all_data_k`: the
  K that stands for a task's whole training pool (the paper's "30-shot" is all of pancreas' 29).
* `training`: `TrainingSettings` fields for every run (e.g. `feature_cache: false` trains black-box
  methods the paper's way; `size_prior_mode: joint`; `precision: fp32`); `method_training`: per base
  method (e.g. `lora`), fields that override `training` for that method. With the size prior in its
  default per-query mode, each test case is its own episode: an adapter fitted with its prior alone.
* `scoring`: `spaces` (`model_space`, the paper's; `native`, the clinical grid), `largest_component`
  (reduce the reference to its largest component in model space, as the paper does for binary
  tasks), `prediction_largest_component`, `surface_tolerance_mm`; `table_metric`.
* `feature_cache`: `ram_gb` (features beyond it spill to unlinked temporary files) and `dir`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io.files import read_yaml
from ..labels import Structure, novel_structure, resolve_structure
from ..methods import METHODS, get_method
from ..training import TrainingSettings

ZERO_SHOT = "zero-shot"
SPACES = ("model_space", "native")
METRICS = ("dice", "surface_dice", "hd95_mm")
#: TrainingSettings fields the harness itself sets per run
HARNESS_SETTINGS = {"seed", "size_prior"}


@dataclass(frozen=True)
class MethodSpec:
    """`METHOD[+decoder][+size-prior]` or `zero-shot`: an adaptation method and its variants."""

    label: str
    method: str | None  # None: zero-shot (the pretrained head, no training)
    tune_decoder: bool = False
    size_prior: bool = False

    @property
    def black_box(self) -> bool:
        """Trains (or needs) nothing but a head on the frozen features: reads the shared feature cache."""
        return self.method is None or (get_method(self.method).black_box and not self.tune_decoder)

    @classmethod
    def parse(cls, label: str) -> MethodSpec:
        if label == ZERO_SHOT:
            return cls(label, None)
        base, *suffixes = label.split("+")
        unknown = [s for s in suffixes if s not in ("decoder", "size-prior")]
        if base not in METHODS or unknown or len(set(suffixes)) != len(suffixes):
            raise ValueError(
                f"unknown method '{label}'; use zero-shot or METHOD[+decoder][+size-prior] with METHOD one of {', '.join(METHODS)}"
            )
        spec = cls(label, base, "decoder" in suffixes, "size-prior" in suffixes)
        method = get_method(base)
        if spec.tune_decoder and not method.combines_with_decoder:
            raise ValueError(f"'{label}': {base} already trains the decoder")
        if spec.size_prior and not spec.black_box:
            names = ", ".join(name for name, method in METHODS.items() if method.black_box)
            raise ValueError(f"'{label}': the size prior needs a black-box method ({names}) without +decoder")
        return spec


@dataclass(frozen=True)
class Task:
    name: str
    structures: tuple[Structure, ...]
    selectors: tuple[str | None, ...]  # per structure: label value or segment name; None = by name / own file
    file_names: tuple[str, ...]  # per structure: the name as the config gives it ({structure} in data.labels)
    train: tuple[str, ...]
    test: tuple[str, ...]
    group: str | None = None
    softmax: bool = False  # head: softmax, the paper's multi-class head (FLARE'22): background + argmax


@dataclass(frozen=True)
class Phantoms:
    count: int = 12
    size: tuple[int, int, int] = (64, 64, 48)
    seed: int = 0

    @property
    def case_ids(self) -> list[str]:
        return [f"phantom-{n:02d}" for n in range(self.count)]


@dataclass(frozen=True)
class DataLayout:
    root: Path
    image: str  # template with {case}
    labels: str  # template with {case} and optionally {structure}
    phantoms: Phantoms | None = None

    def image_path(self, case: str) -> Path:
        return self.root / self.image.format(case=case)

    def labels_path(self, case: str, structure: str) -> Path:
        return self.root / self.labels.format(case=case, structure=structure)

    @property
    def per_structure_files(self) -> bool:
        return "{structure}" in self.labels


PHANTOM_IMAGE, PHANTOM_LABELS = "{case}.nii.gz", "{case}.labels.nii.gz"


@dataclass(frozen=True)
class Scoring:
    spaces: tuple[str, ...] = SPACES
    largest_component: bool = True  # the reference, in model space (the paper's binary-task rule)
    prediction_largest_component: bool = False  # off in the 2025 code
    surface_tolerance_mm: float = 2.0


@dataclass(frozen=True)
class ExperimentConfig:
    source: Path
    name: str
    model: str
    data: DataLayout
    tasks: tuple[Task, ...]
    shots: tuple[int, ...]
    all_data_k: int | None  # the K that means a task's whole training pool (the paper's "30-shot"), whatever its size
    draws: tuple[int, ...]
    methods: tuple[MethodSpec, ...]
    training: dict = field(default_factory=dict)
    method_training: dict = field(default_factory=dict)  # base method or method label -> overrides
    scoring: Scoring = Scoring()
    table_metric: str = "model_space.dice"
    cache_ram_gb: float = 8.0
    cache_dir: str | None = None
    device: str = "auto"

    def settings(self, spec: MethodSpec, seed: int) -> TrainingSettings:
        """The run's training settings: defaults, then `training`, then the method's overrides."""
        values = {**self.training, **self.method_training.get(spec.method, {}), **self.method_training.get(spec.label, {})}
        return TrainingSettings(**values, seed=seed, size_prior=spec.size_prior)

    def narrowed(self, tasks=None, methods=None, shots=None, draws=None) -> ExperimentConfig:
        """A part of the grid (the command line's --tasks/--methods/--shots/--draws): its runs have the
        same keys as in the whole grid, so a later full run reuses them."""

        def subset(option: str, chosen, available: dict):
            if chosen is None:
                return tuple(available.values())
            if missing := [c for c in chosen if c not in available]:
                raise InputError(f"--{option} {missing[0]}: not in the config (it has {', '.join(map(str, available))})", self.source)
            return tuple(available[c] for c in chosen)

        return dataclasses.replace(
            self,
            tasks=subset("tasks", tasks, {t.name: t for t in self.tasks}),
            methods=subset("methods", methods, {m.label: m for m in self.methods}),
            shots=tuple(sorted(subset("shots", shots, {k: k for k in self.shots}))),
            draws=subset("draws", draws, {d: d for d in self.draws}),
        )

    def with_phantom_root(self, root: Path) -> ExperimentConfig:
        """Phantom cases live in the output folder, known only when the run starts."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, root=root))


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    path = Path(path).expanduser()
    return parse_config(read_yaml(path), path)


KEYS = {"all_data_k", "name", "model", "device", "data", "tasks", "shots", "draws", "methods", "training", "method_training",
        "scoring", "table_metric", "feature_cache"}


def parse_config(values: Any, source: Path) -> ExperimentConfig:
    def fail(key: str, message: str):
        raise InputError(f"'{key}': {message}", source)

    if not isinstance(values, dict):
        raise InputError("the config must be a mapping of keys to values", source)
    if unknown := sorted(set(values) - KEYS):
        fail(unknown[0], f"unknown key (known: {', '.join(sorted(KEYS))})")
    from ..registry_file import default_model

    data = _data_layout(values.get("data"), source.parent, fail)
    cases = _cases(values.get("data") or {}, data, fail)
    tasks = tuple(_task(entry, f"tasks[{n}]", cases, data, fail) for n, entry in enumerate(_list(values, "tasks", fail)))
    if len({t.name for t in tasks}) != len(tasks):
        fail("tasks", "task names must be unique")
    shots = tuple(_positive_ints(values.get("shots", [1, 5, 10, 30]), "shots", fail))
    draws = tuple(_ints(values.get("draws", [0, 1, 2]), "draws", fail))
    if len(set(draws)) != len(draws):
        fail("draws", "draw seeds must be unique")
    all_data_k = values.get("all_data_k")
    if all_data_k is not None and all_data_k not in shots:
        fail("all_data_k", "must be one of the shots")
    methods = []
    for label in _list(values, "methods", fail):
        try:
            methods.append(MethodSpec.parse(str(label)))
        except ValueError as error:
            fail("methods", str(error))
    if len({m.label for m in methods}) != len(methods):
        fail("methods", "a method is listed twice")
    for task in tasks:
        pool = len(task.train)
        if (too_large := [k for k in shots if k > pool and k != all_data_k]):
            fail("shots", f"K = {too_large[0]} is larger than the training pool of task '{task.name}' ({pool} cases)")
    training = _settings(values.get("training") or {}, "training", fail)
    method_training = {}
    for name, overrides in (values.get("method_training") or {}).items():
        try:
            MethodSpec.parse(str(name))
        except ValueError as error:
            fail(f"method_training.{name}", str(error))
        method_training[name] = _settings(overrides or {}, f"method_training.{name}", fail)
    scoring = _scoring(values.get("scoring") or {}, fail)
    metric = str(values.get("table_metric") or f"{scoring.spaces[0]}.dice")
    space, _, name = metric.partition(".")
    if space not in scoring.spaces or name not in METRICS:
        fail("table_metric", f"expected SPACE.METRIC with SPACE in {', '.join(scoring.spaces)} and METRIC in {', '.join(METRICS)}")
    cache = values.get("feature_cache") or {}
    if not isinstance(cache, dict) or set(cache) - {"ram_gb", "dir"}:
        fail("feature_cache", "expected a mapping with ram_gb and dir")
    return ExperimentConfig(
        source=source,
        name=str(values.get("name") or source.stem),
        model=str(values.get("model") or default_model()),
        data=data,
        tasks=tasks,
        shots=shots,
        all_data_k=all_data_k,
        draws=draws,
        methods=tuple(methods),
        training=training,
        method_training=method_training,
        scoring=scoring,
        table_metric=metric,
        cache_ram_gb=float(cache.get("ram_gb", 8.0)),
        cache_dir=str(cache["dir"]) if cache.get("dir") else None,
        device=str(values.get("device") or "auto"),
    )


def _list(values: dict, key: str, fail) -> list:
    items = values.get(key)
    if not isinstance(items, list) or not items:
        fail(key, "must be a non-empty list")
    return items


def _ints(items: Any, key: str, fail) -> list[int]:
    if not isinstance(items, list) or not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        fail(key, "must be a non-empty list of whole numbers")
    return items


def _positive_ints(items: Any, key: str, fail) -> list[int]:
    items = _ints(items, key, fail)
    if min(items) < 1 or len(set(items)) != len(items):
        fail(key, "K values must be unique and at least 1")
    return sorted(items)


def _data_layout(data: Any, base: Path, fail) -> DataLayout:
    if not isinstance(data, dict):
        fail("data", "must be a mapping: root, image and labels templates, or phantoms")
    if "phantoms" in data:
        if set(data) - {"phantoms"}:
            fail("data", "phantoms take no root, image or labels")
        phantoms = data["phantoms"] or {}
        try:
            spec = Phantoms(int(phantoms.get("count", 12)), tuple(int(n) for n in phantoms.get("size", (64, 64, 48))), int(phantoms.get("seed", 0)))
        except (TypeError, ValueError, AttributeError):
            fail("data.phantoms", "expected count, size [x, y, z] and seed as whole numbers")
        if spec.count < 2 or len(spec.size) != 3 or min(spec.size) < 16:
            fail("data.phantoms", "needs count >= 2 and a size of three numbers >= 16")
        return DataLayout(base, PHANTOM_IMAGE, PHANTOM_LABELS, spec)
    if unknown := sorted(set(data) - {"root", "image", "labels", "cases"}):
        fail(f"data.{unknown[0]}", "unknown key (known: root, image, labels, cases, or phantoms)")
    for key in ("root", "image", "labels"):
        if not isinstance(data.get(key), str) or not data[key]:
            fail(f"data.{key}", "is required (a path template, e.g. image: '{case}/ct.nii.gz')")
    for key in ("image", "labels"):
        if "{case}" not in data[key]:
            fail(f"data.{key}", "must contain {case}")
    expanded = os.path.expandvars(data["root"])
    if unset := re.search(r"\$\{?(\w+)", expanded):
        fail("data.root", f"the environment variable {unset.group(1)} is not set (it names the data folder)")
    root = Path(expanded).expanduser()
    root = root if root.is_absolute() else base / root
    if not root.is_dir():
        fail("data.root", f"no such folder: {root}")
    return DataLayout(root, data["image"], data["labels"])


def _cases(data: dict, layout: DataLayout, fail) -> list[str]:
    """The case ids: listed, or phantom names, or every id the image template matches under root."""
    if layout.phantoms is not None:
        return layout.phantoms.case_ids
    if "cases" in data:
        listed = data["cases"]
        if not isinstance(listed, list) or not listed:
            fail("data.cases", "must be a non-empty list of case ids")
        return [str(c) for c in listed]
    head, _, tail = layout.image.partition("{case}")
    if "{case}" in tail:
        fail("data.cases", "list the case ids: the image template names {case} twice")
    pattern = re.compile(re.escape(head) + r"(.+)" + re.escape(tail) + "$")
    found = sorted({m.group(1) for p in glob.glob(str(layout.root / layout.image.replace("{case}", "*")))
                    if (m := pattern.match(Path(p).relative_to(layout.root).as_posix()))})
    if not found:
        fail("data.image", f"no file matches {layout.image} under {layout.root}")
    return found


def _task(entry: Any, key: str, cases: list[str], data: DataLayout, fail) -> Task:
    if not isinstance(entry, dict) or not entry.get("name"):
        fail(key, "each task needs a name, its structures and its train/test split")
    task_keys = {"name", "structures", "novel", "group", "cases", "train", "test", "split_seed", "head"}
    if unknown := sorted(set(entry) - task_keys):
        fail(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(task_keys))})")
    if "cases" in entry:  # the task's own pool (e.g. the cases that show the structure), split by counts
        if not isinstance(entry["cases"], list) or not entry["cases"]:
            fail(f"{key}.cases", "must be a non-empty list of case ids")
        if unknown_cases := [str(c) for c in entry["cases"] if str(c) not in cases]:
            fail(f"{key}.cases", f"case '{unknown_cases[0]}' is not among the data's cases")
        cases = [str(c) for c in entry["cases"]]
    raw = entry.get("structures") or [entry["name"]]
    pairs = list(raw.items()) if isinstance(raw, dict) else [(name, None) for name in raw] if isinstance(raw, list) else None
    if not pairs:
        fail(f"{key}.structures", "a list of structure names or a mapping name -> label value / segment")
    structures, selectors = [], []
    for name, selector in pairs:
        try:  # a typo must not turn a known organ into a "novel" one: new structures are declared
            structures.append(novel_structure(str(name)) if entry.get("novel") else resolve_structure(str(name)))
        except InputError as error:
            fail(f"{key}.structures", f"{error}; mark a structure outside the template with novel: true")
        selectors.append(None if selector is None else str(selector))
    if data.per_structure_files and any(s is not None for s in selectors):
        fail(f"{key}.structures", "labels are one file per structure ({structure} in data.labels): give names only")
    if data.phantoms is not None and any(s is None for s in selectors):
        fail(f"{key}.structures", "phantom labels are label maps: give each structure its value (e.g. spleen: 1)")
    train, test = _split(entry, key, cases, fail)
    if overlap := sorted(set(train) & set(test)):
        fail(f"{key}.test", f"case '{overlap[0]}' is also a training case")
    for case in (*train, *test):
        paths = [data.image_path(case)] + ([] if data.phantoms else [data.labels_path(case, str(name)) for name, _ in pairs])
        if data.phantoms is None and (missing := next((p for p in paths if not p.is_file()), None)):
            fail(f"{key}", f"case '{case}': no such file {missing}")
    names = tuple(str(name) for name, _ in pairs)
    head = entry.get("head", "sigmoid")
    if head not in ("sigmoid", "softmax"):
        fail(f"{key}.head", f"unknown head '{head}' (sigmoid: one output per structure; softmax: background + argmax)")
    return Task(str(entry["name"]), tuple(structures), tuple(selectors), names, tuple(train), tuple(test), entry.get("group"), head == "softmax")


def _split(entry: dict, key: str, cases: list[str], fail) -> tuple[list[str], list[str]]:
    train, test = entry.get("train"), entry.get("test")
    if isinstance(train, list) and isinstance(test, list):
        unknown = [str(c) for c in (*train, *test) if str(c) not in cases]
        if unknown:
            fail(key, f"case '{unknown[0]}' is not among the data's cases")
        if len(set(map(str, train))) != len(train) or len(set(map(str, test))) != len(test):
            fail(key, "a case is listed twice")
        return [str(c) for c in train], [str(c) for c in test]
    if isinstance(train, int) and isinstance(test, int) and train >= 1 and test >= 1:
        if train + test > len(cases):
            fail(key, f"train {train} + test {test} cases, but the data has {len(cases)}")
        order = np.random.default_rng(int(entry.get("split_seed", 42))).permutation(len(cases))
        chosen = [cases[i] for i in order]
        return chosen[test : test + train], chosen[:test]
    fail(key, "train and test must both be lists of case ids or both be counts")


def _settings(values: Any, key: str, fail) -> dict:
    """TrainingSettings overrides, checked by building the settings once."""
    if not isinstance(values, dict):
        fail(key, "must be a mapping of TrainingSettings fields")
    known = {f.name for f in dataclasses.fields(TrainingSettings)} - HARNESS_SETTINGS
    if unknown := sorted(set(values) - known):
        reason = "is set per run by the harness" if unknown[0] in HARNESS_SETTINGS else f"unknown setting (known: {', '.join(sorted(known))})"
        fail(f"{key}.{unknown[0]}", reason)
    try:
        settings = TrainingSettings(**values)
    except TypeError as error:
        fail(key, str(error))
    if (settings.max_epochs is not None and settings.max_epochs < 1) or settings.crops_per_step < 1:
        fail(key, "max_epochs and crops_per_step must be at least 1")
    if settings.precision not in ("auto", "fp32", "bf16", "fp16"):
        fail(f"{key}.precision", "choose auto, fp32, bf16 or fp16")
    return dict(values)


def _scoring(values: Any, fail) -> Scoring:
    if not isinstance(values, dict):
        fail("scoring", "must be a mapping")
    known = {f.name for f in dataclasses.fields(Scoring)}
    if unknown := sorted(set(values) - known):
        fail(f"scoring.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")
    spaces = values.get("spaces", list(SPACES))
    if isinstance(spaces, str):
        spaces = [spaces]
    if not isinstance(spaces, list) or not spaces or any(s not in SPACES for s in spaces) or len(set(spaces)) != len(spaces):
        fail("scoring.spaces", f"a list of {' and/or '.join(SPACES)}")
    tolerance = values.get("surface_tolerance_mm", 2.0)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or tolerance <= 0:
        fail("scoring.surface_tolerance_mm", "must be a positive number of mm")
    flags = {name: values.get(name, getattr(Scoring, name)) for name in ("largest_component", "prediction_largest_component")}
    if bad := [name for name, flag in flags.items() if not isinstance(flag, bool)]:
        fail(f"scoring.{bad[0]}", "must be true or false")
    return Scoring(tuple(spaces), surface_tolerance_mm=float(tolerance), **flags)
