"""The Slicer panel's layer (`FSEFTSegmentLib.panel`) against real MRML (slicer-core) and real engine
subprocesses: its state in the parameter node, what it lists and enables, what methods cost, the
adapt workflow end to end with the bundled model (progress, loss curve, cancel, import, names),
downloads and adapter imports as jobs, and the refusals a clinician can run into."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")

from FSEFTSegmentLib import jobs, panel, phantom_workflow, scene  # noqa: E402
from FSEFTSegmentLib.errors import InputError  # noqa: E402
from FSEFTSegmentLib.jobs import EngineJob, JobState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def logic(mrml_scene, tmp_path, monkeypatch):
    """A PanelLogic on the headless scene, with private job, adapters and model-cache folders."""
    monkeypatch.setenv("FSEFT_ADAPTERS", str(tmp_path / "adapters"))
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    return panel.PanelLogic(mrml_scene, work_root=tmp_path / "jobs", python=sys.executable)


def add_volume(mrml_scene, name, shape=(6, 7, 8), value=0):
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volume, np.full(shape, value, np.int16))
    return volume


def annotate(mrml_scene, volume, segments):
    """A Segment Editor-like segmentation on `volume`: name -> mask (None: an empty segment)."""
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} segmentation")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, mask in segments.items():
        segment_id = node.GetSegmentation().AddEmptySegment(name, name)
        if mask is not None:
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, volume)
    return node


def box(shape=(6, 7, 8)):
    mask = np.zeros(shape, bool)
    mask[1:4, 2:5, 2:6] = True
    return mask


# ---------------------------------------------------------------- state


def test_parameters_default_persist_and_follow_the_nodes(mrml_scene, tmp_path):
    p = panel.PanelParameters.of(mrml_scene)
    assert (p.model, p.method, p.device, p.seed, p.maxEpochs, p.structures, p.sizePrior) == ("", "linear-probe", "auto", 0, 200, [], False)
    a, b = add_volume(mrml_scene, "A"), add_volume(mrml_scene, "B")
    p.structures, p.method, p.seed, p.sizePrior, p.tuneDecoder = ["pancreas", "left psoas"], "lora", 3, True, True
    p.set_volumes("support", [a, b])
    p.set_volumes("query", [b])
    assert panel.PanelParameters.of(mrml_scene).node is p.node  # one singleton, as getParameterNode() finds it
    assert [v.GetName() for v in p.volumes("support")] == ["A", "B"]

    mrml_scene.SetURL(str(tmp_path / "scene.mrml"))
    assert mrml_scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.Import()
    q = panel.PanelParameters.of(reloaded)
    assert (q.structures, q.method, q.seed, q.sizePrior, q.tuneDecoder) == (["pancreas", "left psoas"], "lora", 3, True, True)
    assert [v.GetName() for v in q.volumes("support")] == ["A", "B"] and [v.GetName() for v in q.volumes("query")] == ["B"]

    mrml_scene.RemoveNode(a)
    assert [v.GetName() for v in p.volumes("support")] == ["B"]
    with pytest.raises(AttributeError):
        p.colour = "red"
    with pytest.raises(ValueError, match="unknown volume role"):
        p.set_volumes("reference", [b])


# ---------------------------------------------------------------- what the panel lists


def test_structures_supports_and_default_queries_come_from_the_scene(mrml_scene):
    a, b, c = (add_volume(mrml_scene, name) for name in "ABC")
    label_map = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    annotate(mrml_scene, a, {"pancreas": box(), "psoas": box()})
    annotate(mrml_scene, b, {"pancreas": box(), "psoas": None})  # psoas started, not drawn
    annotations = scene.annotations(mrml_scene)

    assert panel.structure_choices(annotations) == [("pancreas", 2), ("psoas", 1)]
    assert [x.volume for x in panel.support_candidates(annotations, ["pancreas"])] == [a, b]
    assert [x.volume for x in panel.support_candidates(annotations, ["pancreas", "psoas"])] == [a]
    assert panel.support_candidates(annotations, []) == []
    assert panel.default_queries(mrml_scene, annotations, ["pancreas"]) == [c]
    assert panel.default_queries(mrml_scene, annotations, ["pancreas", "psoas"]) == [b, c]
    assert label_map not in panel.scalar_volumes(mrml_scene)


def test_model_rows_say_what_is_usable_and_what_to_do():
    listed = [{"name": "fseft-mini", "status": "bundled"}, {"name": "fseft-swinunetr", "status": "not downloaded"},
              {"name": "mine", "status": "imported"}, {"name": "broken", "status": "bundled file missing"}]
    rows = panel.model_rows(listed)
    assert [r["usable"] for r in rows] == [True, False, True, False]
    assert rows[1]["label"] == "fseft-swinunetr (not downloaded)"
    assert panel.model_problem(rows, "fseft-mini") == ""
    assert "press Download" in panel.model_problem(rows, "fseft-swinunetr") and panel.downloadable(rows, "fseft-swinunetr")
    assert not panel.downloadable(rows, "fseft-mini")
    assert "reinstall" in panel.model_problem(rows, "broken")
    assert "Import from file" in panel.model_problem(rows, "nowhere")
    checking = panel.model_rows(None)
    assert checking[0]["name"] == "fseft-mini" and checking[0]["status"] == "checking"
    assert panel.model_problem(checking, "fseft-mini") == ""  # not an error while the engine answers


def test_the_engine_answers_models_methods_and_device_in_the_background(logic):
    queries = logic.queries
    assert queries.get("models", "list") is None or queries.pending() is False  # started, not waited for
    models = {row["name"]: row["status"] for row in queries.wait("models", "list", timeout=120)}
    assert models["fseft-mini"] == "bundled" and models["fseft-swinunetr"] == "not downloaded"

    summaries = queries.wait(*panel.methods_query("fseft-mini", 2, False), timeout=300)
    device = panel.device_summary(queries.wait("device", timeout=120), "auto")
    rows = panel.method_rows(summaries, device)
    assert [r["method"] for r in rows] == list(panel.ADAPTATION_METHODS)
    probe = next(r for r in rows if r["method"] == "linear-probe")
    assert probe["trainable_parameters"] == 2 * (12 + 1)  # feature size 12 + bias, per structure
    assert probe["black_box"] and "black-box" in probe["label"] and "trainable" in probe["label"]
    assert probe["fits"] is None  # a CPU here: no GPU memory to hold the estimate against
    assert "CUDA not available" in device["text"] and "torch" in device["text"]

    assert queries.get("methods", "--model", "no-such-model") is None
    with pytest.raises(InputError, match="no-such-model"):
        queries.wait("methods", "--model", "no-such-model", timeout=120)
    assert "no-such-model" in queries.error("methods", "--model", "no-such-model")


def test_device_summary_of_a_cuda_machine_holds_memory_estimates_against_the_gpu():
    report = {"torch": "2.13.0+cu128", "build": "CUDA 12.8", "cuda_available": True, "cpu_threads": 16,
              "gpus": [{"name": "NVIDIA RTX 4070", "free_bytes": 9 * 2**30, "total_bytes": 12 * 2**30}]}
    summary = panel.device_summary(report, "auto")
    assert summary["text"] == "torch 2.13.0+cu128 (CUDA 12.8); NVIDIA RTX 4070: 9.0 of 12.0 GB free"
    rows = panel.method_rows([{"method": "full", "trainable_parameters": 62_186_659, "black_box": False, "training_memory_gb": 14.2},
                              {"method": "linear-probe", "trainable_parameters": 49, "black_box": True, "training_memory_gb": 0.4}], summary)
    assert [r["fits"] for r in rows] == [False, True]
    assert panel.device_summary(report, "cpu")["free_gb"] is None


def test_readiness_names_what_to_do():
    ready = dict(running=False, model_issue="", structures=["pancreas"], supports=[object()], method="spatial-adapter",
                 size_prior=True, black_box=True, queries=[object()])
    assert panel.adapt_readiness(**ready).ok
    for change, reason in [({"running": True}, "A job is running"), ({"model_issue": "Model x is not downloaded"}, "not downloaded"),
                           ({"structures": []}, "Pick the structure"), ({"supports": []}, "Tick at least one volume on which pancreas"),
                           ({"black_box": False, "method": "lora"}, "needs a black-box method; lora"),
                           ({"queries": []}, "fitted on the query volumes")]:
        readiness = panel.adapt_readiness(**{**ready, **change})
        assert not readiness.ok and reason in readiness.reason, change
    assert not panel.segment_readiness(running=False, volumes=[]).ok
    assert panel.segment_readiness(running=False, volumes=[1], model_issue="not downloaded", adapter="/a").ok
    assert not panel.segment_readiness(running=False, volumes=[1], model_issue="not downloaded").ok
    assert panel.size_prior_allowed(True, False) and not panel.size_prior_allowed(False, False)
    assert not panel.size_prior_allowed(True, True)  # a tuned decoder makes any method white-box


def test_progress_text_and_result_names(tmp_path):
    script = tmp_path / "engine.py"
    script.write_text("import json\nprint(json.dumps({'event': 'epoch', 'epoch': 12, 'epochs': 200, 'loss': 0.23456,"
                      " 'lr': 0.001, 'eta': 130.4, 'message': 'epoch 12/200'}), flush=True)\n")
    job = EngineJob([sys.executable, str(script)])
    job.start()
    job.wait(timeout=30)
    assert job.phase == "training"
    assert panel.progress_text(job).startswith("epoch 12/200 · loss 0.2346 · lr 1.0e-03 · at most 2 min 10 s left")
    assert panel.duration(7) == "7 s" and panel.duration(3725) == "1 h 02 min" and panel.duration(None) == "?"
    assert panel.result_name("CT 1", ["pancreas", "left psoas"], "spatial-adapter") == "CT 1 – pancreas, left psoas (spatial-adapter)"
    assert panel.result_name("CT 1", [], "fseft-mini") == "CT 1 – all structures (fseft-mini)"


def test_dependencies_problem_names_what_is_missing(monkeypatch):
    assert panel.dependencies_problem() == ""
    monkeypatch.setattr(panel, "missing_requirements", lambda: ["monai>=1.6,<2"])
    assert panel.dependencies_problem() == "Needs monai>=1.6,<2: press Adapt or Apply once to install (you will be asked first)."


# ---------------------------------------------------------------- the adapt workflow, for real


@pytest.fixture
def module(mrml_scene, tmp_path, monkeypatch):
    """FSEFTSegment/FSEFTSegment.py imported with stand-ins for what only the application has
    (Qt, the scripted-module base classes, `slicer.app`'s temporary folder)."""

    class Base:
        def __init__(self, parent=None):
            self.parent = parent

    class Test(unittest.TestCase):
        def delayDisplay(self, message):
            print(message)

    monkeypatch.setenv("FSEFT_ADAPTERS", str(tmp_path / "adapters"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", types.SimpleNamespace(
        ScriptedLoadableModule=Base, ScriptedLoadableModuleWidget=Base,
        ScriptedLoadableModuleLogic=Base, ScriptedLoadableModuleTest=Test))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path / "jobs")), raising=False)
    for owner in (panel, jobs):  # inside Slicer the engine runs in PythonSlicer; here, in this interpreter
        monkeypatch.setattr(owner, "python_executable", lambda: sys.executable)
    spec = importlib.util.spec_from_file_location("FSEFTSegment_under_test", ROOT / "FSEFTSegment" / "FSEFTSegment.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_the_self_test_adapts_on_phantoms_end_to_end(module, mrml_scene, tmp_path):
    """The module's own self-test, headless: two annotated phantoms, the bundled model, a real
    `fseft adapt` process; then the query's result, curve, log, adapter table and cleanup."""
    test = module.FSEFTSegmentTest()
    test.runTest()
    logic, outcome = test.logic.panel, test.outcome
    job, result = outcome["job"], outcome["result"]
    print(f"spleen Dice {outcome['dice']:.3f}")
    assert result.GetName() == "phantom 7 – spleen (linear-probe)"
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert result.GetNodeReference(role).GetName() == "phantom 7"

    epochs = logic.curve.points()
    assert 1 <= len(epochs) <= 8 and [x for x, _ in epochs] == list(range(1, len(epochs) + 1))
    assert any(line.startswith("epoch 1/8") for line in logic.log)
    assert logic.log_since(logic.log_count - 2) == logic.log[-2:]
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == []  # the job folder is gone

    adapter = Path(logic.parameters.adapter)
    assert adapter == job.adapter and adapter.parent == tmp_path / "adapters"
    rows = panel.adapter_rows(tmp_path / "adapters")
    assert len(rows) == 1 and rows[0]["path"] == str(adapter)
    structures, method, k, base, created, size, quality = rows[0]["cells"]
    assert (method, k, base) == ("linear-probe", "2", "fseft-mini") and "Spleen" in structures
    assert quality.startswith("Dice 0.") and "loss 0." in quality

    # Predict: the adapter segments another loaded volume, under its own name
    other, _ = scene.add_phantom_volume(mrml_scene, seed=8, name="phantom 8")
    logic.parameters.set_volumes("segment", [other])
    logic.start_segment(adapter)
    logic.wait(timeout=300)
    assert logic.record.job.state is JobState.COMPLETED, logic.record.job.message
    assert [r["name"] for r in logic.results] == ["phantom 8 – Spleen (linear-probe)"]


def test_a_second_job_is_refused_and_cancel_leaves_nothing(logic, mrml_scene, tmp_path):
    volumes = [phantom_workflow.annotate_phantom(mrml_scene, seed, "liver")[0] for seed in (3, 4)]
    p = logic.parameters
    p.structures, p.method, p.maxEpochs, p.device = ["liver"], "spatial-adapter", 200, "cpu"
    p.set_volumes("support", volumes[:1])
    p.set_volumes("query", volumes[1:])
    segmentations = mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job = logic.start_adapt()
    with pytest.raises(InputError, match=r"A job is already running \(adapt\): wait for it to finish or press Cancel"):
        logic.start_segment()
    deadline = time.monotonic() + 300
    while job.epoch is None and not job.state.finished and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.1)
    assert job.epoch is not None, logic.log[-10:]
    logic.cancel()
    logic.wait(timeout=60)
    assert job.state is JobState.CANCELLED
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations  # nothing imported
    assert not (tmp_path / "adapters").exists() or list((tmp_path / "adapters").iterdir()) == []
    assert list((tmp_path / "jobs").iterdir()) == []


def test_a_failing_engine_is_reported_with_its_message_and_the_scene_untouched(logic, mrml_scene):
    volume, _ = phantom_workflow.annotate_phantom(mrml_scene, 3, "liver")
    p = logic.parameters
    p.model, p.structures = "no-such-model", ["liver"]
    p.set_volumes("support", [volume])
    nodes = mrml_scene.GetNumberOfNodes()
    job = logic.start_adapt()
    logic.wait(timeout=120)
    assert job.state is JobState.FAILED and "no-such-model" in job.message
    assert any("no-such-model" in line for line in logic.log)
    assert mrml_scene.GetNumberOfNodes() == nodes + 3  # the loss curve's table, series and chart only


def test_bad_supports_are_refused_before_any_process_starts(logic, mrml_scene, tmp_path):
    a, b = add_volume(mrml_scene, "A", value=40), add_volume(mrml_scene, "B", value=40)
    annotate(mrml_scene, a, {"pancreas": box()})
    drawn_on_a = annotate(mrml_scene, a, {"psoas": box()})
    p = logic.parameters
    p.structures = ["pancreas"]
    p.set_volumes("support", [a, b])
    with pytest.raises(InputError, match="volume 'B' has no segmentation"):
        logic.start_adapt()
    p.structures = ["pancreas", "liver"]
    p.set_volumes("support", [a])
    with pytest.raises(InputError, match="liver"):
        logic.start_adapt()
    assert logic.record is None and list((tmp_path / "jobs").iterdir()) == []
    assert drawn_on_a.GetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) == a.GetID()


def test_a_non_ct_query_is_warned_about(logic, mrml_scene):
    volume, _ = phantom_workflow.annotate_phantom(mrml_scene, 3, "liver")
    mr_like = add_volume(mrml_scene, "MR T1", shape=(20, 20, 20), value=0)
    slicer.util.updateVolumeFromArray(mr_like, np.random.default_rng(0).integers(0, 1200, (20, 20, 20)).astype(np.int16))
    p = logic.parameters
    p.structures, p.maxEpochs = ["liver"], 1
    p.set_volumes("support", [volume])
    p.set_volumes("query", [mr_like])
    logic.start_adapt()
    logic.cancel()
    logic.wait(timeout=60)
    assert any(line.startswith("warning: MR T1:") for line in logic.log)


# ---------------------------------------------------------------- models and adapters as jobs


def test_download_runs_as_a_cancellable_job_and_refreshes_the_model_list(logic, tmp_path, monkeypatch):
    from loopback import Server
    from synthetic import tiny_checkpoint

    weights = tiny_checkpoint(tmp_path / "tiny.pt").read_bytes()
    server = Server({"tiny.pt": weights})
    try:
        registry = tmp_path / "models.json"
        registry.write_text(json.dumps({"models": [{
            "name": "remote", "description": "served on loopback",
            "architecture": {"feature_size": 12, "out_channels": 29, "patch_size": 64, "spacing_mm": 4.5},
            "files": [{"url": server.url("/files/tiny.pt"), "filename": "tiny.pt", "sha256": None, "size": len(weights)}]}]}))
        monkeypatch.setenv("FSEFT_REGISTRY", str(registry))
        assert [r["status"] for r in logic.queries.wait("models", "list", timeout=120)] == ["not downloaded"]
        job = logic.start_download("remote")
        logic.wait(timeout=120)
        assert job.state is JobState.COMPLETED, (job.message, logic.log[-10:])
        assert job.fraction == 1.0 and "remote" in job.message
        assert [r["status"] for r in logic.queries.wait("models", "list", timeout=120)] == ["available"]  # refetched
    finally:
        server.close()


def test_an_adapter_zip_is_imported_through_the_engine_and_a_foreign_one_refused(logic, tmp_path):
    bad = tmp_path / "not-an-adapter.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    job = logic.start_adapter_import(bad)
    logic.wait(timeout=60)
    assert job.state is JobState.FAILED and "not-an-adapter.zip" in job.message
    assert not (tmp_path / "adapters").exists() or list((tmp_path / "adapters").iterdir()) == []
