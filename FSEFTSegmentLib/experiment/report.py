"""Tables, CSV and plots of a finished `fseft experiment` grid, laid out like the paper's.

Why: a grid of (task, K, draw, method) runs is only useful once it reads like the paper's Table 1
(methods × K, mean ± std over support draws) and its per-task tables, and the cost plots that
motivate parameter-efficient fine-tuning. A grid that is still running, or that lost a run,
must not look complete: a cell averages only equal sets of runs and says what it is missing.

Each run is one JSON record (see `fseft experiment`); its score for a metric "SPACE.METRIC"
(e.g. "model_space.dice") is the mean over its test cases and structures (`run_value`).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io.files import atomic_write

RUN_COLUMNS = ("task", "group", "method", "k", "supports_used", "draw", "seed", "trainable_parameters", "epochs", "stopped_early",
               "train_seconds", "predict_seconds", "seconds", "peak_memory_mb", "memory", "device")
PLOT_NAMES = ("dice-vs-k.png", "dice-vs-parameters.png", "dice-vs-time.png")
MISSING = "–"
SPACE_NAMES = {"model_space": "in the model's working space", "native": "on the image's native grid"}
METRIC_NAMES = {"dice": "Dice", "surface_dice": "surface Dice", "hd95_mm": "95th-percentile Hausdorff distance (mm; ∞ when a mask is empty)"}


def is_distance(metric: str) -> bool:
    """Whether `metric` is a distance in mm (lower is better, null means infinite), not a Dice-like overlap."""
    return metric.rpartition(".")[2].endswith("_mm")


def run_value(record: dict, metric: str) -> float:
    """Mean of `metric` ("SPACE.METRIC") over the run's test cases and structures; nan if none has it.

    A null distance is infinite (one mask empty), so one null makes the mean `math.inf`."""
    space, _, name = metric.partition(".")
    values = []
    for structures in record["scores"].values():
        for spaces in structures.values():
            if name not in spaces.get(space, {}):
                continue
            value = spaces[space][name]
            if value is None and is_distance(metric):
                value = math.inf
            if value is not None:
                values.append(float(value))
    if not values:
        return math.nan
    return math.inf if math.inf in values else math.fsum(values) / len(values)


def record_metrics(records: Iterable[dict]) -> list[str]:
    """Every "SPACE.METRIC" scored in any record, sorted."""
    return sorted({f"{space}.{name}" for record in records for structures in record["scores"].values()
                   for spaces in structures.values() for space, metrics in spaces.items() for name in metrics})


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return "inf" if value == math.inf else str(value)


def write_runs_csv(records: Sequence[dict], path: str | os.PathLike) -> None:
    """One row per run, sorted by (task, method, k, draw): its settings and costs, its mean per metric, its key."""
    metrics = record_metrics(records)
    ordered = sorted(records, key=lambda r: (r["task"], r["method"], r["k"], r["draw"]))
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow([*RUN_COLUMNS, *metrics, "key"])
        for record in ordered:
            row = [record.get(column) for column in RUN_COLUMNS] + [run_value(record, metric) for metric in metrics] + [record["key"]]
            writer.writerow([_csv_value(value) for value in row])


@dataclass
class Cell:
    """One table cell: per-draw values of a (method, K) over a common set of tasks, and what is missing."""

    values: list[float]  # one per complete draw: mean over the cell's tasks
    draws: int  # draws the column expects
    tasks: int  # tasks of the cell
    expected_tasks: int  # tasks of the table
    zero_shot: bool
    parameters: float = math.nan  # mean trainable parameters of the runs used
    train_seconds: float = math.nan  # mean adaptation time of the runs used

    @property
    def mean(self) -> float:
        return _mean(self.values)

    @property
    def std(self) -> float:
        """Population std over the draws (0 for one draw, nan when a draw is infinite)."""
        return statistics.pstdev(self.values) if self.values and math.isfinite(self.mean) else math.nan

    def missing(self) -> str:
        """" (1/2 tasks, 2/3 draws)" when the cell covers less than the table, else ""."""
        marks = [f"{self.tasks}/{self.expected_tasks} tasks"] if self.tasks < self.expected_tasks else []
        if len(self.values) < self.draws:
            marks.append(f"{len(self.values)}/{self.draws} draws")
        return f" ({', '.join(marks)})" if marks else ""


class Grid:
    """The runs of one table, indexed by (method, K, task, draw), with the methods, K values and tasks it shows."""

    def __init__(self, records: Sequence[dict], metric: str, methods: Sequence[str] | None, shots: Sequence[int] | None):
        self.metric = metric
        zero_shot = {r["method"] for r in records if r["k"] == 0}
        seen = list(dict.fromkeys(r["method"] for r in records))
        self.methods = list(methods) if methods is not None else [m for m in seen if m in zero_shot] + [m for m in seen if m not in zero_shot]
        self.shots = sorted(shots if shots is not None else {r["k"] for r in records if r["k"] > 0})
        self.records = [r for r in records if r["method"] in self.methods and (r["k"] == 0 or r["k"] in self.shots)]
        self.zero_shot = {r["method"] for r in self.records if r["k"] == 0}
        self.runs: dict[tuple, dict] = {}
        for record in self.records:
            where = (record["method"], record["k"], record["task"], record["draw"])
            if where in self.runs:
                raise InputError(f"two runs of task {where[2]}, method {where[0]}, K = {where[1]}, draw {where[3]}: "
                                 f"{self.runs[where]['key']} and {record['key']}")
            self.runs[where] = record
        self.groups = {r["task"]: r["group"] for r in self.records}
        self.tasks = sorted(self.groups, key=lambda task: (self.groups[task] is not None, self.groups[task] or "", task))
        self.group_names = sorted({group for group in self.groups.values() if group is not None})

    def run_k(self, method: str, k: int) -> int:
        """The K a method's runs carry in column K: 0 for zero-shot, whose runs fill every column."""
        return 0 if method in self.zero_shot else k

    def expected_draws(self, method: str, k: int) -> list[int]:
        """The draws column K has for any method (zero-shot has its own: draw 0)."""
        if method in self.zero_shot:
            return sorted({r["draw"] for r in self.records if r["k"] == 0})
        return sorted({r["draw"] for r in self.records if r["k"] == k and r["method"] not in self.zero_shot})

    def value(self, method: str, k: int, task: str, draw: int) -> float:
        """run_value of one run, nan when it was not run (or does not have the metric)."""
        record = self.runs.get((method, self.run_k(method, k), task, draw))
        return math.nan if record is None else run_value(record, self.metric)

    def cell(self, method: str, k: int, tasks: Sequence[str] | None = None) -> Cell:
        """Mean over the cell's tasks per draw, for the draws that have every one of them.

        The cell's tasks are those of `tasks` (default: all) that any draw has; draws lacking one
        are left out (and counted as missing) rather than averaged over fewer tasks."""
        tasks = self.tasks if tasks is None else list(tasks)
        draws = self.expected_draws(method, k)
        scored = {(task, draw): self.value(method, k, task, draw) for task in tasks for draw in draws}
        present = {where: value for where, value in scored.items() if not math.isnan(value)}
        covered = [task for task in tasks if any(where[0] == task for where in present)]
        complete = [draw for draw in draws if covered and all((task, draw) in present for task in covered)]
        values = [_mean([present[task, draw] for task in covered]) for draw in complete]
        used = [self.runs[method, self.run_k(method, k), task, draw] for task in covered for draw in complete]
        return Cell(values, len(draws), len(covered), len(tasks), method in self.zero_shot,
                    _mean([r["trainable_parameters"] for r in used]), _mean([r["train_seconds"] for r in used]))

    def supports_used(self, k: int) -> list[int]:
        """The supports the runs of column K trained on, when not K (K equal to the pool size trains on K-1)."""
        return sorted({r["supports_used"] for r in self.records if r["k"] == k and r["supports_used"] != k})


def _mean(values: Sequence[float]) -> float:
    return math.nan if not values else math.inf if math.inf in values else math.fsum(values) / len(values)


def shown(value: float, metric: str) -> str:
    """A value as the tables print it: ×100 for Dice-like metrics, mm for distances, one decimal."""
    if math.isnan(value):
        return MISSING
    if value == math.inf:
        return "∞"
    return f"{value if is_distance(metric) else 100 * value:.1f}"


def cell_text(cell: Cell, metric: str) -> str:
    """"76.3 ± 1.2", "76.3" (one draw, or zero-shot), "–" (no run), plus what is missing, e.g. " (2/3 draws)"."""
    if not cell.values:
        return MISSING
    text = shown(cell.mean, metric)
    if len(cell.values) > 1 and not cell.zero_shot and math.isfinite(cell.mean):
        text += f" ± {shown(cell.std, metric)}"
    return text + cell.missing()


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def describe(metric: str) -> str:
    """E.g. "model_space.dice: Dice in the model's working space, ×100, higher is better"."""
    space, _, name = metric.partition(".")
    words = f"{METRIC_NAMES.get(name, name)} {SPACE_NAMES.get(space, 'in space ' + space)}"
    return f"{metric}: {words}, {'in mm, lower is better' if is_distance(metric) else '×100, higher is better'}"


def _column_title(grid: Grid, k: int) -> str:
    used = grid.supports_used(k)
    return f"K = {k}" + (f" ({'/'.join(map(str, used))} used)" if used else "")


def table_markdown(records: Sequence[dict], metric: str, methods: list[str] | None = None, shots: list[int] | None = None,
                   title: str = "") -> str:
    """The paper's Table 1 (methods × K, mean ± std over draws of the mean over tasks), then one per-task table per K."""
    grid = Grid(records, metric, methods, shots)
    lines = [f"## {title}", ""] if title else []
    lines.append(f"### {metric}: methods × K (mean ± std over support draws of the mean over {len(grid.tasks)} tasks)")
    lines += ["", *_markdown_table(["Method", *(_column_title(grid, k) for k in grid.shots)],
                                   [[method, *(cell_text(grid.cell(method, k), metric) for k in grid.shots)] for method in grid.methods])]
    for k in grid.shots:
        columns = [*grid.tasks, *(f"{group} (mean)" for group in grid.group_names), "Avg"]
        rows = []
        for method in grid.methods:
            cells = [grid.cell(method, k, [task]) for task in grid.tasks]
            cells += [grid.cell(method, k, [task for task in grid.tasks if grid.groups[task] == group]) for group in grid.group_names]
            rows.append([method, *(_per_task_text(cell, metric) for cell in [*cells, grid.cell(method, k)])])
        lines += ["", f"### {_column_title(grid, k)}: per task (mean over support draws)", "", *_markdown_table(["Method", *columns], rows)]
    lines += ["", f"{describe(metric)}. Zero-shot does not depend on K or the draw: its one value fills every K column. "
              f"\"(a/b draws)\": only a of the column's b support draws have every task of the cell; \"(a/b tasks)\": the cell covers "
              f"a of the table's b tasks. Group means and Avg are computed like the methods × K cells (complete draws only). "
              f"Drawn from {sum(not math.isnan(run_value(r, metric)) for r in grid.records)} runs."]
    return "\n".join(lines) + "\n"


def _per_task_text(cell: Cell, metric: str) -> str:
    """A per-task cell: the mean over draws (no ±), with what is missing."""
    return MISSING if not cell.values else shown(cell.mean, metric) + cell.missing()


def write_table_md(records: Sequence[dict], path: str | os.PathLike, metric: str, methods: list[str] | None = None,
                   shots: list[int] | None = None, title: str = "", notes: Sequence[str] = ()) -> None:
    """`table_markdown`, then `notes` as a bullet list, written atomically."""
    text = table_markdown(records, metric, methods, shots, title)
    if notes:
        text += "\n" + "".join(f"- {note}\n" for note in notes)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_plots(records: Sequence[dict], folder: str | os.PathLike, metric: str, methods: list[str] | None = None) -> list[Path]:
    """`metric` against K, trainable parameters and adaptation time: one PNG each in `folder`; returns their paths.

    Values are those of the methods × K table (mean and std over draws of the mean over tasks);
    zero-shot, which trains nothing (0 parameters, 0 s), is a dashed horizontal line, not a point.
    A bare `Figure` renders with Agg and leaves pyplot's global state (and Slicer's) alone."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    grid = Grid(records, metric, methods, None)
    scale = 1 if is_distance(metric) else 100
    y_label = f"{metric} ({'mm' if is_distance(metric) else '×100'}), mean over {len(grid.tasks)} tasks"
    trained = [method for method in grid.methods if method not in grid.zero_shot]
    cells = {(method, k): cell for method in trained for k in grid.shots if _plottable(cell := grid.cell(method, k))}
    colours = {method: f"C{index % 10}" for index, method in enumerate(trained)}
    markers = {k: "osD^vPX*"[index % 8] for index, k in enumerate(grid.shots)}
    zero_note = "; zero-shot (trains nothing): dashed line" if grid.zero_shot else ""
    paths = []
    for name, x_label, cost in (("dice-vs-k.png", "K (support volumes)", None),
                                ("dice-vs-parameters.png", "trainable parameters (log)", "parameters"),
                                ("dice-vs-time.png", "mean adaptation time, train_seconds (s, log)", "train_seconds")):
        figure = Figure(figsize=(7, 4.8), layout="constrained")
        axis = figure.subplots()
        if cost is None:
            for method in trained:
                own = [(k, cells[method, k]) for k in grid.shots if (method, k) in cells]
                axis.errorbar([k for k, _ in own], [scale * cell.mean for _, cell in own], yerr=[scale * cell.std for _, cell in own],
                              marker="o", capsize=3, color=colours[method], label=method)
            axis.set_xticks(grid.shots)
        else:
            for (method, k), cell in cells.items():
                if getattr(cell, cost) > 0:
                    axis.errorbar([getattr(cell, cost)], [scale * cell.mean], yerr=[scale * cell.std], marker=markers[k], capsize=3,
                                  color=colours[method])
            axis.set_xscale("log")
            for method in trained:
                axis.add_line(Line2D([], [], color=colours[method], marker="o", linestyle="", label=method))
            for k in grid.shots:
                axis.add_line(Line2D([], [], color="black", marker=markers[k], linestyle="", label=f"K = {k}"))
        for index, method in enumerate(sorted(grid.zero_shot)):
            if _plottable(cell := grid.cell(method, 0)):
                axis.axhline(scale * cell.mean, color="gray", linestyle=("--", ":", "-.")[index % 3], label=f"{method}{cell.missing()}")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        axis.set(xlabel=x_label, ylabel=y_label)
        axis.set_title(f"{metric} vs {x_label.partition(' (')[0]}\nmean ± std over support draws{zero_note}", fontsize=9)
        path = Path(folder) / name
        with atomic_write(path) as tmp:
            figure.savefig(tmp, dpi=100)
        paths.append(path)
    return paths


def _plottable(cell: Cell) -> bool:
    return bool(cell.values) and math.isfinite(cell.mean)
