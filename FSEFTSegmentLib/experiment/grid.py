"""The grid of runs an experiment file describes: supports drawn per (K, draw), a stable key per run.

Draws (paper-facts section 10): a draw's seed permutes the task's sorted training pool; the first K
cases are the supports and the next one is the draw's validation volume (recorded; early stopping
uses the training loss, as the paper's default). The same seed gives nested support sets across K,
so K = 5 extends K = 1. K equal to the pool (or `all_data_k`) is the paper's "all data" setting: its
code trains on all but the validation volume (its "30-shot" on 29 of 30) and runs it once, with the
first draw's seed.
Zero-shot depends on neither K nor the draw: one run per task, stored with k = 0 and draw 0.

Keys: a run's key hashes everything that decides its result (model weights, the task's structures
and files, supports, tests, method, training settings, scoring), so a rerun finds what is done, and
a changed config invalidates exactly the runs it changes. Files changed in place under the same
paths are not detected: use a new output folder after editing data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from .config import ExperimentConfig, MethodSpec, Task

RECORD_FORMAT = 1


@dataclass(frozen=True)
class RunSpec:
    task: Task
    method: MethodSpec
    k: int  # requested K; 0 for zero-shot
    draw: int  # the draw's seed (also the training seed)
    supports: tuple[str, ...]
    validation: str | None

    @property
    def name(self) -> str:
        if self.method.method is None:
            return f"{self.task.name} / zero-shot"
        return f"{self.task.name} / {self.method.label} / K={self.k} / draw {self.draw}"

    def key(self, config: ExperimentConfig, model_sha256: str) -> str:
        settings = None if self.method.method is None else asdict(config.settings(self.method, self.draw))
        identity = {
            "format": RECORD_FORMAT,
            "model": model_sha256,
            "structures": [[s.name, selector] for s, selector in zip(self.task.structures, self.task.selectors)],
            **({"head": "softmax"} if self.task.softmax else {}),  # absent for sigmoid: earlier keys stay valid
            "files": [config.data.image, config.data.labels, str(config.data.root), list(self.task.file_names)],
            "phantoms": asdict(config.data.phantoms) if config.data.phantoms else None,
            "tests": list(self.task.test),
            "supports": list(self.supports),
            "method": self.method.label,
            "settings": settings,
            "scoring": asdict(config.scoring),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def draw_supports(pool: tuple[str, ...], k: int, seed: int) -> tuple[tuple[str, ...], str | None]:
    """The supports and the validation case of one draw (K = len(pool): all but the validation case)."""
    order = [sorted(pool)[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    used = min(k, len(order) - 1) if len(order) > 1 else k
    return tuple(order[:used]), (order[used] if used < len(order) else None)


def plan_runs(config: ExperimentConfig, known: set[str]) -> tuple[list[RunSpec], list[str]]:
    """Every run of the grid in a fixed order, and notes on what was left out and why.

    `known` holds the structures the model has an output for; zero-shot runs only where every
    structure of the task is among them."""
    runs, notes = [], []
    for task in config.tasks:
        for method in config.methods:
            if method.method is None:
                if all(s.name in known for s in task.structures):
                    runs.append(RunSpec(task, method, 0, 0, (), None))
                else:
                    notes.append(f"zero-shot left out for task '{task.name}': the model has no output for its structure(s)")
                continue
            for k in config.shots:
                whole = k >= len(task.train) or k == config.all_data_k
                for draw in config.draws[:1] if whole else config.draws:
                    runs.append(RunSpec(task, method, k, draw, *draw_supports(task.train, len(task.train) if whole else k, draw)))
    return runs, notes


def rank_share(runs: list, rank: int, world: int) -> list:
    """This rank's runs: every world-th run of the grid, so each rank gets a mix of cheap and costly ones."""
    return runs[rank::world]
