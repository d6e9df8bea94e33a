"""The foundation network reproduces the released model's computation and splits body from head."""

import json
from pathlib import Path

import pytest
import torch

from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR, PatchMerging091, head_rows

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-swinunetr"
GOLDEN = FIXTURES / "golden-feature12-input64.pt"
LAYOUT = FIXTURES / "state-dict-layout-feature48.json"


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden fixture not found at {GOLDEN}")
    return torch.load(GOLDEN, weights_only=True)


def test_golden_logits_reproduced(golden):
    network = FoundationSwinUNETR(Architecture(feature_size=12))
    network.load_state_dict(golden["state_dict"], strict=True)
    with torch.inference_mode():
        logits = network.eval()(golden["input"])
    difference = (logits[:, :, ::2, ::2, ::2] - golden["logits_every_2nd_voxel"]).abs().max().item()
    assert difference <= 1e-4


def test_current_monai_merging_order_would_not_reproduce(golden):
    """Guards the reason PatchMerging091 exists: the sub-grid order changes the output."""
    from monai.networks.nets.swin_unetr import PatchMergingV2

    network = FoundationSwinUNETR(Architecture(feature_size=12))
    network.load_state_dict(golden["state_dict"], strict=True)
    for stage in range(1, 5):
        merging = getattr(network.swinViT, f"layers{stage}")[0].downsample
        assert isinstance(merging, PatchMerging091)
        merging.__class__ = PatchMergingV2
    with torch.inference_mode():
        logits = network.eval()(golden["input"])
    assert (logits[:, :, ::2, ::2, ::2] - golden["logits_every_2nd_voxel"]).abs().max().item() > 1e-2


def test_full_size_layout_matches_released_checkpoint():
    if not LAYOUT.exists():
        pytest.skip(f"layout fixture not found at {LAYOUT}")
    expected = json.loads(LAYOUT.read_text())
    network = FoundationSwinUNETR(Architecture())
    shapes = {key: list(value.shape) for key, value in network.state_dict().items()}
    assert shapes == expected["keys"]
    assert sum(p.numel() for p in network.parameters()) == expected["num_parameters"] == 62_188_031


def test_features_then_head_equals_forward(golden):
    network = FoundationSwinUNETR(Architecture(feature_size=12)).eval()
    network.load_state_dict(golden["state_dict"])
    x = golden["input"]
    with torch.inference_mode():
        features = network.features(x)
        assert features.shape == (1, 12, 64, 64, 64)
        torch.testing.assert_close(network.classifier(features), network(x))
        rows = head_rows(network.classifier, [5, 0])(features)
        torch.testing.assert_close(rows, network(x)[:, [5, 0]])


def test_input_not_divisible_by_32_is_refused():
    network = FoundationSwinUNETR(Architecture(feature_size=12)).eval()
    with pytest.raises(ValueError, match="divisible"):
        network.features(torch.zeros(1, 1, 40, 32, 32))
