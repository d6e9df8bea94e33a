"""jobs.py on real subprocesses (small scripts standing in for the engine's `predict` and `adapt`), and
static checks of the Slicer module: it compiles, keeps torch out of Slicer's process, and its .ui names
what it uses."""

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
from FSEFTSegmentLib.jobs import (
    ADAPTATION_METHODS,
    EngineJob,
    JobState,
    JobStateError,
    adapt_command,
    adapter_folder,
    parse_line,
    predict_command,
)

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "FSEFTSegment" / "FSEFTSegment.py"
UI = ROOT / "FSEFTSegment" / "Resources" / "UI" / "FSEFTSegment.ui"
posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc")

PRELUDE = "import json, os, subprocess, sys, time\ndef emit(**e): print(json.dumps(e), flush=True)\n"


def script_job(tmp_path, body, **options):
    path = tmp_path / "engine.py"
    path.write_text(PRELUDE + body)
    return EngineJob([sys.executable, str(path)], **options)


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
    job = EngineJob([str(tmp_path / "no-such-python"), "-m", "FSEFTSegmentLib"])
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
    job = EngineJob([sys.executable, str(path), *args], grace_s=grace_s)
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


# --- an adapt run against a stand-in engine -----------------------------------------------------

FAKE_ADAPT = """\
#!{python}
# Stands for `python -m FSEFTSegmentLib adapt ... --progress json`; FAKE_ADAPT picks a behaviour.
import json, os, subprocess, sys, time
from pathlib import Path
args = sys.argv[1:]
assert args[:3] == ["-m", "FSEFTSegmentLib", "adapt"] and args[-2:] == ["--progress", "json"], args
def emit(**event): print(json.dumps(event), flush=True)
def values(name): return [args[i + 1] for i, arg in enumerate(args) if arg == name]
out, queries, mode = Path(values("--out")[0]), values("--query"), os.environ.get("FAKE_ADAPT", "ok")
emit(event="info", message="loading model m")
emit(event="progress", fraction=0.5, message="reading support 2/2")
if mode == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    emit(event="info", message="training", child=child.pid, me=os.getpid())
    time.sleep(600)
for epoch in (1, 2):
    emit(event="epoch", epoch=epoch, epochs=4, loss=1.0 / epoch, lr=1e-3, elapsed=epoch, eta=4 - epoch,
         message=f"epoch {{epoch}}/4")
emit(event="progress", fraction=0.9, message="validating")
while os.environ.get("FAKE_GATE") and not Path(os.environ["FAKE_GATE"]).exists():
    time.sleep(0.02)
emit(event="epoch", epoch=3, epochs=4, loss=0.3, lr=1e-3, elapsed=3, eta=0, message="epoch 3/4: stopped early")
emit(event="warning", message="stopped early at epoch 3")
out.mkdir(parents=True)
(out / "adapter.json").write_text("{{}}")
if "--predict-queries" in args and mode != "no-predictions":
    (out / "predictions").mkdir()
    for query in queries:
        study = Path(query).name.split(".")[0]
        path = out / "predictions" / f"{{study}}.seg.nrrd"
        path.write_text("segmentation")
        if mode == "announce":
            emit(event="study_done", study=study, outputs=[str(path)], message=f"{{study}} done")
if mode != "no-adapter":
    emit(event="adapter", path=str(out), message=f"adapter written to {{out}}")
"""


def fake_adapt_engine(tmp_path):
    engine = tmp_path / "fake-engine"
    engine.write_text(FAKE_ADAPT.format(python=sys.executable))
    engine.chmod(0o755)
    return str(engine)


def adapt_job(tmp_path, mode="ok", queries=("q1.nrrd", "q2.nrrd"), **options):
    command = adapt_command("m", "lora", [(tmp_path / "s1.nrrd", tmp_path / "labels" / "s1.nrrd")], ["pancreas=1"],
                            tmp_path / "adapter", queries=[tmp_path / q for q in queries],
                            predict_queries=bool(queries), python=fake_adapt_engine(tmp_path))
    return EngineJob(command, env={"FAKE_ADAPT": mode, **options.pop("env", {})}, **options)


@posix_only
@pytest.mark.parametrize("mode", ["ok", "announce"])
def test_an_adapt_run_reports_epochs_the_adapter_and_imports_the_query_predictions(tmp_path, mode):
    """Predictions count whether the engine announces them (study_done) or only writes them."""
    imported = []
    job = adapt_job(tmp_path, mode, importer=imported.append)
    assert job.subcommand == "adapt"
    job.start()
    events = job.wait(timeout=30)

    assert states(events) == [JobState.STARTING, JobState.RUNNING, JobState.IMPORTING, JobState.COMPLETED]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert job.epoch["message"] == "epoch 3/4: stopped early" and job.fraction == 1.0
    predictions = tmp_path / "adapter" / "predictions"
    expected = {"q1": [predictions / "q1.seg.nrrd"], "q2": [predictions / "q2.seg.nrrd"]}
    assert job.adapter == tmp_path / "adapter" and job.outputs == expected and imported == [expected]
    assert job.message == f"done: adapter {tmp_path / 'adapter'}, 2 prediction(s)"


@posix_only
def test_while_training_the_fraction_follows_the_epochs(tmp_path):
    gate = tmp_path / "go"
    job = adapt_job(tmp_path, env={"FAKE_GATE": str(gate)})
    job.start()
    deadline = time.monotonic() + 20
    while not any(e["event"] == "progress" and e["message"] == "validating" for e in job.poll()):
        assert time.monotonic() < deadline, "the stand-in engine did not reach its gate"
        time.sleep(0.02)
    assert job.state is JobState.RUNNING
    assert job.fraction == 0.5 and job.epoch["epoch"] == 2  # 2/4; the progress event at 0.9 did not move it
    gate.touch()
    job.wait(timeout=30)
    assert job.state is JobState.COMPLETED


def test_the_fraction_follows_each_phase_preparation_training_then_the_batch(tmp_path):
    job = script_job(tmp_path, f"""
from pathlib import Path
def gate(name):
    emit(event="info", message=name)
    while not Path({str(tmp_path)!r}, name).exists():
        time.sleep(0.02)
emit(event="progress", fraction=0.4, message="downloading")
gate("prepared")
emit(event="epoch", epoch=1, epochs=4, message="epoch 1/4")
emit(event="progress", fraction=0.9, message="a step inside the epoch")
gate("trained")
emit(event="start", studies=2)
emit(event="progress", study="q1", fraction=0.5)
gate("predicting")
""")
    job.start()
    seen = {}
    for name, fraction in (("prepared", 0.4), ("trained", 0.25), ("predicting", 0.25)):
        deadline = time.monotonic() + 20
        while not any(e["event"] == "info" and e["message"] == name for e in job.poll()):
            assert time.monotonic() < deadline, f"the script did not reach {name}"
            time.sleep(0.02)
        seen[name] = job.fraction
        (tmp_path / name).touch()
    job.wait(timeout=30)
    assert seen == {"prepared": 0.4, "trained": 0.25, "predicting": 0.25}  # the last: (0 + 0.5) / 2 studies
    assert job.state is JobState.COMPLETED and job.fraction == 1.0


@posix_only
def test_an_adapt_run_without_queries_has_only_the_adapter(tmp_path):
    imported = []
    job = adapt_job(tmp_path, queries=(), importer=imported.append)
    job.start()
    assert states(job.wait(timeout=30))[-1] is JobState.COMPLETED
    assert (job.adapter, job.outputs, imported) == (tmp_path / "adapter", {}, [])
    assert job.message == f"done: adapter {tmp_path / 'adapter'}"


@posix_only
@pytest.mark.parametrize("mode, message", [
    ("no-adapter", "the engine finished without reporting an adapter"),
    ("no-predictions", "only 0 of 2 query predictions were written"),
])
def test_an_adapt_run_that_exits_0_without_its_results_fails(tmp_path, mode, message):
    job = adapt_job(tmp_path, mode)
    job.start()
    job.wait(timeout=30)
    assert (job.state, job.message, job.returncode) == (JobState.FAILED, message, 0)


@posix_only
def test_cancel_during_adaptation_ends_the_engine_and_its_children(tmp_path):
    job = adapt_job(tmp_path, "hang")
    job.start()
    deadline = time.monotonic() + 20
    while True:
        info = [e for e in job.poll() if e["event"] == "info" and "child" in e]
        if info:
            break
        assert time.monotonic() < deadline, "the stand-in engine did not start training"
        time.sleep(0.02)
    job.cancel()
    events = job.wait(timeout=10)
    assert states(events) == [JobState.CANCELLING, JobState.CANCELLED]
    assert gone_within(info[0]["me"], 5) and gone_within(info[0]["child"], 5)
    assert job.adapter is None and job.outputs == {}


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


def test_predict_command_with_adapters_leaves_the_model_to_them():
    command = predict_command(["studies.csv"], None, adapters=["/a/pancreas", "/a/psoas"], python="py")
    assert command == ["py", "-m", "FSEFTSegmentLib", "predict", "--adapter", "/a/pancreas", "--adapter", "/a/psoas",
                       "--format", "seg.nrrd", "--device", "auto", "--progress", "json", "studies.csv"]
    cli = pytest.importorskip("FSEFTSegmentLib.cli")
    args = cli.build_parser().parse_args(command[3:])
    assert (args.command, args.model, args.adapter, args.inputs) == ("predict", None, ["/a/pancreas", "/a/psoas"], ["studies.csv"])


def test_adapt_command_is_the_documented_command_line(tmp_path):
    supports = [("a.nrrd", "labels/a.nrrd"), (tmp_path / "b.nrrd", "b.seg.nrrd:pancreas")]
    command = adapt_command("fseft-swinunetr", "spatial-adapter", supports, ["pancreas=1"], tmp_path / "adapter",
                            queries=["q.nrrd"], tune_decoder=True, size_prior=True, predict_queries=True, seed=3,
                            max_epochs=50, device="cuda", python="/opt/PythonSlicer")
    assert command == ["/opt/PythonSlicer", "-m", "FSEFTSegmentLib", "adapt", "--model", "fseft-swinunetr",
                       "--method", "spatial-adapter", "--tune-decoder",
                       "--support", "a.nrrd", "labels/a.nrrd",
                       "--support", str(tmp_path / "b.nrrd"), "b.seg.nrrd:pancreas",
                       "--structure", "pancreas=1", "--query", "q.nrrd", "--size-prior", "--predict-queries",
                       "--out", str(tmp_path / "adapter"), "--seed", "3", "--max-epochs", "50",
                       "--device", "cuda", "--progress", "json"]
    minimal = adapt_command(None, "bitfit", [("a.nrrd", "a-label.nrrd")], ["psoas"], "out", python="py")
    assert minimal == ["py", "-m", "FSEFTSegmentLib", "adapt", "--method", "bitfit",
                       "--support", "a.nrrd", "a-label.nrrd", "--structure", "psoas", "--out", "out",
                       "--device", "auto", "--progress", "json"]
    with pytest.raises(ValueError, match="unknown method 'peft'"):
        adapt_command("m", "peft", [], [], "out", python="py")


def test_the_adapt_command_line_is_one_the_cli_accepts():
    cli = pytest.importorskip("FSEFTSegmentLib.cli")
    command = adapt_command("m", "lora", [("a.nrrd", "la.nrrd"), ("b.nrrd", "lb.nrrd")], ["pancreas=1"], "out",
                            queries=["q.nrrd"], size_prior=True, predict_queries=True, python="p")
    args = cli.build_parser().parse_args(command[3:])
    assert (args.command, args.model, args.method, args.progress) == ("adapt", "m", "lora", "json")
    assert args.support == [["a.nrrd", "la.nrrd"], ["b.nrrd", "lb.nrrd"]]
    assert (args.structure, args.query) == (["pancreas=1"], ["q.nrrd"])
    assert args.size_prior and args.predict_queries and not args.tune_decoder and args.out == "out"
    assert args.head == "sigmoid" and args.size_prior_mode == "per-query"
    softmax = adapt_command("m", "linear-probe", [("a.nrrd", "la.nrrd")], ["liver=1", "spleen=2"], "out", softmax_head=True, python="p")
    assert cli.build_parser().parse_args(softmax[3:]).head == "softmax"


def test_the_widget_lists_the_engine_methods():
    methods = pytest.importorskip("FSEFTSegmentLib.methods")  # imports torch
    assert ADAPTATION_METHODS == tuple(methods.METHODS)


def test_adapter_folder_is_new_and_file_safe(tmp_path):
    first = adapter_folder(tmp_path, "left psoas/major", "lora")
    assert first.parent == tmp_path and first.name.startswith("left_psoas_major-lora-") and not first.exists()
    first.mkdir()
    second = adapter_folder(tmp_path, "left psoas/major", "lora")
    assert second != first and not second.exists()


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


def test_model_names_come_from_the_registry_file_default_first(tmp_path, monkeypatch):
    from FSEFTSegmentLib.registry_file import model_names

    assert model_names()[0] == "fseft-mini" and "fseft-swinunetr" in model_names()
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": [{"name": "mine"}, {"name": "other"}]}))
    monkeypatch.setenv("FSEFT_REGISTRY", str(registry))
    assert model_names() == ["mine", "other"]
    registry.write_text(json.dumps({"default": "other", "models": [{"name": "mine"}, {"name": "other"}]}))
    assert model_names() == ["other", "mine"]


# --- the Slicer module, statically ---------------------------------------------------------------


def test_module_compiles_and_never_imports_torch(tmp_path):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "module.pyc"), doraise=True)
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"torch", "monai"}
    assert len(MODULE.read_text(encoding="utf-8").splitlines()) < 400


def test_the_engine_modules_the_slicer_process_loads_do_not_import_torch():
    code = "import sys, FSEFTSegmentLib.jobs, FSEFTSegmentLib.scene, FSEFTSegmentLib.registry_file; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_ui_file_is_valid_and_names_every_widget_the_module_uses():
    """Every `self.ui.NAME` and every widget name the module passes around as a string exists in the
    .ui, and every Slicer/CTK class the .ui uses is declared (else Slicer cannot load the panel)."""
    root = ET.parse(UI).getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    source = MODULE.read_text(encoding="utf-8")
    used = set(re.findall(r"\bui\.(\w+)", source))
    named = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and re.fullmatch(r"[a-z]\w*(Button|ComboBox|Label|Table|Selector|SpinBox|CheckBox|TextEdit|LineEdit|Frame)", node.value)}
    methods = {"setHorizontalHeaderLabels", "layout", "clear"}  # Qt calls on ui.X, caught by the pattern's \w+
    assert used and (used - methods) <= set(widgets), (used - methods) - set(widgets)
    assert named and named <= set(widgets), named - set(widgets)
    declared = {c.find("class").text for c in root.iter("customwidget")}
    assert {cls for cls in widgets.values() if cls.startswith(("qMRML", "ctk"))} <= declared
    assert widgets["queryVolumesSelector"] == widgets["segmentVolumesSelector"] == "qMRMLCheckableNodeComboBox"
    connected = {c.find("receiver").text for c in root.iter("connection") if c.find("slot").text.startswith("setMRMLScene")}
    assert connected == {name for name, cls in widgets.items() if cls.startswith("qMRML") and cls != "qMRMLWidget"}


def test_protected_pins_hold_slicers_own_packages(monkeypatch):
    pins = jobs.protected_pins()
    from importlib import metadata

    assert f"numpy=={metadata.version('numpy')}" in pins and f"SimpleITK=={metadata.version('SimpleITK')}" in pins
    assert all("==" in pin for pin in pins)


def test_a_job_without_results_ends_with_the_engines_last_word(tmp_path):
    job = script_job(tmp_path, 'emit(event="info", message="fseft-swinunetr: fseft.pth verified and saved")\n')
    job.start()
    job.wait(timeout=30)
    assert job.state is JobState.COMPLETED and job.message == "done: fseft-swinunetr: fseft.pth verified and saved"


def test_engine_requirements_match_pyproject(monkeypatch):
    """Slicer's Python has no pyproject: the module installs `ENGINE_REQUIREMENTS` itself."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    bundled = ("torch", "numpy", "SimpleITK", "pydicom")  # torch via SlicerPyTorch; the others ship with Slicer
    assert set(jobs.ENGINE_REQUIREMENTS.values()) == {d for d in dependencies if not d.startswith(bundled)}
    assert jobs.TORCH_REQUIREMENT in dependencies
    assert jobs.missing_requirements() == []  # this environment has them all, PyYAML's capitals included
    monkeypatch.setitem(jobs.ENGINE_REQUIREMENTS, "no-such-package", "no-such-package>=1")
    assert jobs.missing_requirements() == ["no-such-package>=1"]
