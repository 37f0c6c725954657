"""Calibration: ECE, reliability bins and temperature scaling on synthetic predictions with known answers."""

import pytest
import torch

from tasks.calibration import (TEMPERATURE_RANGE, expected_calibration_error, reliability_bins,
                               temperature_fit)


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_otherwise():
    targets = torch.tensor([0, 1, 0, 1])
    certain = torch.nn.functional.one_hot(targets, 2).float()
    assert expected_calibration_error(certain, targets, n_bins=10) == pytest.approx(0.0)
    # always 90% sure of class 0, right half of the time -> |0.9 - 0.5|
    overconfident = torch.tensor([[0.9, 0.1]] * 4)
    assert expected_calibration_error(overconfident, targets, n_bins=10) == pytest.approx(0.4)


def test_reliability_bins_cover_every_image_once():
    probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.35, 0.65], [0.15, 0.85], [0.5, 0.5]])
    targets = torch.tensor([0, 1, 1, 1, 0])
    bins = reliability_bins(probs, targets, n_bins=5)
    assert [b["bin"] for b in bins] == list(range(5)) and sum(b["count"] for b in bins) == 5
    top = bins[4]  # (0.8, 1.0]: confidences .95 and .85, both right
    assert top["count"] == 2 and top["confidence"] == pytest.approx(0.9) and top["accuracy"] == 1.0
    assert bins[0]["count"] == 0 and bins[0]["accuracy"] is None
    assert bins[2]["count"] == 2  # (0.4, 0.6]: .55 (wrong) and .5 (right, argmax -> 0)
    assert bins[2]["accuracy"] == pytest.approx(0.5)


def test_temperature_scaling_recovers_a_known_overconfidence():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=g) * 2
    targets = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    t = temperature_fit(true_logits * 3, targets).temperature  # a model 3x too sure of itself
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(torch.softmax(true_logits * 3, 1), targets)
    after = expected_calibration_error(torch.softmax(true_logits * 3 / t, 1), targets)
    assert after < before / 2


def test_degenerate_temperature_falls_back_to_one():
    # perfectly separated: NLL keeps falling as T -> 0; an absurd T is never returned
    logits = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    assert 1e-2 <= temperature_fit(logits, torch.tensor([0, 1])).temperature <= 1e2
    assert temperature_fit(torch.empty(0, 2), torch.empty(0, dtype=torch.int64)).temperature == 1.0


def test_ece_matches_torchmetrics_binning():
    """ECE is computed without importing torchmetrics (slow to import); the same bins and number."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(500, 5, generator=g) * 3, 1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0])  # confidence exactly 1
    targets = torch.randint(0, 5, (500,), generator=g)
    for bins in (1, 10, 15):
        ours = expected_calibration_error(probs, targets, n_bins=bins)
        theirs = float(multiclass_calibration_error(probs, targets, num_classes=5, n_bins=bins, norm="l1"))
        assert ours == pytest.approx(theirs, abs=1e-6)


def test_fit_temperature_leaves_the_thread_count_as_it_was():
    threads = torch.get_num_threads()
    temperature_fit(torch.randn(50, 3) * 4, torch.randint(0, 3, (50,)))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 10.0])
def test_fit_temperature_finds_the_nll_minimum(scale):
    """Closed-form Newton (no torch.optim, whose first use imports torch._dynamo): the NLL is at its minimum."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(int(scale * 10))
    targets = torch.randint(0, 10, (400,), generator=g)
    logits = (torch.randn(400, 10, generator=g) + 2 * F.one_hot(targets, 10)) * scale
    t = temperature_fit(logits, targets).temperature
    nll = lambda temp: float(F.cross_entropy(logits.double() / temp, targets))  # noqa: E731
    assert nll(t) <= min(nll(t * 1.01), nll(t / 1.01))
    assert t == pytest.approx(scale / 2, rel=0.5)  # roughly undoes the scale


def test_a_separable_validation_split_gets_no_temperature():
    import torch.nn.functional as F

    targets = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(300, 10, generator=torch.Generator().manual_seed(1)) + 8 * F.one_hot(targets, 10)
    assert temperature_fit(logits, targets).temperature == 1.0


def _sampled(n: int = 4000, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits): T = 1 is exactly right for them."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2
    return logits, torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)


@pytest.mark.parametrize("scale", [0.02, 0.005])
def test_a_strongly_under_confident_model_gets_its_small_temperature(scale):
    # the true-class margin is tiny (logits 50x / 200x too small) but consistent: best T = scale, a real
    # minimum (the old 1e-2 <= T guard turned the 0.005 one into T = 1)
    true_logits, targets = _sampled()
    fit = temperature_fit(true_logits * scale, targets)
    assert fit.status == "fitted" and fit.reason is None
    assert fit.temperature == pytest.approx(scale, rel=0.1)
    assert fit.nll_after < fit.nll_before
    before = expected_calibration_error(torch.softmax(true_logits * scale, 1), targets)
    after = expected_calibration_error(torch.softmax(true_logits * scale / fit.temperature, 1), targets)
    assert before > 0.4 and after < 0.1
    assert temperature_fit(true_logits * scale, targets).temperature == fit.temperature


def test_a_perfectly_separated_split_falls_back_and_says_why():
    logits = torch.tensor([[0.02, 0.0], [0.0, 0.03], [0.01, 0.0]])  # tiny margins, but every one on the right side
    fit = temperature_fit(logits, torch.tensor([0, 1, 0]))
    assert (fit.temperature, fit.status) == (1.0, "fallback") and "perfectly separated" in fit.reason
    empty = temperature_fit(torch.empty(0, 2), torch.empty(0, dtype=torch.int64))
    assert (empty.temperature, empty.status) == (1.0, "fallback") and "no images" in empty.reason


def test_one_error_in_a_nearly_separated_split_makes_the_minimum_real():
    import torch.nn.functional as F

    targets = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(300, 10, generator=torch.Generator().manual_seed(1)) + 8 * F.one_hot(targets, 10)
    logits[0] = logits[0].roll(1)  # one confident mistake
    fit = temperature_fit(logits, targets)
    assert fit.status == "fitted" and TEMPERATURE_RANGE[0] < fit.temperature < 1.0
    nll = lambda temp: float(F.cross_entropy(logits.double() / temp, targets))  # noqa: E731
    assert nll(fit.temperature) <= min(nll(fit.temperature * 1.01), nll(fit.temperature / 1.01))


def test_logits_that_do_not_favour_the_true_class_fall_back_and_say_why():
    import torch.nn.functional as F

    targets = torch.arange(200) % 4
    logits = -2.0 * F.one_hot(targets, 4) + torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    fit = temperature_fit(logits, targets)
    assert (fit.temperature, fit.status) == (1.0, "fallback") and "do not favour" in fit.reason


def test_an_optimum_outside_the_documented_range_is_clamped_and_says_so():
    true_logits, targets = _sampled()
    low = temperature_fit(true_logits * 1e-4, targets)  # best T ~ 1e-4
    assert (low.temperature, low.status) == (TEMPERATURE_RANGE[0], "clamped") and "clamped" in low.reason
    assert low.nll_after < low.nll_before
    high = temperature_fit(true_logits * 1e4, targets)  # best T ~ 1e4
    assert (high.temperature, high.status) == (TEMPERATURE_RANGE[1], "clamped")
    assert high.nll_after < high.nll_before
