"""`fseft experiment`: the paper's few-shot protocol as one resumable command.

`config` reads and checks the experiment file, `grid` lays out the runs (supports drawn per K and
draw, a stable key per run), `runner` adapts, predicts, scores and stores each run, sharing cases
and frozen features across the grid, and `report` writes runs.csv, table.md and the plots.
"""

from .config import ExperimentConfig, load_config
from .runner import ExperimentResult, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "load_config", "run_experiment"]
