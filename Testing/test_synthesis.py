"""Label-to-image synthesis and the synthetic-data pretraining path: determinism, labels, HU
ranges, the BTCV mirror fix, class-balanced crops, Dice + cross-entropy, and export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import SHARED_DATA

from FSEFTSegmentLib.errors import InputError
from FSEFTSegmentLib.model import load_foundation_model
from FSEFTSegmentLib.pretraining.config import PretrainConfig
from FSEFTSegmentLib.pretraining.loop import export_model, pretrain
from FSEFTSegmentLib.pretraining.loss import partial_label_dice_loss
from FSEFTSegmentLib.pretraining.phantoms import make_phantom
from FSEFTSegmentLib.pretraining.synthesis import mirror_left_right, synthesize_ct
from FSEFTSegmentLib.pretraining.volume_cache import ClassBalancedSampler
from FSEFTSegmentLib.progress import Progress

LIVER, SPLEEN, AORTA, STOMACH = 6, 1, 8, 7


@pytest.fixture(scope="module")
def label_map() -> sitk.Image:
    """Anatomy to synthesise from: a phantom's label map (universal ids), no shared data needed."""
    return make_phantom(3, size=(72, 64, 60), spacing=(4.0, 4.0, 4.0))[1]


def _arrays(image: sitk.Image, labels: sitk.Image):
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)


def test_same_seed_same_volume_other_seed_other_volume(label_map):
    first = _arrays(*synthesize_ct(label_map, 11))
    again = _arrays(*synthesize_ct(label_map, 11))
    other = _arrays(*synthesize_ct(label_map, 12))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_and_geometry_follow_the_anatomy(label_map, seed):
    image, labels = synthesize_ct(label_map, seed)
    array, ids = _arrays(image, labels)
    assert image.GetSize() == labels.GetSize() and image.GetOrigin() == labels.GetOrigin()
    assert image.GetSpacing() == labels.GetSpacing() and image.GetDirection() == labels.GetDirection()
    assert array.dtype == np.float32 and ids.dtype == np.uint8
    in_plane, _, through = image.GetSpacing()
    assert 2.0 <= in_plane <= 4.0 and 2.0 <= through <= 5.0
    source = set(np.unique(sitk.GetArrayViewFromImage(label_map)).tolist())
    present = set(np.unique(ids).tolist())
    assert present <= source and {0, LIVER, SPLEEN, AORTA} <= present
    # the liver stays roughly the size it was (+-25 % per axis at most, so within 0.4-2x in volume)
    source_ml = (sitk.GetArrayViewFromImage(label_map) == LIVER).sum() * np.prod(label_map.GetSpacing()) / 1000
    liver_ml = (ids == LIVER).sum() * np.prod(image.GetSpacing()) / 1000
    assert 0.4 < liver_ml / source_ml < 2.0


@pytest.mark.parametrize("contrast", ["native", "portal"])
def test_hounsfield_values_are_ct_like(label_map, contrast):
    image, labels = synthesize_ct(label_map, 5, contrast=contrast)
    array, ids = _arrays(image, labels)
    assert array.min() >= -1024.0
    corners = array[[0, 0, -1, -1], [0, -1, 0, -1], [0, -1, -1, 0]]
    assert np.all(corners < -900)  # air around the body
    liver = np.median(array[ids == LIVER])
    assert (30 < liver < 95) if contrast == "native" else (75 < liver < 150)
    body = (array > -500) & (ids == 0)
    assert np.mean(array[body] < -50) > 0.05  # fat in the body context
    assert np.mean(array[body] > 150) > 0.002  # bone (spine, ribs) in the context, unlabelled


def test_arterial_phase_makes_the_aorta_bright(label_map):
    image, labels = synthesize_ct(label_map, 4, contrast="arterial")
    array, ids = _arrays(image, labels)
    assert np.median(array[ids == AORTA]) > 180


def test_a_map_that_labels_the_bladder_gets_no_second_unlabelled_one():
    """The body context's fake bladder (unlabelled fluid low in the pelvis) is painted only for maps
    without a bladder; drawing it anyway leaves the rest of the volume as it was."""
    from FSEFTSegmentLib.pretraining.anatomy import TISSUE_HU, Canvas
    from FSEFTSegmentLib.pretraining.synthesis import _pelvis

    axis = np.arange(-100.0, 101.0, 5.0, dtype=np.float32)
    depth = np.arange(-250.0, 1.0, 5.0, dtype=np.float32)
    painted = {}
    for labelled in (False, True):
        canvas = Canvas(axis, axis, depth)
        canvas.hu[:] = TISSUE_HU["visceral_fat"][0]
        rng = np.random.default_rng(0)  # its second draw (0.27 < 0.6) paints the fake bladder
        _pelvis(canvas, rng, {"cortical_bone": 1000.0}, np.ones(canvas.hu.shape, bool), labelled_bladder=labelled)
        painted[labelled] = (canvas.hu, rng.random())
    urine = (painted[False][0] >= 0) & (painted[False][0] <= 20)
    assert urine.sum() > 100 and not ((painted[True][0] >= 0) & (painted[True][0] <= 20)).any()
    assert np.array_equal(painted[True][0][~urine], painted[False][0][~urine]) and painted[True][1] == painted[False][1]


def test_mirror_left_right_negates_the_first_direction_column(label_map):
    mirrored = mirror_left_right(label_map)
    assert np.array_equal(sitk.GetArrayViewFromImage(mirrored), sitk.GetArrayViewFromImage(label_map))
    assert mirrored.GetDirection()[0] == -label_map.GetDirection()[0]
    assert mirrored.GetDirection()[4] == label_map.GetDirection()[4]


def _centroid_x(labels: sitk.Image, value: int) -> float:
    index = np.argwhere(sitk.GetArrayViewFromImage(labels) == value).mean(0)[::-1]
    return labels.TransformContinuousIndexToPhysicalPoint(index.tolist())[0]


def test_btcv_maps_are_mirrored_and_the_fix_puts_the_liver_on_the_right():
    path = SHARED_DATA / "label-maps" / "btcv-abdct" / "0001.nii.gz"
    if not path.is_file():
        pytest.skip(f"shared label maps not found ({path})")
    raw = sitk.ReadImage(str(path))
    # LPS: the patient's left has larger x. Raw BTCV headers put the spleen (left) at smaller x.
    assert _centroid_x(raw, SPLEEN) < _centroid_x(raw, LIVER)
    fixed = mirror_left_right(raw)
    assert _centroid_x(fixed, SPLEEN) > _centroid_x(fixed, LIVER)


def test_class_balanced_crops_reach_a_small_structure_as_often_as_a_large_one():
    label = torch.zeros(1, 80, 80, 80, dtype=torch.uint8)
    label[0, 10:60, 10:60, 10:60] = 6  # large
    label[0, 70:73, 70:73, 70:73] = 1  # 27 voxels
    sampler = ClassBalancedSampler(label)
    generator = torch.Generator().manual_seed(0)
    starts = sampler.sample(16, 400, 1.0, generator)
    small = sum(1 for start in starts if label[0, start[0]:start[0] + 16, start[1]:start[1] + 16, start[2]:start[2] + 16].eq(1).any())
    assert 0.35 < small / len(starts) < 0.65


def test_cross_entropy_term_keeps_unannotated_classes_gradient_free():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, 5, requires_grad=True)
    target = (torch.rand(2, 3, 5, 5, 5) > 0.5).float()
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    loss = partial_label_dice_loss(logits, target, annotated, bce_weight=0.5)
    loss.backward()
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[1, 0] == 0)
    dice_only = partial_label_dice_loss(logits.detach(), target, annotated)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach(), target, reduction="none").mean((2, 3, 4))
    expected = dice_only + 0.5 * bce[annotated].mean()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-6)


def _synthetic_config(tmp_path, label_map, **overrides):
    folder = tmp_path / "maps"
    folder.mkdir(exist_ok=True)
    for n in range(2):
        sitk.WriteImage(make_phantom(20 + n, size=(56, 56, 48), spacing=(5.0, 5.0, 5.0))[1], str(folder / f"map{n}.nii.gz"))
    values = {
        "datasets": [{"name": "maps", "labels": "maps/*.nii.gz", "synthesize": 3, "mirror_left_right": False,
                      "label_template": {1: 1, 6: 2}, "weight": 2.0}],
        "architecture": {"feature_size": 12, "out_channels": 2, "patch_size": 64, "depths": [1, 1, 1, 1], "spacing_mm": 5.0},
        "volumes_per_step": 1, "crops_per_volume": 1, "steps": 2, "warmup_epochs": 1, "steps_per_epoch": 1,
        "class_balanced": True, "bce_weight": 1.0, "out": "run",
    }
    values.update(overrides)
    path = tmp_path / "synthetic.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def test_synthetic_dataset_config_trains_and_exports_a_loadable_model(tmp_path, label_map):
    config = PretrainConfig.from_yaml(_synthetic_config(tmp_path, label_map))
    spec = config.datasets[0]
    assert spec.synthesize == 3 and spec.volumes == 6 and spec.images == [] and spec.weight == 2.0
    result = pretrain(config, Progress())
    assert result["steps"] == 2 and np.isfinite(result["last_loss"])

    target = tmp_path / "shipped" / "mini.safetensors"
    exported = export_model(config, target)
    assert exported == {"path": str(target), "steps": 2, "total_steps": 2}
    network = load_foundation_model(target)
    assert network.architecture.spacing_mm == 5.0 and network.architecture.patch_size == 64
    assert network.architecture.class_names == ("spleen", "kidney_right")
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as handle:
        assert handle.get_tensor("swinViT.layers1.0.blocks.0.attn.relative_position_index").dtype == torch.int16
        assert json.loads(handle.metadata()["fseft.architecture"])["out_channels"] == 2
    assert not list(target.parent.glob(".tmp-*"))


def test_synthetic_dataset_config_errors_name_the_key(tmp_path, label_map):
    path = _synthetic_config(tmp_path, label_map)
    good = yaml.safe_load(path.read_text())

    def error(dataset_overrides) -> str:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**good, "datasets": [{**good["datasets"][0], **dataset_overrides}]}), encoding="utf-8")
        with pytest.raises(InputError) as raised:
            PretrainConfig.from_yaml(bad)
        return str(raised.value)

    assert "'datasets[0].images'" in error({"images": "maps/*.nii.gz"})
    assert "'datasets[0].synthesize'" in error({"synthesize": -1})
    assert "'datasets[0].weight'" in error({"weight": 0})
    assert "'datasets[0].mirror_left_right'" in error({"mirror_left_right": "yes"})


def test_export_without_a_run_is_a_clear_error(tmp_path, label_map):
    config = PretrainConfig.from_yaml(_synthetic_config(tmp_path, label_map, out="never-ran"))
    with pytest.raises(InputError, match="no checkpoint yet; run the pretraining first"):
        export_model(config, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
