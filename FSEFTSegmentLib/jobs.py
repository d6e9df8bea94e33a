"""Run the engine in its own process and follow its JSON-lines progress: the widget's job runner.

Slicer's process never imports torch and never blocks: `EngineJob` starts an engine command line
(`predict_command` or `adapt_command`: `python -m FSEFTSegmentLib predict|adapt ... --progress json`)
in a new process group, a background thread turns its stdout into events on a queue, and the GUI
drains them with `poll()` from a timer on the main thread (where the importer may touch the scene).
States change only through a transition table, so the widget can trust them to drive its buttons.
No Qt and no torch here: tests run it on real subprocesses.
"""

from __future__ import annotations

import enum
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

ENGINE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding FSEFTSegmentLib

# What the engine's interpreter needs beyond torch (installed through SlicerPyTorch, which picks the
# build for the GPU driver) and beyond what Slicer ships (numpy, SimpleITK, pydicom: reinstalling
# those breaks Slicer). Distribution name -> requirement; kept in step with pyproject.toml by a test.
ENGINE_REQUIREMENTS = {"monai": "monai>=1.6,<2", "einops": "einops>=0.7", "nibabel": "nibabel>=5", "scipy": "scipy>=1.10",
                       "safetensors": "safetensors>=0.4", "slicerio": "slicerio>=1.1", "pynrrd": "pynrrd>=1.0",
                       "pyyaml": "pyyaml>=6"}
TORCH_REQUIREMENT = "torch>=2.8"  # for SlicerPyTorch's installTorch; as pyproject.toml


class JobState(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    IMPORTING = "importing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


_TRANSITIONS = {
    JobState.IDLE: {JobState.STARTING},
    JobState.STARTING: {JobState.RUNNING, JobState.FAILED},
    JobState.RUNNING: {JobState.IMPORTING, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLING},
    JobState.IMPORTING: {JobState.COMPLETED, JobState.FAILED},
    JobState.CANCELLING: {JobState.CANCELLED},
    JobState.COMPLETED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}


class JobStateError(RuntimeError):
    """An illegal state transition: a bug in the caller, not something the user did."""


Importer = Callable[[dict[str, list[Path]]], None]

#: The engine's adaptation methods (`fseft methods`), listed here because the engine's own table
#: imports torch; a test keeps the two in step.
ADAPTATION_METHODS = ("linear-probe", "spatial-adapter", "adapter-1x1", "bitfit", "affine-ln", "lora",
                      "adaptformer", "full", "adapter-2023", "ft-last")


def engine_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an engine process: this one's, with the engine importable and its output
    unbuffered UTF-8 (the JSON lines must arrive as they are printed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENGINE_ROOT), env.get("PYTHONPATH")]))
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
    env.update(extra or {})
    return env


def missing_requirements() -> list[str]:
    """The engine requirements not installed in this interpreter (metadata only: nothing is imported)."""
    installed = {(distribution.metadata["Name"] or "").lower() for distribution in metadata.distributions()}
    return [spec for name, spec in ENGINE_REQUIREMENTS.items() if name not in installed]


#: Packages Slicer ships and depends on: installing the engine's requirements must never change them.
PROTECTED = ("numpy", "SimpleITK", "requests", "pydicom", "vtk")


def protected_pins() -> list[str]:
    """pip constraints (`name==version`) holding Slicer's own packages at their installed versions,
    so that installing the engine's requirements fails rather than upgrading them."""
    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def python_executable() -> str:
    """The interpreter for the engine: PythonSlicer inside Slicer (where sys.executable is the
    application itself), else this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is None or not hasattr(slicer, "app"):
        return sys.executable
    found = shutil.which("PythonSlicer")
    if not found:
        raise FileNotFoundError("PythonSlicer was not found next to Slicer (is the installation complete?)")
    return found


def predict_command(inputs: Iterable[str | os.PathLike], model: str | None, *, structures: Sequence[str] = (),
                    adapters: Iterable[str | os.PathLike] = (), out: str | os.PathLike | None = None,
                    fmt: str = "seg.nrrd", device: str = "auto", python: str | None = None) -> list[str]:
    """The engine's `predict` command line for `inputs`, always with JSON progress (the stream we
    parse). `model` None leaves the choice to the engine (an adapter names its own base model)."""
    command = [python or python_executable(), "-m", "FSEFTSegmentLib", "predict"]
    if model is not None:
        command += ["--model", model]
    for adapter in adapters:
        command += ["--adapter", os.fspath(adapter)]
    if structures:
        command += ["--structures", ",".join(structures)]
    if out is not None:
        command += ["--out", os.fspath(out)]
    command += ["--format", fmt, "--device", device, "--progress", "json"]
    return command + [os.fspath(path) for path in inputs]


def adapt_command(model: str | None, method: str, supports: Iterable[tuple], structures: Sequence[str],
                  out: str | os.PathLike, *, queries: Iterable[str | os.PathLike] = (), tune_decoder: bool = False,
                  softmax_head: bool = False, size_prior: bool = False, predict_queries: bool = False, seed: int | None = None,
                  max_epochs: int | None = None, device: str = "auto", python: str | None = None) -> list[str]:
    """The engine's `adapt` command line: `supports` are (image, labels[:VALUE|:SEGMENT]) pairs,
    `structures` are `NAME[=VALUE]`; the adapter lands in `out` (with --predict-queries, the queries'
    segmentations in `out`/predictions; with the size prior and several queries, one adapter per
    query in `out`-<query id>, each announced by its `adapter` event). Always with JSON progress."""
    if method not in ADAPTATION_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ADAPTATION_METHODS)}")
    command = [python or python_executable(), "-m", "FSEFTSegmentLib", "adapt"]
    if model is not None:
        command += ["--model", model]
    command += ["--method", method] + (["--tune-decoder"] if tune_decoder else []) + (["--head", "softmax"] if softmax_head else [])
    for image, labels in supports:
        command += ["--support", os.fspath(image), os.fspath(labels)]
    for structure in structures:
        command += ["--structure", structure]
    for query in queries:
        command += ["--query", os.fspath(query)]
    command += (["--size-prior"] if size_prior else []) + (["--predict-queries"] if predict_queries else [])
    command += ["--out", os.fspath(out)]
    if seed is not None:
        command += ["--seed", str(seed)]
    if max_epochs is not None:
        command += ["--max-epochs", str(max_epochs)]
    return command + ["--device", device, "--progress", "json"]


def adapter_folder(root: str | os.PathLike, structure: str, method: str) -> Path:
    """A new (not yet existing) folder under `root` for an adapter: `<structure>-<method>-<time>`."""
    stem = re.sub(r"[^\w.-]+", "_", f"{structure}-{method}").strip("._") or "adapter"
    path = Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def parse_line(line: str) -> dict | None:
    """One stdout line as an event; anything not a JSON event (tracebacks, library noise) is a log line."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if isinstance(event, dict) and isinstance(event.get("event"), str):
        return event
    return {"event": "log", "message": line}


class EngineJob:
    """One engine run (`predict_command`, `adapt_command`, or any command that speaks the JSON-lines
    protocol): start, poll, cancel. Single use; make a new job for the next run.

    `poll()` returns the engine's events in order, interleaved with `{"event": "state", "state":
    JobState, "message": str}` whenever the state changes. Results:
    - `outputs` (study id -> paths) of the studies that succeeded, from `study_done` events; for an
      `adapt ... --predict-queries` run also the segmentations found in `<adapter>/predictions` that
      no event announced;
    - `adapter`, the folder of the `adapter` event (an `adapt` run without one fails).
    When the process ends, `outputs` go to `importer` on the main thread (state IMPORTING), so a
    partly failed batch still brings back what it could; then COMPLETED if every study succeeded,
    else FAILED with the engine's own message.

    `fraction` follows the current phase: `progress` events while preparing (e.g. a download),
    epoch/epochs while training (`epoch` events), then studies done (+ the current study's
    fraction) once a batch has `start`ed.
    """

    def __init__(self, command: Sequence[str], importer: Importer | None = None,
                 env: dict[str, str] | None = None, grace_s: float = 5.0):
        self.command = [os.fspath(part) for part in command]
        self.importer = importer
        self.env = env or {}
        self.grace_s = grace_s
        self.state = JobState.IDLE
        self.message = ""
        self.fraction = 0.0
        self.outputs: dict[str, list[Path]] = {}
        self.failures: dict[str, str] = {}
        self.adapter: Path | None = None
        self.epoch: dict | None = None  # the last `epoch` event (epoch, epochs, loss, lr, eta, ...)
        self.returncode: int | None = None
        self._studies = 0
        self._phase = "preparing"  # -> "training" (epoch events) -> "batch" (a start event)
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._ended = threading.Event()  # set once the process has exited and its output closed
        self._events: list[dict] = []
        self._log: deque[str] = deque(maxlen=20)
        self._said = ""  # the engine's last info message: what a job without results reports at the end

    @property
    def phase(self) -> str:
        """"preparing" (reading, caching features, downloading), "training" (epoch events) or "batch"
        (segmenting studies, after a `start` event)."""
        return self._phase

    @property
    def subcommand(self) -> str | None:
        """`predict`, `adapt`, ... for an engine command line (`... -m FSEFTSegmentLib NAME ...`), else None."""
        for i in range(len(self.command) - 2):
            if self.command[i:i + 2] == ["-m", "FSEFTSegmentLib"]:
                return self.command[i + 2]
        return None

    def start(self) -> None:
        """Launch the process; a launch failure ends in FAILED rather than raising (like any other)."""
        self._transition(JobState.STARTING, "starting")
        try:
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, encoding="utf-8", errors="replace", env=engine_environment(self.env), **_own_process_group())
        except OSError as error:
            self._transition(JobState.FAILED, f"could not start {self.command[0]}: {error}")
            return
        threading.Thread(target=self._read, name="FSEFTSegment job output", daemon=True).start()
        self._transition(JobState.RUNNING, "running")

    def poll(self) -> list[dict]:
        """Events since the last call, without blocking. Main thread only: it may run the importer."""
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event["event"] == "exit":
                self._finish(event["returncode"])
            else:
                self._track(event)
                self._events.append(event)
        events, self._events = self._events, []
        return events

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict]:
        """Poll until finished and return all events: for scripts and tests (the GUI uses a timer)."""
        if self.state is JobState.IDLE:
            raise JobStateError("wait() before start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        events = self.poll()
        while not self.state.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job still {self.state.value} after {timeout} s")
            time.sleep(interval)
            events += self.poll()
        return events

    def cancel(self) -> None:
        """Stop the engine and every process it started: SIGTERM to the group, SIGKILL after
        `grace_s` (Windows: `taskkill /T /F`). The state becomes CANCELLED once the output ends.
        Does nothing when the job is already over or cancelling (a second click, a late close)."""
        if self.state.finished or self.state is JobState.CANCELLING:
            return
        self._transition(JobState.CANCELLING, "cancelling")
        self._kill(hard=os.name == "nt")
        if os.name != "nt":
            timer = threading.Timer(self.grace_s, self._kill, kwargs={"hard": True})
            timer.daemon = True
            timer.start()

    def _read(self) -> None:
        """Background thread: stdout lines to the queue, then the exit code. The pipe ends only when
        every process holding it has exited, so the exit event also means no child is left writing."""
        for line in self._process.stdout:
            event = parse_line(line)
            if event is not None:
                self._queue.put(event)
        self._process.stdout.close()
        returncode = self._process.wait()
        self._ended.set()
        self._queue.put({"event": "exit", "returncode": returncode})

    def _kill(self, hard: bool) -> None:
        if hard and self._ended.is_set():
            return  # all gone after SIGTERM: the group id may already belong to someone else
        pid = self._process.pid
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True,
                           creationflags=subprocess.CREATE_NO_WINDOW)
            return
        try:
            os.killpg(pid, signal.SIGKILL if hard else signal.SIGTERM)  # the group id is the leader's pid
        except (ProcessLookupError, PermissionError):
            pass  # the whole group has already exited

    def _track(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self._studies, self._phase, self.fraction = int(event.get("studies") or 0), "batch", 0.0
        elif kind == "epoch":
            epochs = float(event.get("epochs") or 0)
            if epochs > 0:
                self._phase, self.epoch = "training", event
                self.fraction = min(max(float(event.get("epoch") or 0) / epochs, 0.0), 1.0)
        elif kind == "progress" and self._phase != "training":  # training moves by epochs only
            done = len(self.outputs) + len(self.failures)
            fraction = float(event.get("fraction") or 0.0)
            self.fraction = (done + fraction) / self._studies if self._studies else fraction
        elif kind == "study_done":
            self.outputs[str(event.get("study"))] = [Path(path) for path in event.get("outputs") or []]
        elif kind == "study_failed":
            self.failures[str(event.get("study"))] = str(event.get("message") or "failed")
        elif kind == "adapter" and event.get("path"):
            self.adapter = Path(event["path"])
        elif kind == "log":
            self._log.append(event["message"])
        elif kind == "info" and event.get("message"):
            self._said = str(event["message"])
        if kind in ("study_done", "study_failed") and self._studies:
            self.fraction = (len(self.outputs) + len(self.failures)) / self._studies

    def _option(self, name: str) -> list[str]:
        """The values of option `name` in the command line, in order."""
        return [self.command[i + 1] for i in range(len(self.command) - 1) if self.command[i] == name]

    def _collect_query_outputs(self) -> str | None:
        """For `adapt --predict-queries`: add the predictions under `<adapter>/predictions` that no
        event announced; return a problem to report when fewer than the queries are there."""
        if self.subcommand != "adapt":
            return None
        if self.adapter is None:
            return "the engine finished without reporting an adapter"
        if "--predict-queries" not in self.command:
            return None
        queries = self._option("--query")
        for path in sorted((self.adapter / "predictions").glob("*.seg.nrrd")):
            self.outputs.setdefault(path.name[: -len(".seg.nrrd")], [path])
        if len(self.outputs) < len(queries):
            return f"only {len(self.outputs)} of {len(queries)} query predictions were written"
        return None

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        if self.state is JobState.CANCELLING:
            self._transition(JobState.CANCELLED, "cancelled")
            return
        problem = self._collect_query_outputs() if returncode == 0 else None
        if self.outputs and self.importer is not None:
            self._transition(JobState.IMPORTING, f"loading {len(self.outputs)} result(s)")
            try:
                self.importer(self.outputs)
            except Exception as error:
                self._transition(JobState.FAILED, str(error))
                return
        if returncode == 0 and problem:
            self._transition(JobState.FAILED, problem)
        elif returncode == 0:
            self.fraction = 1.0
            if self.adapter is None and (self.outputs or self.subcommand == "predict"):
                done = f"{len(self.outputs)} result(s)"
            elif self.adapter is None:
                done = self._said or "finished"
            else:
                done = f"adapter {self.adapter}" + (f", {len(self.outputs)} prediction(s)" if self.outputs else "")
            self._transition(JobState.COMPLETED, f"done: {done}")
        else:
            self._transition(JobState.FAILED, self._failure_message(returncode))

    def _failure_message(self, returncode: int) -> str:
        """The engine's own words: its study_failed messages, else the last line it printed (the
        CLI's one-line error, shown without its `fseft: error:` prefix)."""
        if self.failures:
            messages = list(self.failures.values())
            more = f" (and {len(messages) - 3} more)" if len(messages) > 3 else ""
            return "; ".join(messages[:3]) + more
        if self._log:
            return re.sub(r"^fseft: (error: )?", "", self._log[-1])
        return f"the engine exited with code {returncode}"

    def _transition(self, state: JobState, message: str) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise JobStateError(f"illegal job transition {self.state.value} -> {state.value}")
        self.state, self.message = state, message
        self._events.append({"event": "state", "state": state, "message": message})


def _own_process_group() -> dict:
    """Popen options that give the engine its own process group, so cancel reaches its children too."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}
