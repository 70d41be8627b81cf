"""Thresholds with a guarantee (Learn-then-Test, Hoeffding-Bentkus): the promise checked over 200 random calibration/test splits."""
import math

import pytest
import torch

import timm_exits
from conftest import exactly
from timm_exits.calibration.risk import hoeffding_bentkus_p


def population(n=40_000, classes=10, seed=0):
    """Cached exits of a model whose early exits are less accurate, and less sure where they are wrong."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = []
    for signal in (1.0, 2.0, 3.5):
        z = torch.randn(n, classes, generator=g)
        z[torch.arange(n), labels] += signal * torch.rand(n, generator=g) * 2
        logits.append(z)
    return torch.stack(logits), labels


def drop(logits, labels, thresholds):
    cached = timm_exits.CachedExits(logits, labels, [1.0, 2.0, 3.0], ["a", "b", "c"])
    final = (logits[-1].argmax(-1) == labels).double().mean().item()
    return final - timm_exits.evaluate_thresholds(cached, thresholds).accuracy


def test_the_accuracy_drop_stays_within_the_bound_on_new_data_with_the_promised_probability():
    logits, labels = population()
    eps, delta, splits, n = 0.03, 0.1, 200, 1000
    g = torch.Generator().manual_seed(1)
    violations = {"guaranteed": 0, "empirical": 0}
    saved = []
    for _ in range(splits):
        order = torch.randperm(len(labels), generator=g)
        cal, test = order[:n], order[n : 2 * n]
        cached = timm_exits.CachedExits(logits[:, cal], labels[cal], [1.0, 2.0, 3.0], ["a", "b", "c"])
        guaranteed = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=eps, delta=delta)
        empirical = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=eps)  # within eps on the calibration data only
        violations["guaranteed"] += drop(logits[:, test], labels[test], guaranteed.thresholds) > eps
        violations["empirical"] += drop(logits[:, test], labels[test], empirical.thresholds) > eps
        saved.append(guaranteed.flops / cached.flops[-1])
    assert violations["guaranteed"] / splits <= delta  # the promise
    assert violations["empirical"] / splits > 2 * delta  # without the bound it fails often: the check has teeth
    assert sum(saved) / splits < 0.95  # and the guarantee still saves compute: it is not "nobody leaves"


def test_hoeffding_bentkus_p_values_match_their_definition():
    # Hoeffding alone: exp(-n KL(r || eps)); Bentkus: e * P(Bin(n, eps) <= ceil(n r)); the p-value is the smaller
    n, r, eps = 200, 0.02, 0.05
    kl = r * math.log(r / eps) + (1 - r) * math.log((1 - r) / (1 - eps))
    binom = sum(math.comb(n, i) * eps**i * (1 - eps) ** (n - i) for i in range(math.ceil(n * r) + 1))
    assert hoeffding_bentkus_p(r, n, eps) == pytest.approx(min(math.exp(-n * kl), math.e * binom), rel=1e-9)
    assert hoeffding_bentkus_p(0.06, n, eps) == 1.0 and hoeffding_bentkus_p(0.0, 10_000, eps) < 1e-100


@pytest.mark.parametrize("kwargs, message", [
    ({"max_accuracy_drop": 0.01, "delta": 0},
     "delta must be a probability in (0, 1): the chance the guarantee may fail (0.1 = 90 % confidence), got 0"),
    ({"max_accuracy_drop": 0.01, "delta": 1.5},
     "delta must be a probability in (0, 1): the chance the guarantee may fail (0.1 = 90 % confidence), got 1.5"),
    ({"budget": 2.0, "delta": 0.1}, "delta goes with max_accuracy_drop: the guarantee bounds the accuracy lost against the last exit"),
    ({"max_accuracy_drop": 0.01, "delta": 1},
     "delta must be a probability in (0, 1): the chance the guarantee may fail (0.1 = 90 % confidence), got 1"),
    ({"max_accuracy_drop": 0.01, "delta": "0.1"},
     "delta must be a probability in (0, 1): the chance the guarantee may fail (0.1 = 90 % confidence), got '0.1'"),
    ({"max_accuracy_drop": 0.01, "delta": 0.1, "criterion": "patience"},
     "delta (a guarantee) works with confidence criteria; the patience criterion's thresholds are counts"),
])
def test_bad_delta_is_named(kwargs, message):
    logits, labels = population(n=100)
    cached = timm_exits.CachedExits(logits, labels, [1.0, 2.0, 3.0], ["a", "b", "c"])
    with pytest.raises(ValueError, match=exactly(message)):
        timm_exits.calibrate_thresholds(cached, **kwargs)


def test_an_accuracy_target_needs_labels_and_class_0_is_one():
    logits, labels = population(n=100)
    unlabeled = timm_exits.CachedExits(logits, torch.full_like(labels, -100), [1.0, 2.0, 3.0], ["a", "b", "c"])
    with pytest.raises(ValueError, match=exactly(
            "max_accuracy_drop needs labeled samples: every label of the cached exits is negative (unlabeled)")):
        timm_exits.calibrate_thresholds(unlabeled, max_accuracy_drop=0.01)
    class_0 = timm_exits.CachedExits(logits, torch.zeros_like(labels), [1.0, 2.0, 3.0], ["a", "b", "c"])
    assert timm_exits.calibrate_thresholds(class_0, max_accuracy_drop=0.01).criterion == "max_prob"


def test_testing_stops_at_the_first_threshold_not_rejected(monkeypatch):
    """Fixed-sequence testing controls the error only if it stops at the first failure, even when a later threshold would pass."""
    import timm_exits.calibration.risk as risk

    logits, labels = population(n=500)
    conf = torch.stack([z.softmax(-1).amax(-1) for z in logits])
    preds = logits.argmax(-1)
    levels = torch.linspace(1, 0, 201, dtype=torch.float64)
    candidates = torch.quantile(conf[:-1].flatten().double(), levels).unique(sorted=True).flip(0).tolist()
    verdicts = iter([0.0, 0.0, 0.5] + [0.0] * len(candidates))  # the third fails, every later one would pass
    monkeypatch.setattr(risk, "hoeffding_bentkus_p", lambda *args: next(verdicts))
    assert risk.risk_controlled_thresholds(conf, preds, labels, 0.05, 0.1) == [candidates[1]] * 2
