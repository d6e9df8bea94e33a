"""Training: the paper's recipe on a tiny network, the feature cache, the size prior, cancellation.

One tiny network (feature size 12, 64^3 patch, one Swin block per stage: the cheapest the network
allows) and one 64^3 phantom support (a bright sphere in soft tissue) serve every test; the support's
frozen features are computed once, so each black-box run costs the head alone. A 64^3 volume is one
sliding window, so its cached features equal a direct forward pass.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from torch import nn

from FSEFTSegmentLib.errors import Cancelled, InputError
from FSEFTSegmentLib.feature_cache import FeatureCache
from FSEFTSegmentLib.methods import METHODS, get_method
from FSEFTSegmentLib.methods.adapted import AdaptedModel
from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR
from FSEFTSegmentLib.preprocessing import CTPreprocessing
from FSEFTSegmentLib.training import (
    CropSampler,
    TrainingCase,
    TrainingSettings,
    adapt,
    adapt_per_query,
    cache_features,
    pad_to,
    plateaued,
    sample_crop_starts,
)

from synthetic import body_phantom

TINY = Architecture(feature_size=12, patch_size=64, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
ROW = 5  # the "liver" row of the random classifier: the zero-shot start of every head
ZERO_INIT = ("spatial-adapter", "adapter-1x1", "lora", "adaptformer")


def quick(**overrides) -> TrainingSettings:
    """One crop of the whole 64^3 support per step, no augmentation, no early stop, fp32."""
    values = dict(max_epochs=1, crops_per_step=1, intensity_shift_prob=0.0, early_stop=False, precision="fp32")
    values.update(overrides)
    return TrainingSettings(**values)


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return FoundationSwinUNETR(TINY).eval()


@pytest.fixture(scope="module")
def support() -> TrainingCase:
    image, organ = body_phantom(size=(80, 80, 40), spacing=(1.5, 1.5, 3.0), origin=(0.0, 0.0, 0.0))
    preprocessing = CTPreprocessing(TINY)
    volume = preprocessing(image)
    label = preprocessing.masks_to_model_space(organ[None].astype(np.uint8), image, volume)
    assert volume.shape[1:3] == (64, 64) and volume.shape[3] >= 64
    start = (volume.shape[3] - 64) // 2
    volume, label = volume.as_tensor()[..., start : start + 64], label[..., start : start + 64]
    assert label.sum() > 500
    return TrainingCase("support", volume.contiguous(), label.contiguous())


@pytest.fixture(scope="module")
def support_features(network, support):
    with cache_features(network, support, settings=quick()) as cache:
        yield cache


@pytest.fixture(scope="module")
def zero_shot(network, support):
    """The untouched network on the support: decoder1 features and its classifier-row logits."""
    with torch.inference_mode():
        features = network.features(support.volume[None])
        return features, network.classifier(features)[:, [ROW]]


def cached(case: TrainingCase, cache: FeatureCache) -> TrainingCase:
    return TrainingCase(case.id, case.volume, case.label, features=cache)


def dice_loss(logits: torch.Tensor, label: torch.Tensor) -> float:
    return float(DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits.float(), label[None].float()))


# ------------------------------------------------------------------------------------ pure pieces


def test_plateau_rule_follows_the_papers_code():
    flat = [0.5] * 40
    assert not plateaued(flat[:30])  # never before epoch 31
    assert plateaued(flat[:31])
    falling = list(np.linspace(0.9, 0.3, 40))  # falls ~0.015 an epoch
    assert not plateaued(falling)
    # improvement measured between the moving averages 19 epochs apart: 0.0009 in all is too little
    slow = [0.5] * 11 + [0.5 - 0.0009 * (i + 1) / 20 for i in range(20)]
    assert plateaued(slow)
    enough = [0.5] * 11 + [0.5 - 0.003 * (i + 1) / 20 for i in range(20)]
    assert not plateaued(enough)
    assert plateaued([0.5] * 25, after=20, patience=10, average=5)


def test_crop_sampler_positive_negative_and_bounds():
    label = torch.zeros((2, 40, 30, 20), dtype=torch.uint8)
    label[0, 2:5, 2:5, 2:5] = 1  # near a corner: crops must be moved inside
    label[1, 30:33, 20:23, 10:12] = 1
    image = torch.zeros((40, 30, 20))
    image[1:39, 1:29, 1:19] = 0.5  # background is sampled inside the body
    sampler = CropSampler(label, image)
    generator = torch.Generator().manual_seed(3)
    positives = sampler.sample(16, 50, 1.0, generator)
    for start in positives:
        assert all(0 <= s <= n - 16 for s, n in zip(start, (40, 30, 20)))
        crop = label[:, start[0] : start[0] + 16, start[1] : start[1] + 16, start[2] : start[2] + 16]
        assert crop.any()
    negatives = sampler.sample(16, 50, 0.0, generator)
    assert len({tuple(s) for s in negatives}) > 10
    assert sample_crop_starts(label, 16, 5, 0.5, torch.Generator().manual_seed(1)) == sample_crop_starts(
        label, 16, 5, 0.5, torch.Generator().manual_seed(1)
    )
    with pytest.raises(ValueError):
        sampler.sample(32, 1, 0.5, generator)  # larger than the volume: pad first


def test_pad_to_is_symmetric_and_keeps_large_volumes():
    padded, offset = pad_to(torch.ones((1, 60, 70, 65)), 64)
    assert padded.shape == (1, 64, 70, 65) and offset == (2, 0, 0)
    assert padded[0, 2:62].eq(1).all() and padded[0, :2].eq(0).all() and padded[0, 62:].eq(0).all()
    same, offset = pad_to(torch.ones((1, 64, 64, 64)), 64)
    assert same.shape == (1, 64, 64, 64) and offset == (0, 0, 0)


class _ConvStub(nn.Module):
    """A cheap stand-in exposing what FeatureCache uses: `architecture` and `features`."""

    architecture = Architecture(feature_size=5, patch_size=32)

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv3d(1, 5, 3, padding=1)

    def features(self, x):
        return torch.tanh(self.conv(x))


@pytest.mark.parametrize("spill", [False, True])
def test_feature_cache_blends_like_monai_sliding_window(spill, tmp_path):
    stub = _ConvStub()
    volume = torch.rand((1, 45, 70, 33))
    with torch.inference_mode():
        expected = sliding_window_inference(volume[None], (32,) * 3, 3, stub.features, overlap=0.25, mode="gaussian")[0]
    windows = []
    cache = FeatureCache(
        stub, volume, torch.device("cpu"), sw_batch_size=3, spill_bytes=0 if spill else 1 << 40, spill_dir=str(tmp_path),
        on_window=lambda done, total: windows.append((done, total)),
    )
    with cache:
        assert cache.spilled == spill
        stored = torch.from_numpy(np.asarray(cache.data)).float().permute(3, 0, 1, 2)
        torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)  # fp16 storage
        crop = cache.crop((3, 20, 1), 16)
        assert crop.shape == (1, 5, 16, 16, 16) and crop.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(crop[0], stored[:, 3:19, 20:36, 1:17])
        batch = cache.crops([(3, 20, 1), (29, 54, 17)], 16)
        assert batch.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(batch, torch.cat([crop, cache.crop((29, 54, 17), 16)]))
        pooled = cache.pooled(2)
        assert pooled.shape == (1, 5, 23, 35, 17)
        torch.testing.assert_close(pooled[0, :, 22, 0, 16].float(), stored[:, 44, 0:2, 32].mean(1), atol=2e-3, rtol=0)
    assert windows[-1][0] == windows[-1][1]
    assert list(tmp_path.iterdir()) == []  # a spilled cache leaves no file behind


# --------------------------------------------------------------------------------- training runs


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_only_its_parameters_and_its_loss_falls(name, network, support, support_features, zero_shot):
    method = get_method(name)
    own = network if method.black_box else copy.deepcopy(network)
    model = AdaptedModel(own, method, [ROW])
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainable = set(model.trainable_state())
    case = cached(support, support_features) if method.black_box else support
    result = adapt(model, [case], quick(learning_rate=1e-2))
    start_loss = dice_loss(zero_shot[1], support.label)
    if name == "adapter-2023":  # the 2023 adapter is a random residual block: it starts elsewhere
        start_loss = result.curve[0]["loss"]
    else:  # every other method starts at the zero-shot prediction: the first step's loss is the zero-shot loss
        assert result.curve[0]["loss"] == pytest.approx(start_loss, abs=2e-3)
    with torch.inference_mode():
        output = model.head(zero_shot[0]) if method.black_box else model(support.volume[None])
        after_loss = dice_loss(output, support.label)
    assert after_loss < start_loss - 1e-4, (name, start_loss, after_loss)
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and changed <= trainable, (name, sorted(changed - trainable))
    frozen = [key for key in before if key not in trainable]
    assert all(torch.equal(before[key], after[key]) for key in frozen)
    assert all(value.is_contiguous() for value in model.trainable_state().values())


def test_the_2023_adapter_does_not_start_at_the_zero_shot_prediction(network, zero_shot):
    features, expected = zero_shot
    with torch.inference_mode():
        output = AdaptedModel(network, get_method("adapter-2023"), [ROW]).head(features)
    assert (output - expected).abs().max() > 0.1


@pytest.mark.parametrize("name", ZERO_INIT)
def test_zero_initialised_methods_reproduce_the_zero_shot_prediction(name, network, support, zero_shot):
    features, expected = zero_shot
    method = get_method(name)
    with torch.inference_mode():
        if method.black_box:
            model = AdaptedModel(network, method, [ROW])
            output = model.head(features)
        else:
            model = AdaptedModel(copy.deepcopy(network), method, [ROW])
            output = model(support.volume[None])
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_cached_and_recomputed_paths_give_the_same_loss(network, support, support_features):
    losses, weights = [], []
    for case, use_cache in ((cached(support, support_features), True), (support, False)):
        model = AdaptedModel(network, get_method("linear-probe"), [ROW])
        result = adapt(model, [case], quick(max_epochs=2, feature_cache=use_cache))
        assert result.feature_cache is use_cache
        losses.append([entry["loss"] for entry in result.curve])
        weights.append(model.head[-1].weight.detach().clone())
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)  # fp16-stored features
    torch.testing.assert_close(weights[0], weights[1], atol=1e-4, rtol=1e-3)


def test_a_crop_too_small_for_the_network_is_refused_before_training(network, support):
    model = AdaptedModel(network, get_method("lora"), [ROW])
    with pytest.raises(InputError, match="at least 64"):
        adapt(model, [support], quick(crop_size=32))


def test_same_seed_same_curve_and_crops_vary(network, support, support_features):
    def run(seed):
        torch.manual_seed(0)  # the adapter's random first convolution is the caller's to seed
        model = AdaptedModel(network, get_method("spatial-adapter"), [ROW])
        settings = TrainingSettings(max_epochs=3, crops_per_step=2, crop_size=32, seed=seed, early_stop=False)
        curve = adapt(model, [cached(support, support_features)], settings).curve
        return [(entry["epoch"], entry["loss"], entry["lr"]) for entry in curve], model.head[0].conv2.weight.detach().clone()

    first, weights = run(0)
    again, weights_again = run(0)
    other, _ = run(1)
    assert first == again and torch.equal(weights, weights_again)
    assert [loss for _, loss, _ in first] != [loss for _, loss, _ in other]
    assert first[0][2] == pytest.approx(1e-4)  # the paper's warm-up starts at lr / warmup_epochs


def test_size_prior_pulls_the_query_size_toward_the_support_size(network, support, support_features):
    # the query holds a much larger bright sphere than the supports: the support-trained head
    # over-segments it, and only the prior says its size should stay near the supports'
    query_volume = support.volume.clone()
    grid = torch.stack(torch.meshgrid(*(torch.arange(64.0),) * 3, indexing="ij"))
    query_volume[0][((grid - 31.5) ** 2).sum(0) <= 14.0**2] = float(support.volume.max())
    query = TrainingCase("query", query_volume, None)

    def run(prior: bool):
        model = AdaptedModel(network, get_method("linear-probe"), [ROW])
        settings = quick(max_epochs=12, learning_rate=0.05, size_prior=True, size_prior_weight=1.0 if prior else 0.0, size_prior_start=0)
        return adapt(model, [cached(support, support_features)], settings, queries=[query]).size_prior["0"]

    with_prior, without = run(True), run(False)
    target = with_prior["prior_voxels"]
    assert target == pytest.approx(float(support.label.sum()))  # one support: its largest component
    assert with_prior["prior_ml"] == pytest.approx(target * 1.5**3 / 1000, rel=1e-3)
    size_with, size_without = with_prior["queries"]["query"]["voxels"], without["queries"]["query"]["voxels"]
    assert abs(size_with - target) < 0.5 * abs(size_without - target), (target, size_with, size_without)


def test_softmax_head_trains_on_softmax_dice_and_refuses_overlapping_labels(network, support, support_features):
    """The paper's multi-class head: background + structures, one softmax Dice over all channels."""
    inner = support.label.clone()
    inner[0, :, :, 32:] = 0  # two structures that share no voxel: each half of the sphere
    halves = torch.cat([support.label - inner, inner])
    case = TrainingCase("support", support.volume, halves, support_features)
    torch.manual_seed(0)
    model = AdaptedModel(network, get_method("linear-probe"), [ROW, None], softmax=True)
    result = adapt(model, [case], quick(max_epochs=8, learning_rate=0.05))
    assert result.curve[-1]["loss"] < result.curve[0]["loss"] - 0.01
    one_hot = torch.cat([1 - halves.amax(0, keepdim=True), halves])[None].float()
    with torch.inference_mode():
        logits = model.head(support_features.crop((0, 0, 0), 64))
    expected = DiceLoss(softmax=True, include_background=True, smooth_nr=1.0, smooth_dr=1.0)(logits.float(), one_hot)
    assert abs(float(expected) - result.curve[-1]["loss"]) < 0.05  # the loss it reports is that Dice (one step later)
    overlapping = TrainingCase("overlap", support.volume, torch.cat([support.label, support.label]), support_features)
    with pytest.raises(InputError, match="overlap"):
        adapt(AdaptedModel(network, get_method("linear-probe"), [ROW, None], softmax=True), [overlapping], quick())


def big_sphere_query(support: TrainingCase, radius: float, name: str) -> TrainingCase:
    """The support's image with a bright sphere of `radius` voxels in its middle: an unlabeled query."""
    volume = support.volume.clone()
    grid = torch.stack(torch.meshgrid(*(torch.arange(64.0),) * 3, indexing="ij"))
    volume[0][((grid - 31.5) ** 2).sum(0) <= radius**2] = float(support.volume.max())
    return TrainingCase(name, volume, None)


def prior_settings(**overrides) -> TrainingSettings:
    return quick(max_epochs=6, learning_rate=0.05, size_prior=True, size_prior_weight=1.0, size_prior_start=0, **overrides)


def test_joint_size_prior_averages_its_queries_terms(network, support, support_features):
    """Two copies of one query must constrain the head as that query alone does: averaged, not summed."""
    query = big_sphere_query(support, 14.0, "query")
    heads = []
    for queries in ([query], [query, TrainingCase("copy", query.volume, None)]):
        torch.manual_seed(0)
        model = AdaptedModel(network, get_method("linear-probe"), [ROW])
        adapt(model, [cached(support, support_features)], prior_settings(size_prior_mode="joint"), queries=queries)
        heads.append(model.head[-1].weight.detach().clone())
    torch.testing.assert_close(heads[0], heads[1], atol=1e-5, rtol=1e-4)


def test_per_query_size_prior_adapts_one_model_per_query_from_shared_support_features(network, support):
    queries = [big_sphere_query(support, radius, f"query-{radius:g}") for radius in (10.0, 16.0)]
    window_passes = []
    hook = network.swinViT.register_forward_hook(lambda *_: window_passes.append(1))

    def build_model() -> AdaptedModel:
        torch.manual_seed(0)
        return AdaptedModel(network, get_method("linear-probe"), [ROW])

    try:
        episodes = adapt_per_query(build_model, [support], queries, prior_settings())
    finally:
        hook.remove()
    # one 64^3 window each: the support once for both episodes, then each query in its own
    assert len(window_passes) == 3
    assert [list(result.size_prior["0"]["queries"]) for _, result in episodes] == [["query-10"], ["query-16"]]
    assert episodes[0][0] is not episodes[1][0]
    # each episode is exactly a single-query adaptation on that query
    for (model, _), query in zip(episodes, queries):
        alone = build_model()
        adapt(alone, [support], prior_settings(), queries=[query])
        torch.testing.assert_close(model.head[-1].weight, alone.head[-1].weight, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one query at a time"):
        adapt(build_model(), [support], prior_settings(), queries=queries)
    with pytest.raises(InputError, match="size-prior mode"):
        adapt(build_model(), [support], prior_settings(size_prior_mode="summed"), queries=queries[:1])


def test_size_prior_needs_a_frozen_backbone_and_queries(network, support):
    lora = AdaptedModel(copy.deepcopy(network), get_method("lora"), [ROW])
    with pytest.raises(InputError, match="black-box"):
        adapt(lora, [support], quick(size_prior=True), queries=[TrainingCase("q", support.volume)])
    probe = AdaptedModel(network, get_method("linear-probe"), [ROW])
    with pytest.raises(InputError, match="query"):
        adapt(probe, [support], quick(size_prior=True))


def test_should_stop_cancels_training_and_feature_caching_quickly(network, support, support_features, tmp_path):
    model = AdaptedModel(network, get_method("spatial-adapter"), [ROW])
    calls = []

    def stop_on_third():
        calls.append(time.monotonic())
        return len(calls) >= 3

    with pytest.raises(Cancelled):
        adapt(model, [cached(support, support_features)], quick(max_epochs=100), should_stop=stop_on_third)
    assert len(calls) == 3
    assert not model.training and model.head[0].conv1.weight.is_contiguous()
    assert support_features.data is not None  # a cache the caller passed stays usable

    started = time.monotonic()
    with pytest.raises(Cancelled):  # stopped before the first sliding window
        adapt(model, [support], quick(cache_spill_bytes=0, cache_dir=str(tmp_path)), should_stop=lambda: True)
    assert time.monotonic() - started < 2.0
    assert list(tmp_path.iterdir()) == []
