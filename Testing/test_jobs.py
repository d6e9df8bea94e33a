"""jobs.py on real subprocesses (small scripts standing in for the engine), and static checks of the
Slicer module: it compiles, keeps torch out of Slicer's process, and its .ui names what it uses."""

from __future__ import annotations

import ast
import json
import os
import py_compile
import re
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from FSEFTSegmentLib import jobs
from FSEFTSegmentLib.jobs import JobState, JobStateError, PredictionJob, parse_line, predict_command

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "FSEFTSegment" / "FSEFTSegment.py"
UI = ROOT / "FSEFTSegment" / "Resources" / "UI" / "FSEFTSegment.ui"
posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc")

PRELUDE = "import json, os, subprocess, sys, time\ndef emit(**e): print(json.dumps(e), flush=True)\n"


def script_job(tmp_path, body, **options):
    path = tmp_path / "engine.py"
    path.write_text(PRELUDE + body)
    return PredictionJob([sys.executable, str(path)], **options)


def states(events):
    return [e["state"] for e in events if e["event"] == "state"]


def alive(pid):
    """True while `pid` runs; a zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def gone_within(pid, seconds):
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- a successful run ----------------------------------------------------------------------------

SUCCESS = """
emit(event="start", studies=2, elapsed=0.0)
print("some library chatter", flush=True)
emit(event="progress", study="a", fraction=0.5, message="a: half", elapsed=0.1)
emit(event="study_done", study="a", outputs=["/out/a.seg.nrrd"], message="a done", elapsed=0.2)
emit(event="warning", message="b: unusual spacing", elapsed=0.2)
emit(event="progress", study="b", fraction=0.5, message="b: half", elapsed=0.3)
emit(event="study_done", study="b", outputs=["/out/b.seg.nrrd", "/out/b.json"], message="b done", elapsed=0.4)
emit(event="summary", succeeded=2, failed=0, message="2 studies", elapsed=0.5)
"""


def test_a_successful_run_reports_events_states_outputs_and_imports(tmp_path):
    imported = []
    job = script_job(tmp_path, SUCCESS, importer=imported.append)
    job.start()
    events = job.wait(timeout=30)

    kinds = [e["event"] for e in events if e["event"] != "state"]
    assert kinds == ["start", "log", "progress", "study_done", "warning", "progress", "study_done", "summary"]
    assert events[kinds.index("log") + 2]["message"] == "some library chatter"  # after STARTING, RUNNING
    assert states(events) == [JobState.STARTING, JobState.RUNNING, JobState.IMPORTING, JobState.COMPLETED]
    expected = {"a": [Path("/out/a.seg.nrrd")], "b": [Path("/out/b.seg.nrrd"), Path("/out/b.json")]}
    assert job.outputs == expected and imported == [expected]
    assert job.returncode == 0 and job.fraction == 1.0


def test_poll_drains_live_and_tracks_the_batch_fraction(tmp_path):
    job = script_job(tmp_path, """
emit(event="start", studies=2)
emit(event="study_done", study="a", outputs=[])
emit(event="progress", study="b", fraction=0.5)
time.sleep(60)
""")
    job.start()
    deadline = time.monotonic() + 20
    seen = []
    while not any(e.get("event") == "progress" for e in seen) and time.monotonic() < deadline:
        seen += job.poll()
        time.sleep(0.02)
    assert job.state is JobState.RUNNING and job.fraction == pytest.approx(0.75)
    assert job.poll() == []  # drained: nothing twice
    job.cancel()
    job.wait(timeout=20)


def test_a_run_without_importer_completes_without_importing(tmp_path):
    job = script_job(tmp_path, SUCCESS)
    job.start()
    assert states(job.wait(timeout=30)) == [JobState.STARTING, JobState.RUNNING, JobState.COMPLETED]


# --- failures ------------------------------------------------------------------------------------


def test_a_failed_study_ends_failed_with_its_message_after_importing_the_others(tmp_path):
    imported = []
    job = script_job(tmp_path, """
emit(event="start", studies=2)
emit(event="study_done", study="a", outputs=["/out/a.seg.nrrd"])
emit(event="study_failed", study="b", message="b: failed: /data/b.nrrd: not a CT image")
emit(event="summary", succeeded=1, failed=1, message="1 of 2 studies failed")
print("1 of 2 studies failed", file=sys.stderr)
sys.exit(5)
""", importer=imported.append)
    job.start()
    events = job.wait(timeout=30)

    assert states(events)[-2:] == [JobState.IMPORTING, JobState.FAILED]
    assert job.message == "b: failed: /data/b.nrrd: not a CT image"
    assert job.returncode == 5 and imported == [{"a": [Path("/out/a.seg.nrrd")]}]
    assert job.failures == {"b": "b: failed: /data/b.nrrd: not a CT image"}


def test_exit_1_with_study_failed_is_failed_with_the_message(tmp_path):
    job = script_job(tmp_path, 'emit(event="study_failed", study="ct", message="ct: out of memory")\nsys.exit(1)\n')
    job.start()
    job.wait(timeout=30)
    assert (job.state, job.message, job.returncode) == (JobState.FAILED, "ct: out of memory", 1)


def test_a_crash_fails_with_the_last_line_it_printed(tmp_path):
    job = script_job(tmp_path, 'emit(event="start", studies=1)\nraise ValueError("boom")\n')
    job.start()
    job.wait(timeout=30)
    assert job.state is JobState.FAILED and job.message == "ValueError: boom"


def test_a_cli_user_error_arrives_as_its_one_line_without_prefix(tmp_path):
    job = script_job(tmp_path, 'print("fseft: error: /data/ct.nrrd: no such file or folder", file=sys.stderr)\nsys.exit(2)\n')
    job.start()
    job.wait(timeout=30)
    assert (job.state, job.message, job.returncode) == (JobState.FAILED, "/data/ct.nrrd: no such file or folder", 2)


def test_an_importer_error_fails_the_job_with_its_message(tmp_path):
    def importer(outputs):
        raise RuntimeError("/out/a.seg.nrrd: holds no segments")

    job = script_job(tmp_path, 'emit(event="study_done", study="a", outputs=["/out/a.seg.nrrd"])\n', importer=importer)
    job.start()
    job.wait(timeout=30)
    assert (job.state, job.message) == (JobState.FAILED, "/out/a.seg.nrrd: holds no segments")


def test_a_missing_interpreter_fails_at_start_without_raising(tmp_path):
    job = PredictionJob([str(tmp_path / "no-such-python"), "-m", "FSEFTSegmentLib"])
    job.start()
    assert job.state is JobState.FAILED and job.message.startswith("could not start")
    assert states(job.poll()) == [JobState.STARTING, JobState.FAILED]


# --- cancel --------------------------------------------------------------------------------------

SPAWNS_AND_HANGS = """
import signal
if "--ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
emit(event="info", message="child started", child=child.pid, me=os.getpid())
time.sleep(600)
"""


def start_and_get_pids(tmp_path, *args, grace_s=5.0):
    path = tmp_path / "engine.py"
    path.write_text(PRELUDE + SPAWNS_AND_HANGS)
    job = PredictionJob([sys.executable, str(path), *args], grace_s=grace_s)
    job.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for event in job.poll():
            if event["event"] == "info":
                return job, event["me"], event["child"]
        time.sleep(0.02)
    raise AssertionError("the script did not start")


@posix_only
def test_cancel_ends_the_process_and_its_children(tmp_path):
    job, parent, child = start_and_get_pids(tmp_path)
    started = time.monotonic()
    job.cancel()
    events = job.wait(timeout=10)

    assert states(events) == [JobState.CANCELLING, JobState.CANCELLED]
    assert gone_within(parent, 5) and gone_within(child, 5)
    assert time.monotonic() - started < 5


@posix_only
def test_cancel_kills_what_ignores_sigterm_after_the_grace_period(tmp_path):
    job, parent, child = start_and_get_pids(tmp_path, "--ignore-term", grace_s=0.5)
    job.cancel()
    job.wait(timeout=10)
    assert job.state is JobState.CANCELLED
    assert gone_within(parent, 5) and gone_within(child, 5)


@posix_only
def test_cancel_twice_or_after_the_end_does_nothing(tmp_path):
    job, _, _ = start_and_get_pids(tmp_path)
    job.cancel()
    job.cancel()
    job.wait(timeout=10)
    job.cancel()
    assert job.state is JobState.CANCELLED


# --- illegal transitions -------------------------------------------------------------------------


def test_illegal_transitions_raise(tmp_path):
    job = script_job(tmp_path, "")
    with pytest.raises(JobStateError, match="idle -> cancelling"):
        job.cancel()
    with pytest.raises(JobStateError):
        job.wait()
    job.start()
    job.wait(timeout=30)
    assert job.state is JobState.COMPLETED
    with pytest.raises(JobStateError, match="completed -> starting"):
        job.start()


# --- command line and helpers --------------------------------------------------------------------


def test_predict_command_is_the_engine_cli_with_json_progress(tmp_path):
    command = predict_command([tmp_path / "studies.csv"], "fseft-swinunetr", structures=["liver", "spleen"],
                              out=tmp_path / "out", device="cpu", python="/opt/PythonSlicer")
    assert command == ["/opt/PythonSlicer", "-m", "FSEFTSegmentLib", "predict", "--model", "fseft-swinunetr",
                       "--structures", "liver,spleen", "--out", str(tmp_path / "out"), "--format", "seg.nrrd",
                       "--device", "cpu", "--progress", "json", str(tmp_path / "studies.csv")]
    assert "--structures" not in predict_command(["ct.nrrd"], "m", python="py")


def test_the_engine_command_line_is_one_the_cli_accepts(tmp_path):
    cli = pytest.importorskip("FSEFTSegmentLib.cli")
    args = cli.build_parser().parse_args(predict_command(["ct.nrrd"], "m", structures=["liver"], out="o", python="p")[3:])
    assert (args.command, args.progress, args.structures, args.inputs) == ("predict", "json", "liver", ["ct.nrrd"])


def test_python_executable_is_pythonslicer_inside_slicer(monkeypatch):
    assert jobs.python_executable() == sys.executable  # slicer-core may be imported, but has no app
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=object()))
    monkeypatch.setattr(jobs.shutil, "which", lambda name: f"/Slicer/bin/{name}")
    assert jobs.python_executable() == "/Slicer/bin/PythonSlicer"
    monkeypatch.setattr(jobs.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError):
        jobs.python_executable()


def test_the_job_process_finds_the_engine_package(tmp_path):
    job = script_job(tmp_path, 'import FSEFTSegmentLib; emit(event="info", message=FSEFTSegmentLib.__file__)\n')
    job.start()
    info = [e for e in job.wait(timeout=30) if e["event"] == "info"]
    assert Path(info[0]["message"]).parent == ROOT / "FSEFTSegmentLib"


@pytest.mark.parametrize("line, expected", [
    ('{"event": "progress", "fraction": 0.5}\n', {"event": "progress", "fraction": 0.5}),
    ("Traceback (most recent call last):\r\n", {"event": "log", "message": "Traceback (most recent call last):"}),
    ('["event"]\n', {"event": "log", "message": '["event"]'}),
    ('{"fraction": 1}\n', {"event": "log", "message": '{"fraction": 1}'}),
    ("   \n", None),
])
def test_parse_line(line, expected):
    assert parse_line(line) == expected


def test_model_names_come_from_the_registry_file(tmp_path, monkeypatch):
    assert "fseft-swinunetr" in jobs.model_names()
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": [{"name": "mine"}]}))
    monkeypatch.setenv("FSEFT_REGISTRY", str(registry))
    assert jobs.model_names() == ["mine"]


# --- the Slicer module, statically ---------------------------------------------------------------


def test_module_compiles_and_never_imports_torch(tmp_path):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "module.pyc"), doraise=True)
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"torch", "monai"}
    assert len(MODULE.read_text(encoding="utf-8").splitlines()) < 300


def test_the_engine_modules_the_slicer_process_loads_do_not_import_torch():
    code = "import sys, FSEFTSegmentLib.jobs, FSEFTSegmentLib.scene; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_ui_file_is_valid_and_names_every_widget_the_module_uses():
    root = ET.parse(UI).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8")))
    assert used and used <= set(widgets), used - set(widgets)
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"
    bound = {w.get("name"): p.find("string").text for w in root.iter("widget") for p in w.findall("property")
             if p.get("name") == "SlicerParameterName"}
    fields = ast.parse(MODULE.read_text(encoding="utf-8"))
    parameter_class = next(n for n in ast.walk(fields) if isinstance(n, ast.ClassDef) and n.name == "FSEFTSegmentParameterNode")
    assert set(bound.values()) == {s.target.id for s in parameter_class.body if isinstance(s, ast.AnnAssign)}
    declared = {c.find("class").text for c in root.iter("customwidget")}
    assert {cls for cls in widgets.values() if cls.startswith(("qMRML", "ctk"))} <= declared


def test_engine_requirements_match_pyproject(monkeypatch):
    """Slicer's Python has no pyproject: the module installs `ENGINE_REQUIREMENTS` itself."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    bundled = ("torch", "numpy", "SimpleITK", "pydicom")  # torch via SlicerPyTorch; the others ship with Slicer
    assert set(jobs.ENGINE_REQUIREMENTS.values()) == {d for d in dependencies if not d.startswith(bundled)}
    assert jobs.missing_requirements() == []  # this environment has them all, PyYAML's capitals included
    monkeypatch.setitem(jobs.ENGINE_REQUIREMENTS, "no-such-package", "no-such-package>=1")
    assert jobs.missing_requirements() == ["no-such-package>=1"]
