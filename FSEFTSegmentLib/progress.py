"""Progress events: the one stream the CLI prints and the Slicer module reads.

Every long operation reports through a `Progress` object as named events with fields
(`study`, `fraction` in [0, 1], `message`, ...). Three renderings share that vocabulary:
`json` (one JSON object a line on stdout: the protocol the Slicer widget parses), `bar`
(a human progress line on stderr) and `none`. Warnings always reach the user.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, TextIO


class StageTimes(dict):
    """Seconds per named stage of one study's prediction (read, preprocess, network, ...), reported
    in its `study_done` event so a slow step shows where it is, in the CLI and in Slicer alike."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - started, 4)


class Progress:
    """Silent base rendering; subclasses decide how an event is shown."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.started = time.monotonic()

    def emit(self, event: str, **fields: Any) -> None:
        """Report one event (`start`, `step`, `study_done`, `study_failed`, `summary`, ...)."""

    def step(self, fraction: float, message: str = "", **fields: Any) -> None:
        self.emit("progress", fraction=round(min(max(fraction, 0.0), 1.0), 4), message=message, **fields)

    def warning(self, message: str, **fields: Any) -> None:
        self.emit("warning", message=message, **fields)
        if not isinstance(self, JsonProgress):
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def info(self, message: str, **fields: Any) -> None:
        self.emit("info", message=message, **fields)


class JsonProgress(Progress):
    """One JSON object per line, flushed at once, so a reading process sees it live."""

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "elapsed": round(time.monotonic() - self.started, 3), **fields}
        stream = self.stream or sys.stdout
        stream.write(json.dumps(record, default=str) + "\n")
        stream.flush()


class BarProgress(Progress):
    """A single rewritten status line on stderr (on a terminal); messages on their own lines.

    For a one-study run the per-study outcome and the summary are left to the final message,
    so a failure reads as one line.
    """

    width = 30
    studies = 0
    line_open = False

    def emit(self, event: str, **fields: Any) -> None:
        stream = self.stream or sys.stderr
        if event == "start":
            self.studies = fields.get("studies", 0)
        if event == "progress":
            if stream.isatty():
                fraction = fields.get("fraction", 0.0)
                filled = int(round(fraction * self.width))
                label = str(fields.get("study") or "")[:30]
                stream.write(f"\r{label:30} [{'#' * filled}{'.' * (self.width - filled)}] {fraction:6.1%} {fields.get('message', '')[:40]:40}")
                self.line_open = True
        elif event in ("info", "study_done", "study_failed", "summary"):
            if self.line_open:
                stream.write("\r" + " " * 110 + "\r")
                self.line_open = False
            message = fields.get("message")
            if message and not (event in ("study_failed", "summary") and self.studies == 1):
                stream.write(message + "\n")
        stream.flush()


def make_progress(kind: str) -> Progress:
    """`bar`, `json` or `none`, as the `--progress` option names them."""
    return {"bar": BarProgress, "json": JsonProgress, "none": Progress}[kind]()
