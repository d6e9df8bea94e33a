"""The experiment report: run scores, the runs CSV, the paper-style tables and the plots, on synthetic records with known scores."""

from __future__ import annotations

import copy
import csv
import math
import statistics

import pytest

from FSEFTSegmentLib.errors import InputError
from FSEFTSegmentLib.experiment.report import RUN_COLUMNS, run_value, table_markdown, write_plots, write_runs_csv, write_table_md

TASKS = {"spleen": 0.0, "liver": 0.10}  # task -> offset of its Dice
OFFSETS = {**TASKS, "lung_left": -0.2}
METHODS = {"linear-probe": 0.50, "spatial-adapter": 0.60, "lora": 0.65}  # method -> base Dice
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def true_dice(task: str, method: str, k: int, draw: int) -> float:
    """The Dice a synthetic run scores on average: method base + task offset + 1 point per K + 3 points per draw."""
    if method == "zero-shot":
        return 0.40 + OFFSETS[task]
    return METHODS[method] + OFFSETS[task] + 0.01 * k + 0.03 * draw


def record(task: str, method: str, k: int, draw: int, hd95=(4.0, 6.0)) -> dict:
    """One run with two test cases whose Dice straddle `true_dice` by ±0.02 (so their mean is it)."""
    dice = true_dice(task, method, k, draw)
    scores = {}
    for test, shift, distance in zip(("case08", "case09"), (0.02, -0.02), hd95):
        scores[test] = {task: {"model_space": {"dice": dice + shift, "surface_dice": dice, "hd95_mm": distance},
                               "native": {"dice": dice - 0.01, "surface_dice": dice, "hd95_mm": distance}}}
    return {"format": 1, "key": f"{task}-{method}-{k}-{draw}", "task": task, "group": None, "structures": [task], "k": k,
            "supports_used": k, "draw": draw, "seed": draw, "method": method, "supports": [f"case0{i}" for i in range(k)],
            "tests": list(scores), "trainable_parameters": 0 if method == "zero-shot" else {"linear-probe": 30, "spatial-adapter": 124465,
                                                                                             "lora": 2_000_000}[method],
            "epochs": 0 if k == 0 else 40, "stopped_early": draw == 1, "train_seconds": 0.0 if k == 0 else 2.0 * k + len(method),
            "predict_seconds": 1.5, "seconds": 3.5 + 2.0 * k, "peak_memory_mb": None if draw else 812.5, "memory": "rss",
            "device": "cpu", "scores": scores}


@pytest.fixture
def records() -> list[dict]:
    """2 tasks × K in {1, 5} × 2 draws × 3 methods, plus one zero-shot run per task."""
    runs = [record(task, "zero-shot", 0, 0) for task in TASKS]
    return runs + [record(task, method, k, draw) for method in METHODS for k in (1, 5) for draw in (0, 1) for task in TASKS]


def table_row(markdown: str, method: str, occurrence: int = 0) -> list[str]:
    """The cells of `method`'s row in the `occurrence`-th table of the markdown."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {method} |")]
    return [cell.strip() for cell in rows[occurrence].strip("|").split("|")][1:]


def paper_cell(values: list[float]) -> str:
    """The hand-computed methods × K cell: ×100, one decimal, mean ± population std."""
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.pstdev(values):.1f}"


def test_run_value_is_the_mean_over_tests_and_structures():
    run = record("spleen", "lora", 5, 1)
    assert run_value(run, "model_space.dice") == pytest.approx(true_dice("spleen", "lora", 5, 1))
    assert run_value(run, "native.dice") == pytest.approx(true_dice("spleen", "lora", 5, 1) - 0.01)
    assert run_value(run, "model_space.hd95_mm") == pytest.approx(5.0)
    run["scores"]["case09"]["kidney"] = {"model_space": {"dice": 0.2, "surface_dice": 0.1, "hd95_mm": 11.0}}
    assert run_value(run, "model_space.dice") == pytest.approx((true_dice("spleen", "lora", 5, 1) * 2 + 0.2) / 3)
    assert run_value(run, "model_space.hd95_mm") == pytest.approx((4.0 + 6.0 + 11.0) / 3)
    assert math.isnan(run_value(run, "model_space.volume_ml"))
    assert math.isnan(run_value(run, "resampled.dice"))


def test_run_value_of_a_distance_is_infinite_when_one_is_null():
    run = record("liver", "lora", 1, 0, hd95=(4.0, None))
    assert run_value(run, "model_space.hd95_mm") == math.inf
    assert run_value(run, "native.hd95_mm") == math.inf
    assert run_value(run, "model_space.dice") == pytest.approx(true_dice("liver", "lora", 1, 0))


def test_runs_csv_round_trips(records, tmp_path):
    records[3] = record(records[3]["task"], records[3]["method"], records[3]["k"], records[3]["draw"], hd95=(None, 2.0))
    path = tmp_path / "out" / "runs.csv"
    write_runs_csv(records[::-1], path)
    assert [p.name for p in path.parent.iterdir()] == ["runs.csv"]  # no temporary file left behind
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        metrics = ["model_space.dice", "model_space.hd95_mm", "model_space.surface_dice",
                   "native.dice", "native.hd95_mm", "native.surface_dice"]
        assert reader.fieldnames == [*RUN_COLUMNS, *metrics, "key"]
        rows = list(reader)
    assert len(rows) == len(records) == 26
    order = [(row["task"], row["method"], int(row["k"]), int(row["draw"])) for row in rows]
    assert order == sorted(order) and order[0] == ("liver", "linear-probe", 1, 0)
    by_key = {r["key"]: r for r in records}
    for row in rows:
        run = by_key[row["key"]]
        for metric in metrics:
            expected = run_value(run, metric)
            if expected == math.inf:
                assert row[metric] == "inf"
            else:
                assert float(row[metric]) == pytest.approx(expected, rel=1e-12)
        assert row["method"] == run["method"] and int(row["k"]) == run["k"] and int(row["trainable_parameters"]) == run["trainable_parameters"]
        assert float(row["train_seconds"]) == run["train_seconds"] and row["memory"] == "rss" and row["group"] == ""
        assert row["peak_memory_mb"] == ("812.5" if run["peak_memory_mb"] else "")
        assert row["stopped_early"] == str(run["stopped_early"])
    assert {row["key"] for row in rows if row["model_space.hd95_mm"] == "inf"} == {records[3]["key"]}


def test_table_cells_are_mean_and_population_std_over_draws_of_the_task_mean(records):
    markdown = table_markdown(records, "model_space.dice", title="synthetic")
    assert markdown.startswith("## synthetic\n")
    header = next(line for line in markdown.splitlines() if line.startswith("| Method |"))
    assert header == "| Method | K = 1 | K = 5 |"
    methods = [line.split("|")[1].strip() for line in markdown.split("\n\n")[2].splitlines()[2:]]
    assert methods == ["zero-shot", *METHODS]  # zero-shot first, then first-seen order
    for method in METHODS:
        expected = [paper_cell([statistics.fmean(true_dice(task, method, k, draw) for task in TASKS) for draw in (0, 1)]) for k in (1, 5)]
        assert table_row(markdown, method) == expected
    assert table_row(markdown, "lora") == ["72.5 ± 1.5", "76.5 ± 1.5"]  # the same, written out: (0.65 + 0.05 + 0.01 K + 0.015) ×100
    assert table_row(markdown, "zero-shot") == ["45.0", "45.0"]  # every K column, no ±
    assert "Drawn from 26 runs" in markdown and "model_space.dice: Dice in the model's working space, ×100" in markdown


def test_per_task_tables_average_over_draws(records):
    markdown = table_markdown(records, "model_space.dice")
    assert "| Method | spleen | liver | Avg |" not in markdown  # tasks are sorted
    assert markdown.count("| Method | liver | spleen | Avg |") == 2
    for occurrence, k in ((1, 1), (2, 5)):
        per_task = [statistics.fmean(true_dice(task, "spatial-adapter", k, draw) for draw in (0, 1)) for task in ("liver", "spleen")]
        assert table_row(markdown, "spatial-adapter", occurrence) == [f"{100 * v:.1f}" for v in per_task] + [f"{50 * sum(per_task):.1f}"]
    assert table_row(markdown, "zero-shot", 2) == ["50.0", "40.0", "45.0"]


def test_group_means_get_their_own_column(records):
    grouped = copy.deepcopy(records) + [record("lung_left", "lora", 5, draw) for draw in (0, 1)]
    for run in grouped:
        run["group"] = "abdomen" if run["task"] in TASKS else "lung"
    markdown = table_markdown(grouped, "model_space.dice", methods=["lora"], shots=[5])
    assert "| Method | liver | spleen | lung_left | abdomen (mean) | lung (mean) | Avg |" in markdown
    assert "of the mean over 3 tasks" in markdown
    per_task = {task: statistics.fmean(true_dice(task, "lora", 5, draw) for draw in (0, 1)) for task in ("liver", "spleen")}
    per_task["lung_left"] = true_dice("lung_left", "lora", 5, 0) + 0.015  # its two draws, 3 points apart
    row = table_row(markdown, "lora", 1)
    assert row[3:] == [f"{50 * (per_task['liver'] + per_task['spleen']):.1f}", f"{100 * per_task['lung_left']:.1f}",
                       f"{100 * statistics.fmean(per_task.values()):.1f}"]


def test_missing_draws_and_runs_are_marked_not_averaged(records):
    incomplete = [r for r in records if (r["method"], r["k"], r["draw"], r["task"]) != ("lora", 5, 1, "liver")]
    markdown = table_markdown(incomplete, "model_space.dice", methods=["zero-shot", "lora", "full"], shots=[1, 5, 10])
    only_complete_draw = statistics.fmean(true_dice(task, "lora", 5, 0) for task in TASKS)
    assert table_row(markdown, "lora")[:2] == [paper_cell([statistics.fmean(true_dice(t, "lora", 1, d) for t in TASKS) for d in (0, 1)]),
                                               f"{100 * only_complete_draw:.1f} (1/2 draws)"]
    assert table_row(markdown, "lora")[2] == "–" and table_row(markdown, "full") == ["–", "–", "–"]
    per_task_k5 = table_row(markdown, "lora", 2)
    assert per_task_k5[0] == f"{100 * true_dice('liver', 'lora', 5, 0):.1f} (1/2 draws)"
    assert per_task_k5[1] == f"{100 * statistics.fmean(true_dice('spleen', 'lora', 5, d) for d in (0, 1)):.1f}"
    assert "linear-probe" not in markdown  # not asked for
    without_liver = [r for r in records if not (r["method"] == "lora" and r["task"] == "liver")]
    assert table_row(table_markdown(without_liver, "model_space.dice"), "lora")[0].endswith(" (1/2 tasks)")


def test_distances_in_mm_and_infinite_runs(records):
    records[-1] = record(records[-1]["task"], records[-1]["method"], records[-1]["k"], records[-1]["draw"], hd95=(None, 1.0))
    markdown = table_markdown(records, "native.hd95_mm")
    assert table_row(markdown, "linear-probe") == ["5.0 ± 0.0", "5.0 ± 0.0"]
    assert table_row(markdown, records[-1]["method"])[1] == "∞"
    assert "in mm, lower is better" in markdown


def test_duplicate_runs_are_refused(records):
    with pytest.raises(InputError, match="two runs of task"):
        table_markdown([*records, dict(records[5], key="again")], "model_space.dice")


def test_write_table_md_adds_the_notes(records, tmp_path):
    path = tmp_path / "table.md"
    write_table_md(records, path, "model_space.surface_dice", title="t", notes=["CPU runs", "short schedules"])
    assert path.read_text(encoding="utf-8") == table_markdown(records, "model_space.surface_dice", title="t") + "\n- CPU runs\n- short schedules\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_plots_are_real_pngs(records, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    paths = write_plots(records, tmp_path / "plots", "model_space.dice")
    assert [p.name for p in paths] == ["dice-vs-k.png", "dice-vs-parameters.png", "dice-vs-time.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000
        pixels = image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 0.01
