"""Support size priors, the transductive hinge and the volume quality flag (paper-facts §9)."""

import numpy as np
import pytest
import torch

from FSEFTSegmentLib.priors import expected_volume_range, quality_flag, size_prior, size_prior_loss, support_size


# ---------------------------------------------------------------- support_size


def test_largest_component_kept():
    mask = torch.zeros(20, 20, 20, dtype=torch.uint8)
    mask[2:6, 2:6, 2:6] = 1  # 64 voxels
    mask[10:13, 10:13, 10:13] = 1  # 27 voxels, separate
    mask[18, 18, 18] = 1  # a stray voxel
    assert support_size(mask) == 64.0


def test_diagonal_neighbours_are_connected_26():
    mask = torch.zeros(10, 10, 10, dtype=torch.bool)
    for i in range(5):
        mask[i, i, i] = True  # touching only by corners: one component with 26-connectivity
    mask[8, 0, 0] = True
    assert support_size(mask) == 5.0


def test_empty_and_float_masks():
    assert support_size(torch.zeros(4, 5, 6)) == 0.0
    mask = torch.zeros(4, 5, 6)
    mask[1:3, 1:3, 1:3] = 1.0
    assert support_size(mask) == 8.0


def test_non_volume_refused():
    with pytest.raises(ValueError, match="3-D"):
        support_size(torch.ones(2, 3, 4, 5))


# ---------------------------------------------------------------- size_prior


def test_fewer_than_five_supports_not_trimmed():
    assert size_prior([100, 110, 90, 1000]) == pytest.approx(325.0)
    assert size_prior([42]) == 42.0


def test_five_or_more_supports_trimmed_to_median_plus_minus_std():
    sizes = [100, 110, 90, 105, 1000]
    median, std = np.median(sizes), np.std(sizes)
    assert median + std < 1000  # the outlier is outside the band
    assert size_prior(sizes) == pytest.approx((100 + 110 + 90 + 105) / 4)


def test_equal_sizes_do_not_empty_the_selection():
    assert size_prior([50.0] * 6) == 50.0


def test_no_sizes_refused():
    with pytest.raises(ValueError):
        size_prior([])


# ---------------------------------------------------------------- size_prior_loss


@pytest.mark.parametrize(
    "predicted, expected_loss, expected_grad",
    [
        (1000.0, 0.0, 0.0),  # at the prior
        (800.0, 0.0, 0.0),  # inside the band
        (1250.0, 0.0, 0.0),
        (500.0, 0.7 - 0.5, -1 / 1000),  # below: pushes Ŝ up
        (2000.0, 2.0 - 1.3, 1 / 1000),  # above: pushes Ŝ down
    ],
)
def test_hinge_value_and_gradient(predicted, expected_loss, expected_grad):
    s_hat = torch.tensor(predicted, dtype=torch.float64, requires_grad=True)
    loss = size_prior_loss(s_hat, 1000.0, gamma=0.3)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    assert s_hat.grad.item() == pytest.approx(expected_grad, abs=1e-15)


def test_hinge_continuous_at_the_bounds():
    prior, gamma, eps = 500.0, 0.3, 1e-6
    for bound in ((1 - gamma) * prior, (1 + gamma) * prior):
        values = torch.tensor([bound - eps, bound, bound + eps], dtype=torch.float64)
        losses = size_prior_loss(values, prior, gamma)
        assert losses.max().item() < 1e-8  # no jump of 2γ as in the 2023 code


def test_hinge_is_scale_free():
    small = size_prior_loss(torch.tensor(50.0), 100.0)
    large = size_prior_loss(torch.tensor(5e6), 1e7)
    assert small.item() == pytest.approx(large.item()) == pytest.approx(0.2)


def test_hinge_rejects_bad_prior():
    with pytest.raises(ValueError):
        size_prior_loss(torch.tensor(1.0), 0.0)


# ---------------------------------------------------------------- quality flag


def test_expected_range_spans_supports():
    low, high = expected_volume_range([600.0, 500.0, 531.2])
    assert low == pytest.approx(350.0) and high == pytest.approx(780.0)


def test_quality_flag_cases():
    expected = (420.0, 690.5)
    assert quality_flag(812.3, expected) == "volume 812.3 mL above the 420.0–690.5 mL the supports imply"
    assert quality_flag(12.04, expected) == "volume 12.0 mL below the 420.0–690.5 mL the supports imply"
    assert quality_flag(500.0, expected) is None
    assert quality_flag(420.0, expected) is None and quality_flag(690.5, expected) is None
