"""Per-exit temperature scaling, checked against references written out here: the fit, the ECE, and early exit on scaled confidences."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_exits
from conftest import exactly, overconfident
from timm_exits.runtime.criteria import check_temperatures


def reference_ece(logits, labels, bins=15):
    probs = logits.double().softmax(-1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        conf, pred = probs.max(-1)
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if inside.any():
            accuracy = (pred[inside] == labels[inside]).double().mean().item()
            total += inside.sum().item() / len(labels) * abs(conf[inside].mean().item() - accuracy)
    return total


def test_the_fit_finds_each_exits_temperature_and_lowers_held_out_nll():
    fit_on, held_out = overconfident(seed=0), overconfident(seed=1)
    fit = timm_exits.calibrate_temperature(fit_on)
    # the last exit's logits are twice those of the model its labels were drawn from: temperature 2
    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64)
    for k, z in enumerate(fit_on.logits.double()):
        nll = torch.stack([F.cross_entropy(z / t, fit_on.labels) for t in grid])
        assert fit.temperatures[k] == pytest.approx(grid[nll.argmin()].item(), rel=2e-3)  # the grid's minimum, independently
        assert fit.nll_after[k] <= fit.nll_before[k] + 1e-12
    assert fit.temperatures[-1] == pytest.approx(2.0, rel=0.1) and fit.temperatures[0] > 2  # the sharpened exits cool down
    for k, z in enumerate(held_out.logits):
        before, after = F.cross_entropy(z, held_out.labels).item(), F.cross_entropy(z / fit.temperatures[k], held_out.labels).item()
        if abs(math.log(fit.temperatures[k])) > 0.2:
            assert after < before  # held-out NLL falls wherever the exit was far from calibrated


def test_expected_calibration_error_matches_a_reference_and_falls_after_scaling():
    cached = overconfident()
    fit = timm_exits.calibrate_temperature(cached)
    for k, z in enumerate(cached.logits):
        assert fit.ece_before[k] == pytest.approx(reference_ece(z, cached.labels), abs=1e-6)
        assert fit.ece_after[k] == pytest.approx(reference_ece(z / fit.temperatures[k], cached.labels), abs=1e-6)
    assert fit.ece_after[0] < fit.ece_before[0] / 2


def test_scaled_cache_keeps_predictions_and_changes_confidences():
    cached = overconfident()
    scaled = cached.scaled([2.0, 1.0, 0.5])
    assert torch.equal(scaled.predictions(), cached.predictions())
    assert torch.allclose(scaled.logits[0], cached.logits[0] / 2) and torch.equal(scaled.logits[1], cached.logits[1])
    assert cached.scaled(None) is cached

    # logits cached under bf16 autocast stay bf16 (a float32 temperature would promote them), and the rest is the cache's
    half = timm_exits.CachedExits(cached.logits.bfloat16(), cached.labels, cached.flops, cached.stages).scaled([2.0, 1.0, 0.5])
    assert half.logits.dtype == torch.bfloat16 and torch.equal(half.logits[0], cached.logits[0].bfloat16() / 2)
    assert torch.equal(half.labels, cached.labels) and half.flops == cached.flops and half.stages == cached.stages
    # a fit, or any sequence of numbers (an array.array has tolist but no ndim), gives the same scaling
    import array

    fit = timm_exits.calibrate_temperature(cached)
    assert torch.equal(cached.scaled(fit).logits, cached.scaled(fit.temperatures).logits)
    assert torch.equal(cached.scaled(array.array("d", [2.0, 1.0, 0.5])).logits, scaled.logits)
    with pytest.raises(ValueError, match=exactly("each temperature must be a finite number > 0, got 'a'")):
        cached.scaled([1.0, "a", 1.0])


def test_early_exit_with_temperatures_equals_the_cached_outcome():
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=5), stages=[1, 2], input_size=(3, 32, 32)).eval()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 5, (32,))
    cached = timm_exits.collect_exit_logits(model, [(x, y)])
    temperatures = [0.05, 0.2, 1.0]  # random weights: sharpen the early exits so that some samples leave
    calibration = timm_exits.calibrate_thresholds(cached, (cached.flops[0] + cached.flops[-1]) / 2, temperature=temperatures)
    assert calibration.temperature == temperatures
    result = model.early_exit(x, threshold=calibration)  # the calibration brings its temperatures
    expected = timm_exits.evaluate_thresholds(cached, calibration.thresholds, temperature=temperatures)
    assert result.exit_counts(3) == [round(s * 32) for s in expected.exit_shares] and sum(result.exit_counts(3)[:2]) > 0
    assert result.exit_counts(3) != model.early_exit(x, threshold=calibration.thresholds).exit_counts(3)  # the temperatures matter
    plain = model.forward_exits(x)
    for i in range(32):
        k = int(result.exit_index[i])
        torch.testing.assert_close(result.logits[i], plain[k][i] / temperatures[k])
    with pytest.raises(ValueError, match=r"^the calibration was made with temperature=\[0.05, 0.2, 1.0\], not \[1.0, 1.0, 1.0\]"):
        model.early_exit(x, threshold=calibration, temperature=[1.0, 1.0, 1.0])
    untempered = timm_exits.calibrate_thresholds(cached, cached.flops[-1])
    with pytest.raises(ValueError, match=r"^the calibration was made without temperatures"):
        model.early_exit(x, threshold=untempered, temperature=temperatures)
    curve = timm_exits.budgeted_curve(cached, 3, evaluate_on=cached, temperature=temperatures)
    assert [p.accuracy for p in curve] == [
        timm_exits.evaluate_thresholds(cached, p.thresholds, temperature=temperatures).accuracy for p in curve
    ]


@pytest.mark.parametrize("temperature, message", [
    ([1.0, 1.0], "temperature has 2 values; give one per exit (3), as calibrate_temperature fits them"),
    ([1.0, 0.0, 1.0], "temperatures must be finite numbers > 0, got [1.0, 0.0, 1.0]"),
    ([1.0, float("nan"), 1.0], "temperatures must be finite numbers > 0, got [1.0, nan, 1.0]"),
    (2.0, "temperature must be one positive number per exit (3), or calibrate_temperature's result; got 2.0"),
])
def test_bad_temperatures_are_named(temperature, message):
    with pytest.raises(ValueError, match=exactly(message)):
        check_temperatures(temperature, 3)
    with pytest.raises(ValueError, match=exactly(message)):
        timm_exits.evaluate_thresholds(overconfident(), 0.5, temperature=temperature)


def test_calibrate_temperature_names_what_it_needs():
    with pytest.raises(TypeError, match=r"^cached must be a CachedExits"):
        timm_exits.calibrate_temperature(torch.zeros(3, 4, 5))
    unlabeled = timm_exits.CachedExits(torch.randn(2, 4, 3), torch.full((4,), -100), [1.0, 2.0], ["a", "b"])
    with pytest.raises(ValueError, match=r"^calibrate_temperature needs labeled samples"):
        timm_exits.calibrate_temperature(unlabeled)


def test_evaluate_thresholds_reads_confidences_after_the_temperatures_a_calibration_brings():
    cached, temperatures = overconfident(n=400), [3.0, 1.0, 2.0]
    calibration = timm_exits.calibrate_thresholds(cached, 2.0, temperature=temperatures)
    given = timm_exits.evaluate_thresholds(cached, calibration.thresholds, temperature=temperatures)
    brought = timm_exits.evaluate_thresholds(cached, calibration)  # no temperature given: the calibration's own
    assert given.temperature == brought.temperature == temperatures
    assert (brought.accuracy, brought.flops, brought.exit_shares) == (given.accuracy, given.flops, given.exit_shares)
    untempered = timm_exits.evaluate_thresholds(cached, calibration.thresholds)
    assert untempered.temperature is None and untempered.exit_shares != given.exit_shares  # the temperatures matter
    with pytest.raises(ValueError, match=exactly("give threshold (or, with criterion='patience', patience)")):
        timm_exits.evaluate_thresholds(cached)
