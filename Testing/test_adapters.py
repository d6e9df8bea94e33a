"""Adapter artefacts (save, strict load, base-model check) and prediction with several adapters."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import SimpleITK as sitk
import slicerio
import torch
from safetensors.torch import load_file, save_file

from FSEFTSegmentLib import adapters as adapters_module
from FSEFTSegmentLib.adapters import (
    METADATA_FILE,
    TENSORS_FILE,
    adapter_structures,
    load_adapter,
    load_adapters,
    recorded_base_model,
    save_adapter,
    structure_info,
)
from FSEFTSegmentLib.errors import InputError, ModelError
from FSEFTSegmentLib.inference import Head, InferenceSettings, SegmentationPredictor, window_count, windows_per_batch
from FSEFTSegmentLib.io.studies import Study
from FSEFTSegmentLib.labels import novel_structure, resolve_structure
from FSEFTSegmentLib.methods import METHODS, get_method
from FSEFTSegmentLib.methods.adapted import AdaptedModel
from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR, head_rows
from FSEFTSegmentLib.model.registry import sha256_file
from FSEFTSegmentLib.prediction import plan_outputs, predict_studies
from FSEFTSegmentLib.progress import Progress

from conftest import TINY_ARCHITECTURE, fseft
from synthetic import body_phantom

# Feature size 12, one block per stage, 64^3 windows at 4.5 mm: a phantom is one window.
ARCHITECTURE = Architecture(feature_size=12, out_channels=29, depths=(1, 1, 1, 1), patch_size=64, spacing_mm=4.5)
BASE_SHA = "ab" * 32
BASE = {"name": "tiny-test", "sha256": BASE_SHA, "architecture": ARCHITECTURE.to_dict()}


@pytest.fixture(scope="module")
def pristine() -> FoundationSwinUNETR:
    torch.manual_seed(0)
    return FoundationSwinUNETR(ARCHITECTURE).eval()


def perturbed(network: FoundationSwinUNETR, method: str, structures, tune_decoder=False, seed=1, positive: int | None = None) -> AdaptedModel:
    """An adapted model whose every trainable tensor is moved away from its initial value (LoRA's and
    the adapters' zero-initialised halves included), as training would; `positive` forces a head
    channel's logits up so its mask is not empty."""
    rows = [s.index if s.index >= 0 else None for s in structures]
    model = AdaptedModel(network, get_method(method), rows, tune_decoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        if positive is not None:
            model.head[-1].bias[positive] = 30.0
    return model.eval()


def metadata_for(model: AdaptedModel, structures, expected=None, base=BASE) -> dict:
    return {
        "base_model": base,
        "hyper_parameters": {"learning_rate": model.method.learning_rate},
        "structures": [structure_info(s, s.index if s.index >= 0 else None) for s in structures],
        "k": 1,
        "supports": [{"id": "s1", "image": "s1.nii.gz", "image_sha256": "0" * 64, "labels": "s1-labels.nii.gz", "labels_sha256": "1" * 64}],
        "seed": 0,
        "size_prior": None,
        "expected_volumes_ml": expected,
        "training_curve": [{"epoch": 1, "loss": 0.5}],
    }


def tensor_input(seed=0) -> torch.Tensor:
    return torch.rand((1, 1, 64, 64, 64), generator=torch.Generator().manual_seed(seed))


def outputs(model: AdaptedModel, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("method, tune_decoder", [(name, False) for name in METHODS] + [("linear-probe", True)])
def test_round_trip_is_exact(pristine, tmp_path, method, tune_decoder):
    structures = [resolve_structure("liver"), novel_structure("Left renal cyst", (10, 20, 30))]
    model = perturbed(copy.deepcopy(pristine), method, structures, tune_decoder)
    forward = method in ("lora", "spatial-adapter")  # a forward pass costs seconds: run it for an injected and a head method
    x = tensor_input()
    before = outputs(model, x) if forward else None
    folder = save_adapter(tmp_path / "adapter", model, metadata_for(model, structures))

    assert sorted(p.name for p in folder.iterdir()) == sorted([TENSORS_FILE, METADATA_FILE])
    stored = load_file(str(folder / TENSORS_FILE))
    state = model.trainable_state()
    assert stored.keys() == state.keys()
    assert all(torch.equal(stored[k], state[k]) for k in state)

    loaded, metadata = load_adapter(folder, copy.deepcopy(pristine), BASE_SHA)
    assert not loaded.training
    assert all(torch.equal(loaded.trainable_state()[k], state[k]) for k in state)
    original, restored = model.state_dict(), loaded.state_dict()  # every tensor the output depends on
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    if forward:
        assert torch.equal(outputs(loaded, x), before)
    assert metadata["format"] == 1 and metadata["method"] == method and metadata["tune_decoder"] is tune_decoder
    assert metadata["base_model"] == json.loads(json.dumps(BASE)) and metadata["k"] == 1 and metadata["seed"] == 0
    assert metadata["trainable_parameters"] == model.trainable_count()
    assert set(metadata["versions"]) == {"fseft", "torch", "monai", "python"} and metadata["created"]
    assert metadata["structures"][1] == {
        "name": "left_renal_cyst", "display_name": "Left renal cyst", "color": [10, 20, 30],
        "terminology": structures[1].slicerio_terminology(), "pretrained_row": None,
    }
    assert adapter_structures(metadata) == structures
    assert loaded.backbone_frozen == (get_method(method).black_box and not tune_decoder)


def test_black_box_adapters_are_kilobytes(pristine, tmp_path):
    model = perturbed(copy.deepcopy(pristine), "linear-probe", [resolve_structure("spleen")])
    folder = save_adapter(tmp_path / "probe", model, metadata_for(model, [resolve_structure("spleen")]))
    assert (folder / TENSORS_FILE).stat().st_size < 2048


@pytest.fixture
def saved(pristine, tmp_path):
    structures = [resolve_structure("spleen")]
    model = perturbed(copy.deepcopy(pristine), "lora", structures)
    return save_adapter(tmp_path / "lora", model, metadata_for(model, structures))


def test_other_base_model_is_refused(pristine, saved):
    with pytest.raises(ModelError) as error:
        load_adapter(saved, copy.deepcopy(pristine), "cd" * 32)
    message = str(error.value)
    assert "\n" not in message
    assert f"adapter {saved} was trained on base model tiny-test (sha256 abababababab" in message and "cdcdcdcdcdcd" in message


def test_missing_and_corrupt_metadata(pristine, saved, tmp_path):
    network = copy.deepcopy(pristine)
    metadata_path = saved / METADATA_FILE
    good = metadata_path.read_text(encoding="utf-8")

    metadata_path.write_text(good[: len(good) // 2], encoding="utf-8")
    with pytest.raises(InputError, match=f"{metadata_path}: unreadable adapter metadata"):
        load_adapter(saved, network, BASE_SHA)
    for change, fragment in (({"format": 7}, "unknown adapter format 7"), ({"method": "prompt-tuning"}, "unknown method 'prompt-tuning'")):
        metadata_path.write_text(json.dumps({**json.loads(good), **change}), encoding="utf-8")
        with pytest.raises(InputError, match=fragment) as error:
            load_adapter(saved, network, BASE_SHA)
        assert str(metadata_path) in str(error.value)
    metadata_path.unlink()
    with pytest.raises(InputError, match=f"{saved}: not an adapter folder: adapter.json is missing"):
        load_adapter(saved, network, BASE_SHA)
    with pytest.raises(InputError, match="no such adapter folder"):
        load_adapter(tmp_path / "nowhere", network, BASE_SHA)


def _rewrite_tensors(folder: Path, tensors: dict) -> None:
    """Replace the tensors and record their hash, as a consistent but wrong adapter would be."""
    save_file(tensors, str(folder / TENSORS_FILE))
    metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    metadata["tensors_sha256"] = sha256_file(folder / TENSORS_FILE)
    (folder / METADATA_FILE).write_text(json.dumps(metadata), encoding="utf-8")


def test_tampered_tensors_are_refused(pristine, saved):
    original = load_file(str(saved / TENSORS_FILE))
    lora_key = next(k for k in original if ".lora_b." in k)

    (saved / TENSORS_FILE).write_bytes((saved / TENSORS_FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(InputError, match="does not match the sha256 recorded"):
        load_adapter(saved, copy.deepcopy(pristine), BASE_SHA)

    cases = [
        ({**original, "network.decoder1.extra": torch.zeros(3)}, "1 unexpected: network.decoder1.extra"),
        ({k: v for k, v in original.items() if k != lora_key}, f"1 missing: {lora_key}"),
        ({**original, lora_key: torch.zeros(5, 5)}, f"1 mis-shaped: {lora_key}"),
        ({**original, lora_key: original[lora_key].to(torch.int32)}, f"1 not floating point: {lora_key}"),
    ]
    for tensors, fragment in cases:
        _rewrite_tensors(saved, tensors)
        with pytest.raises(InputError, match="tensors do not fit a lora adapter") as error:
            load_adapter(saved, copy.deepcopy(pristine), BASE_SHA)
        assert fragment in str(error.value)


def test_failed_save_leaves_nothing(pristine, tmp_path, monkeypatch):
    structures = [resolve_structure("spleen")]
    model = perturbed(copy.deepcopy(pristine), "spatial-adapter", structures)
    metadata = metadata_for(model, structures)

    def broken(path):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(adapters_module, "sha256_file", broken)  # fails after the tensors are written
        with pytest.raises(OSError, match="disk full"):
            save_adapter(tmp_path / "new", model, metadata)
    assert list(tmp_path.iterdir()) == []

    folder = save_adapter(tmp_path / "kept", model, metadata)
    before = (folder / TENSORS_FILE).read_bytes()
    other = perturbed(copy.deepcopy(pristine), "spatial-adapter", structures, seed=7)
    with monkeypatch.context() as patch:
        patch.setattr(adapters_module, "sha256_file", broken)
        with pytest.raises(OSError):
            save_adapter(folder, other, metadata)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert (folder / TENSORS_FILE).read_bytes() == before
    load_adapter(folder, copy.deepcopy(pristine), BASE_SHA)


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "rename-aside"])
def test_replacing_an_adapter(pristine, tmp_path, monkeypatch, exchange):
    swaps = []
    real_swap = adapters_module._swap
    monkeypatch.setattr(adapters_module, "_swap", lambda a, b: swaps.append(real_swap(a, b) if exchange else False) or swaps[-1])
    structures = [resolve_structure("spleen")]
    first = perturbed(copy.deepcopy(pristine), "linear-probe", structures, seed=1)
    second = perturbed(copy.deepcopy(pristine), "linear-probe", structures, seed=2)
    folder = save_adapter(tmp_path / "probe", first, metadata_for(first, structures))
    save_adapter(folder, second, metadata_for(second, structures))
    assert len(swaps) == 1  # (the exchange itself may be unsupported by the file system: then the fallback ran)
    assert [p.name for p in tmp_path.iterdir()] == ["probe"]
    loaded, _ = load_adapter(folder, copy.deepcopy(pristine), BASE_SHA)
    assert all(torch.equal(loaded.trainable_state()[k], v) for k, v in second.trainable_state().items())


def test_refuses_to_overwrite_other_things(pristine, tmp_path):
    structures = [resolve_structure("spleen")]
    model = perturbed(copy.deepcopy(pristine), "linear-probe", structures)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ct.nii.gz").write_bytes(b"precious")
    (tmp_path / "file").write_text("x", encoding="utf-8")
    for target in (tmp_path / "data", tmp_path / "file"):
        with pytest.raises(InputError, match="is not an adapter folder"):
            save_adapter(target, model, metadata_for(model, structures))
    assert (tmp_path / "data" / "ct.nii.gz").read_bytes() == b"precious"
    (tmp_path / "empty").mkdir()
    save_adapter(tmp_path / "empty", model, metadata_for(model, structures))  # an empty folder is fine


def test_adapters_must_share_their_base(pristine, tmp_path):
    structures = [resolve_structure("spleen")]
    model = perturbed(copy.deepcopy(pristine), "linear-probe", structures)
    a = save_adapter(tmp_path / "a", model, metadata_for(model, structures))
    b = save_adapter(tmp_path / "b", model, metadata_for(model, structures, base={**BASE, "name": "other", "sha256": "ef" * 32}))
    assert recorded_base_model([a, a])["name"] == "tiny-test"
    with pytest.raises(InputError, match="different base models"):
        recorded_base_model([a, b])


# ---------------------------------------------------------------- prediction with several adapters


class Recorder(Progress):
    def __init__(self):
        super().__init__()
        self.events = []

    def emit(self, event, **fields):
        self.events.append({"event": event, **fields})


def count_passes(network: FoundationSwinUNETR) -> list[int]:
    """Counts `features` passes of a real network: its last decoder stage runs once per pass."""
    calls = [0]
    network.decoder1.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture
def three_adapters(pristine, tmp_path):
    """A linear probe (liver + a novel structure), a spatial adapter (spleen) and a LoRA (a novel lesion), saved."""
    specs = [
        ("probe", "linear-probe", [resolve_structure("liver"), novel_structure("Renal graft")]),
        ("spatial", "spatial-adapter", [resolve_structure("spleen")]),
        ("lora", "lora", [novel_structure("Lesion X")]),
    ]
    folders = []
    for seed, (name, method, structures) in enumerate(specs, 1):
        model = perturbed(copy.deepcopy(pristine), method, structures, seed=seed, positive=0)
        folders.append(save_adapter(tmp_path / name, model, metadata_for(model, structures)))
    return folders


@pytest.fixture
def study(tmp_path):
    image, _ = body_phantom()
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return Study("ct", path)


def run(network, loaded, names, study, out, expected_override=None):
    heads, structures, expected = plan_outputs(network, loaded, names, "tiny-test")
    progress = Recorder()
    predictor = SegmentationPredictor(network, torch.device("cpu"), InferenceSettings(), progress)
    result = predict_studies(predictor, heads, structures, [study], out, ("seg.nrrd",), progress,
                             expected if expected_override is None else expected_override)
    assert not result.failures, result.failures
    return structures, progress.events, result


def segments(path: Path) -> dict:
    segmentation = slicerio.read_segmentation(str(path))
    voxels = segmentation["voxels"]
    layers = voxels[None] if voxels.ndim == 3 else voxels
    found = {}
    for segment in segmentation["segments"]:
        found[segment["id"]] = (layers[segment.get("layer", 0)] == segment["labelValue"], segment.get("tags", {}))
    return found


def test_several_adapters_in_one_run_equal_each_alone(pristine, three_adapters, study, tmp_path):
    network = copy.deepcopy(pristine)
    loaded = load_adapters(three_adapters, network, BASE_SHA)
    lora = loaded[2][0]
    assert loaded[0][0].network is network and loaded[1][0].network is network and lora.network is not network
    base_passes, lora_passes = count_passes(network), count_passes(lora.network)  # after the copy: hooks are copied too

    names = ["Lesion X", "liver", "aorta", "spleen", "renal graft"]  # interleaves adapters and a base-model class
    structures, events, _ = run(network, loaded, names, study, tmp_path / "together")
    assert [s.name for s in structures] == ["lesion_x", "liver", "aorta", "spleen", "renal_graft"]
    predictor = SegmentationPredictor(network, torch.device("cpu"), InferenceSettings())
    volume = predictor.preprocessing(sitk.ReadImage(str(study.path)))
    batches = math.ceil(window_count(volume.shape[1:], ARCHITECTURE.patch_size, 0.25) / windows_per_batch(torch.device("cpu"), ARCHITECTURE))
    # one base-network pass per window batch for the probe, the spatial adapter and the base row together
    assert base_passes[0] == batches and lora_passes[0] == batches
    together = segments(tmp_path / "together" / "ct.seg.nrrd")
    assert list(together) == ["lesion_x", "liver", "aorta", "spleen", "renal_graft"]
    assert together["liver"][0].any() and together["lesion_x"][0].any()  # forced positive: masks are not trivially empty

    # the same logits, bit for bit, as each adapter applied alone on a fresh network (the probe's run
    # also gives the base row: both read the base network)
    heads, _, _ = plan_outputs(network, loaded, names, "tiny-test")
    combined = predictor.logits(volume, heads)
    alone = {}
    for folder, selection in zip(three_adapters, (["liver", "renal graft", "aorta"], None, None)):
        fresh = copy.deepcopy(pristine)
        single = load_adapters([folder], fresh, BASE_SHA)
        single_heads, single_structures, _ = plan_outputs(fresh, single, selection, "tiny-test")
        logits = SegmentationPredictor(fresh, torch.device("cpu"), InferenceSettings()).logits(volume, single_heads)
        alone.update({s.name: logits[c] for c, s in enumerate(single_structures)})
    assert combined.shape[0] == len(structures)
    for channel, structure in enumerate(structures):
        assert torch.equal(combined[channel], alone[structure.name]), structure.name


def test_softmax_adapter_round_trip_and_argmax_prediction(pristine, tmp_path, study):
    """The paper's multi-class head: a background row first, recorded in the adapter, rebuilt on
    load; prediction takes the argmax over background and structures, so masks never overlap,
    and a sigmoid head beside it keeps its own independent output."""
    structures = [resolve_structure("liver"), resolve_structure("spleen")]
    rows = [s.index for s in structures]
    model = AdaptedModel(copy.deepcopy(pristine), get_method("linear-probe"), rows, softmax=True)
    assert model.head[-1].out_channels == 3 and model.structure_count == 2 and float(model.head[-1].bias[0]) == 0.0
    assert torch.equal(model.head[-1].weight[1:], pristine.classifier.weight[rows])  # zero-shot rows after the background
    with torch.no_grad():
        model.head[-1].bias[1] = 2.0  # liver wins over background somewhere, so masks are not empty
    folder = save_adapter(tmp_path / "softmax", model, metadata_for(model, structures))
    loaded, metadata = load_adapter(folder, pristine, BASE_SHA)
    assert metadata["head"] == "softmax" and loaded.softmax and loaded.structure_count == 2

    predictor = SegmentationPredictor(pristine, torch.device("cpu"), InferenceSettings())
    volume = predictor.preprocessing(sitk.ReadImage(str(study.path)))
    heads = [Head.of(loaded, (1,)), Head(head_rows(pristine.classifier, [5])), Head.of(loaded, (0,))]
    logits = predictor.logits(volume, heads)
    assert logits.shape[0] == 3 + 1  # the softmax module's 3 outputs once, then the sigmoid row
    maps = predictor.maps(logits, heads)
    winner = logits[:3].argmax(0)
    assert torch.equal(maps[0], (winner == 2).float()) and torch.equal(maps[2], (winner == 1).float())
    assert torch.equal(maps[1], torch.sigmoid(logits[3]))
    assert maps[2].any() and not (maps[0].bool() & maps[2].bool()).any()
    masks = predictor.segment(sitk.ReadImage(str(study.path)), heads)
    assert masks[2].any() and not (masks[0] & masks[2]).any()


def test_structure_selection_errors(pristine, three_adapters):
    network = copy.deepcopy(pristine)
    loaded = load_adapters(three_adapters, network, BASE_SHA)
    with pytest.raises(InputError, match="no output for 'pancreaz' \\(did you mean 'pancreas'\\?\\)"):
        plan_outputs(network, loaded, ["pancreaz"], "tiny-test")
    with pytest.raises(InputError, match="asked for twice"):
        plan_outputs(network, loaded, ["liver", "Liver"], "tiny-test")
    twin = load_adapters([three_adapters[0], three_adapters[0]], copy.deepcopy(pristine), BASE_SHA)
    with pytest.raises(InputError, match="asked for twice"):
        plan_outputs(network, twin, None, "tiny-test")


def _quality_flag():
    priors = pytest.importorskip("FSEFTSegmentLib.priors", reason="priors.py (quality_flag) not written yet")
    return priors.quality_flag


def test_quality_flag_in_tags_events_and_sidecar(pristine, three_adapters, study, tmp_path):
    quality_flag = _quality_flag()
    network = copy.deepcopy(pristine)
    loaded = load_adapters(three_adapters[:2], network, BASE_SHA)
    _, events, _ = run(network, loaded, None, study, tmp_path / "plain")
    assert not (tmp_path / "plain" / "ct.fseft.json").exists()  # no expected volumes: no check
    volumes = next(e for e in events if e["event"] == "study_done")["volumes_ml"]
    liver, spleen = volumes["liver"], volumes["spleen"]
    assert liver > 0 and spleen > 0
    expected = {"liver": (liver * 0.8, liver * 1.25), "spleen": (spleen * 20, spleen * 40)}
    assert quality_flag(liver, expected["liver"]) is None and quality_flag(spleen, expected["spleen"])

    structures, events, result = run(network, loaded, None, study, tmp_path / "checked", expected)
    found = segments(tmp_path / "checked" / "ct.seg.nrrd")
    assert "FSEFT.QualityFlag" not in found["liver"][1] and "FSEFT.QualityFlag" not in found["renal_graft"][1]
    spleen_tags = found["spleen"][1]
    assert spleen_tags["FSEFT.QualityFlag"].isascii() and "mL" in spleen_tags["FSEFT.QualityFlag"]  # NRRD headers are ASCII
    assert float(spleen_tags["FSEFT.VolumeML"]) == pytest.approx(spleen, rel=1e-3)
    low, high = (float(v) for v in spleen_tags["FSEFT.ExpectedVolumeML"].split("-"))
    assert (low, high) == pytest.approx(expected["spleen"], rel=1e-3)

    done = next(e for e in events if e["event"] == "study_done")
    assert set(done["quality"]) == {"liver", "spleen"}
    assert done["quality"]["liver"]["flag"] is None and done["quality"]["spleen"]["flag"]
    assert done["quality"]["spleen"]["expected_ml"] == list(expected["spleen"])
    assert "quality flag: Spleen" in done["message"]
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["structure"] == "spleen" and "Spleen" in warnings[0]["message"]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["flagged"] == {"ct": ["spleen"]} and "quality flag" in summary["message"]
    assert result.flagged == {"ct": ["spleen"]}
    sidecar = json.loads((tmp_path / "checked" / "ct.fseft.json").read_text(encoding="utf-8"))
    assert sidecar["quality"] == json.loads(json.dumps(done["quality"]))
    assert sidecar["volumes_ml"] == done["volumes_ml"] and set(sidecar["volumes_ml"]) == {"liver", "renal_graft", "spleen"}


# ---------------------------------------------------------------- the command line


def test_cli_predict_with_an_adapter(environment, tmp_path):
    from FSEFTSegmentLib.model.checkpoint import build_from_checkpoint

    env = environment
    checkpoint = Path(env["FSEFT_CACHE"]) / "models" / "tiny-test" / "tiny.pt"
    network = build_from_checkpoint(checkpoint, defaults=Architecture.from_dict(TINY_ARCHITECTURE))
    structures = [resolve_structure("liver"), novel_structure("Renal graft")]
    model = perturbed(network, "spatial-adapter", structures, positive=0)
    base = {"name": "tiny-test", "sha256": sha256_file(checkpoint), "architecture": network.architecture.to_dict()}
    adapter = save_adapter(tmp_path / "adapter", model, metadata_for(model, structures, {"liver": [1e5, 2e5]}, base=base))
    image, _ = body_phantom()
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))

    out = tmp_path / "out"
    result = fseft(["predict", "--adapter", str(adapter), "--model", "tiny-test", "--out", str(out), "--progress", "json", str(tmp_path / "ct.nii.gz")], env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    done = next(e for e in events if e["event"] == "study_done")
    assert list(done["voxels"]) == ["liver", "renal_graft"]
    found = segments(out / "ct.seg.nrrd")
    assert list(found) == ["liver", "renal_graft"]
    if (Path(__file__).resolve().parents[1] / "FSEFTSegmentLib" / "priors.py").exists():
        assert done["quality"]["liver"]["flag"] and found["liver"][1]["FSEFT.QualityFlag"]
        assert any(e["event"] == "warning" and e.get("structure") == "liver" for e in events)
        assert events[-1]["flagged"] == {"ct": ["liver"]}
        assert sorted(p.name for p in out.iterdir()) == ["ct.fseft.json", "ct.seg.nrrd"]

    # without --model the adapter's base model is used, and a mismatched base is refused in one line
    other = save_adapter(tmp_path / "other", model, metadata_for(model, structures, base={**base, "sha256": "0" * 64}))
    result = fseft(["predict", "--adapter", str(other), "--out", str(tmp_path / "out2"), str(tmp_path / "ct.nii.gz")], env)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fseft: error:")]
    assert len(errors) == 1 and "trained on base model tiny-test" in errors[0], result.stderr
    assert not (tmp_path / "out2").exists()
