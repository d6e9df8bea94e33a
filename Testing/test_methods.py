"""`fseft methods`: per-method summaries from an architecture alone, and the training-memory estimate.

(The methods' step-0 = zero-shot contract is covered in test_training.py.)
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monai.networks.blocks import UnetResBlock
from torch import nn

from FSEFTSegmentLib.errors import InputError
from FSEFTSegmentLib.methods import METHODS, get_method
from FSEFTSegmentLib.methods import summary
from FSEFTSegmentLib.methods.summary import (
    CROPS,
    MIB,
    REFERENCE_PASS_PEAK_MIB,
    adapted_on_meta,
    method_summaries,
    simulate_pass_peak,
    summaries_table,
)
from FSEFTSegmentLib.model.network import Architecture
from FSEFTSegmentLib.model.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]

#: paper-facts §8, binary head: (decoder frozen, decoder tuned or None where the paper has "–")
PAPER_COUNTS = {
    "linear-probe": (49, 19_597_873),
    "spatial-adapter": (124_465, None),
    "adapter-1x1": (4_657, None),
    "affine-ln": (17_329, 19_615_153),
    "lora": (69_169, 19_666_993),
    "adaptformer": (47_697, 19_645_521),
    "bitfit": (210_739, 19_808_563),
    "full": (62_186_659, None),
}
#: paper-facts §6: (decoder frozen, decoder fine-tuned)
PAPER_RATES = {
    "linear-probe": (1e-2, 1e-4),
    "spatial-adapter": (1e-4, 1e-4),
    "adapter-1x1": (1e-4, 1e-4),
    "bitfit": (1e-2, 1e-4),
    "affine-ln": (1e-2, 1e-4),
    "lora": (1e-3, 1e-4),
    "adaptformer": (1e-2, 1e-4),
    "full": (1e-4, 1e-4),
}
#: the 2023 workshop's methods, full-size network and binary head (counted here, not in the paper):
#: adapter-2023 = two bias-free 3^3 convs 48->48 (instance norms without affine) + probe; ft-last = decoder1 + probe
WORKSHOP_COUNTS = {"adapter-2023": (124_465, 19_722_289), "ft-last": (209_713, None)}
#: paper-facts §6, "Workshop 2023 settings" (ft-last ignores --tune-decoder, so keeps its rate)
WORKSHOP_RATES = {"adapter-2023": (1e-2, 1e-4), "ft-last": (1e-2, 1e-2)}
BLACK_BOX = {"linear-probe", "spatial-adapter", "adapter-1x1", "adapter-2023"}
#: methods that train the decoder themselves, so --tune-decoder does not apply
TRAIN_THE_DECODER = {"full", "ft-last"}
TINY = Architecture(feature_size=12, patch_size=64)


@pytest.fixture(scope="module")
def registry_architecture(tmp_path_factory):
    """The registry entry's architecture, with an empty model cache: no weights file anywhere."""
    cache = tmp_path_factory.mktemp("empty-cache")
    saved = os.environ.get("FSEFT_CACHE")
    os.environ["FSEFT_CACHE"] = str(cache)
    try:
        entry = load_registry()["fseft-swinunetr"]
        assert not entry.weights_path.exists()
        yield entry.architecture
    finally:
        if saved is None:
            del os.environ["FSEFT_CACHE"]
        else:
            os.environ["FSEFT_CACHE"] = saved


@pytest.fixture(scope="module")
def frozen_rows(registry_architecture):
    return {row["method"]: row for row in method_summaries(registry_architecture)}


@pytest.fixture(scope="module")
def tuned_rows(registry_architecture):
    return {row["method"]: row for row in method_summaries(registry_architecture, tune_decoder=True)}


# ---------------------------------------------------------------- counts, rates, flags


def test_rows_cover_every_method_and_are_json(frozen_rows):
    assert list(frozen_rows) == list(METHODS)
    keys = {"method", "description", "trainable_parameters", "learning_rate", "black_box", "decoder", "training_memory_gb", "note"}
    for row in frozen_rows.values():
        assert set(row) == keys
    assert json.loads(json.dumps(list(frozen_rows.values()))) == list(frozen_rows.values())


def test_trainable_parameters_match_the_paper(frozen_rows, tuned_rows):
    for name, (frozen, tuned) in {**PAPER_COUNTS, **WORKSHOP_COUNTS}.items():
        assert frozen_rows[name]["trainable_parameters"] == frozen, name
        if tuned is not None:
            assert tuned_rows[name]["trainable_parameters"] == tuned, name


def test_learning_rates_follow_the_paper(frozen_rows, tuned_rows):
    for name, (frozen, tuned) in {**PAPER_RATES, **WORKSHOP_RATES}.items():
        assert frozen_rows[name]["learning_rate"] == frozen, name
        assert tuned_rows[name]["learning_rate"] == tuned, name


def test_black_box_only_for_head_methods_with_a_frozen_decoder(frozen_rows, tuned_rows):
    assert {name for name, row in frozen_rows.items() if row["black_box"]} == BLACK_BOX
    assert not any(row["black_box"] for row in tuned_rows.values())  # a tuned decoder needs the weights
    for name in BLACK_BOX:
        assert "features cached once" in frozen_rows[name]["note"]


def test_decoder_column_and_methods_training_the_decoder_ignore_tune_decoder(frozen_rows, tuned_rows):
    assert {row["decoder"] for name, row in frozen_rows.items() if name not in TRAIN_THE_DECODER} == {"frozen"}
    assert {row["decoder"] for name, row in tuned_rows.items() if name not in TRAIN_THE_DECODER} == {"tuned"}
    assert {name for name, cls in METHODS.items() if not cls.combines_with_decoder} == TRAIN_THE_DECODER
    for name in TRAIN_THE_DECODER:
        assert frozen_rows[name]["decoder"] == tuned_rows[name]["decoder"] == "n/a"
        assert tuned_rows[name]["trainable_parameters"] == frozen_rows[name]["trainable_parameters"]
        assert "--tune-decoder does not apply" in tuned_rows[name]["note"]
        assert "--tune-decoder" not in frozen_rows[name]["note"]


def test_one_head_row_per_structure(registry_architecture):
    rows = {row["method"]: row for row in method_summaries(registry_architecture, structures=3)}
    assert rows["linear-probe"]["trainable_parameters"] == 3 * 49 == 147
    assert rows["spatial-adapter"]["trainable_parameters"] == 124_465 + 2 * 49
    assert rows["full"]["trainable_parameters"] == 62_186_659 + 2 * 49


@pytest.mark.parametrize("structures", [0, -1, True, 1.5, "2"])
def test_bad_structure_count_is_a_user_error(structures):
    with pytest.raises(InputError, match="--structures"):
        method_summaries(Architecture(feature_size=12), structures=structures)


def test_table_lists_every_method(frozen_rows):
    table = summaries_table(list(frozen_rows.values()))
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["method", "trainable", "lr", "black-box", "decoder", "memory"]
    for name, row in frozen_rows.items():
        line = next(line for line in lines[1:] if line.startswith(name + " "))
        assert f"{row['trainable_parameters']:,}" in line and f"{row['training_memory_gb']:.1f} GiB" in line
    assert "62,186,659" in table and "1e-2" in table and "n/a" in table
    assert "lora: backward through the Swin encoder" in table


# ---------------------------------------------------------------- the 2023 workshop's methods


def test_workshop_methods_are_registered_after_the_2025_ones_with_their_schedule(frozen_rows):
    assert list(METHODS)[-2:] == ["adapter-2023", "ft-last"]
    for name, cls in METHODS.items():
        workshop = name in WORKSHOP_COUNTS
        assert cls.workshop is workshop, name
        assert (cls.max_epochs, cls.weight_decay) == ((100, 1e-5) if workshop else (None, 0.0)), name
        assert ("2023 workshop schedule: 100 epochs, weight decay 1e-5" in frozen_rows[name]["note"]) is workshop
    assert get_method("adapter-2023").black_box and not get_method("ft-last").black_box


def _trained(name: str) -> tuple[nn.Module, dict[str, int]]:
    """The tiny network with `name` applied: the model and its trained parameters' sizes by name."""
    model = adapted_on_meta(TINY, name)
    return model, {key: p.numel() for key, p in model.named_parameters() if p.requires_grad}


def test_adapter_2023_trains_a_random_monai_residual_block_with_instance_norm_and_the_probe():
    model, trained = _trained("adapter-2023")
    block, _probe = model.head
    assert isinstance(block, UnetResBlock) and not block.downsample  # residual: the input itself
    assert isinstance(block.norm1, nn.InstanceNorm3d) and isinstance(block.norm2, nn.InstanceNorm3d)
    features = TINY.feature_size
    assert set(trained) == {f"head.{key}" for key, _ in model.head.named_parameters()}
    assert sum(trained.values()) == 2 * 27 * features * features + features + 1  # bias-free 3^3 convs, affine-free IN
    assert model.backbone_frozen
    block = get_method("adapter-2023").head_modules(features)[0]  # real weights: nothing starts at zero
    assert all(conv.conv.weight.abs().min() > 0 for conv in (block.conv1, block.conv2))
    x = torch.randn(1, features, 8, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(block(x), x, atol=1e-2)  # unlike the 2025 adapters, step 0 is not zero-shot


def test_ft_last_trains_decoder1_and_the_head_only():
    model, trained = _trained("ft-last")
    decoder1 = {f"network.{key}": p.numel() for key, p in model.network.named_parameters() if key.startswith("decoder1.")}
    head = {f"head.{key}": p.numel() for key, p in model.head.named_parameters()}
    assert len(model.head) == 1 and decoder1
    assert trained == {**decoder1, **head}
    assert model.trainable_count() == sum(p.numel() for p in model.network.decoder1.parameters()) + TINY.feature_size + 1
    assert not model.backbone_frozen


# ---------------------------------------------------------------- training memory


def test_memory_estimates_are_plausible(frozen_rows, tuned_rows):
    memory = {name: row["training_memory_gb"] for name, row in frozen_rows.items()}
    assert all(value is not None and value > 0.25 for value in memory.values())  # at least the fp32 weights
    assert max(memory[name] for name in BLACK_BOX) < 12  # "black-box runs fit a 12 GB GPU" (paper-facts §8)
    assert memory["linear-probe"] < memory["spatial-adapter"]
    assert max(memory[name] for name in PAPER_COUNTS) == memory["full"]
    # the 2023 adapter keeps its instance norms' full-size maps of all 6 crops: the largest of all (< 12 GB above)
    assert max(memory.values()) == memory["adapter-2023"]
    assert tuned_rows["linear-probe"]["training_memory_gb"] > memory["linear-probe"]


def test_the_estimate_mirrors_the_training_loop_defaults():
    from FSEFTSegmentLib.training import TrainingSettings

    settings = TrainingSettings()
    assert settings.crops_per_step == CROPS
    assert settings.crops_per_pass is None  # training.adapt: all crops when frozen, one at a time otherwise
    architecture = Architecture(feature_size=12)
    assert summary.crops_per_pass(adapted_on_meta(architecture, "spatial-adapter")) == CROPS
    assert summary.crops_per_pass(adapted_on_meta(architecture, "lora")) == 1
    assert summary.crops_per_pass(adapted_on_meta(architecture, "linear-probe", tune_decoder=True)) == 1


def test_reference_peaks_are_current():
    """The stored measurements equal a fresh simulation (they go stale if a method or MONAI changes)."""
    architecture = Architecture()
    assert summary._is_reference(architecture)
    expected_keys = {(name, tuned) for name, cls in METHODS.items() for tuned in (False, True) if cls.combines_with_decoder or not tuned}
    assert set(REFERENCE_PASS_PEAK_MIB) == expected_keys
    simulated = {}
    for name, tuned in sorted(expected_keys):
        if tuned and name in ("bitfit", "affine-ln", "lora", "adaptformer"):
            continue  # the same pass as without --tune-decoder (checked below)
        simulated[name, tuned] = simulate_pass_peak(adapted_on_meta(architecture, name, 1, tuned)) / MIB
    for (name, tuned), (first, further) in REFERENCE_PASS_PEAK_MIB.items():
        assert first == pytest.approx(simulated.get((name, tuned), simulated[name, False]), abs=0.1), (name, tuned)
    for key in (("linear-probe", False), ("lora", False)):  # 6 crops at once / 1 crop
        two = simulate_pass_peak(adapted_on_meta(architecture, key[0], 2, key[1])) / MIB
        assert REFERENCE_PASS_PEAK_MIB[key][1] == pytest.approx(two - simulated[key], abs=0.1), key


def test_other_architectures_are_simulated():
    architecture = Architecture(feature_size=12, patch_size=64)
    model = adapted_on_meta(architecture, "lora")
    assert not summary._is_reference(architecture)
    assert summary.pass_peak_bytes(model) == simulate_pass_peak(model) > 0


RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, resource, sys
    import torch
    from FSEFTSegmentLib.methods import get_method
    from FSEFTSegmentLib.methods.adapted import AdaptedModel
    from FSEFTSegmentLib.methods.summary import measure_pass_peak
    from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR

    torch.manual_seed(0)
    model = AdaptedModel(FoundationSwinUNETR(Architecture(feature_size=12, patch_size=64)), get_method("lora"), [None])
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    resident = int(open("/proc/self/statm").read().split()[1]) * page
    tracked = measure_pass_peak(model, (1, 1, 64, 64, 64), device="cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tracked": tracked, "resident": peak - resident}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc settings")
def test_simulation_matches_real_tensors_and_process_memory():
    """The estimate's measurement, simulated on meta, against a real CPU pass at a tiny size: the
    tracked peak on real tensors is the same, and the process's resident-memory peak agrees."""
    simulated = simulate_pass_peak(adapted_on_meta(Architecture(feature_size=12, patch_size=64), "lora"))
    # large allocations straight from mmap, so freed memory leaves the resident set at once
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    assert measured["tracked"] == pytest.approx(simulated, rel=0.01)
    # seen: 1.11 (the resident peak also holds the kernels' first-use allocations)
    assert 1 / 1.5 < measured["resident"] / measured["tracked"] < 1.5, measured
