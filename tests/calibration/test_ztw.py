"""Zero Time Waste's geometric ensembling, against its formula written out here, on cached logits and with real skipping."""
import pytest
import timm
import torch
import torch.nn.functional as F

import timm_exits
from conftest import exactly
from timm_exits import GeometricEnsemble


def cached_exits(n=600, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = []
    for k in range(3):
        z = torch.randn(n, classes, generator=g) * 1.5
        z[torch.arange(n), labels] += 0.8 * (k + 1)
        logits.append(z)
    return timm_exits.CachedExits(torch.stack(logits), labels, [1.0, 2.0, 3.0], ["a", "b", "final"])


def test_each_exits_ensemble_is_the_weighted_mean_of_log_probabilities_of_the_exits_so_far():
    ensemble = GeometricEnsemble(3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k in range(3):
            ensemble.weights[k].copy_(torch.randn(k + 1))
            ensemble.biases[k].copy_(torch.randn(5))
    z = [torch.randn(4, 5) for _ in range(3)]
    for k in range(3):
        expected = sum(ensemble.weights[k][i].exp() * F.log_softmax(z[i], -1) for i in range(k + 1)) / (k + 1) + ensemble.biases[k]
        torch.testing.assert_close(ensemble.combine(z[: k + 1]), expected)
    later = [z[0], z[1], torch.randn(4, 5) * 10]
    torch.testing.assert_close(ensemble(later)[1], ensemble(z)[1])  # exit k reads exits 0..k only


def test_fitting_lowers_the_cross_entropy_and_beats_the_plain_mean_on_held_out_logits():
    train, held_out = cached_exits(seed=0), cached_exits(seed=1)
    ensemble = timm_exits.fit_geometric_ensemble(train, epochs=60)
    before = GeometricEnsemble(3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fitted = [F.cross_entropy(z, held_out.labels).item() for z in ensemble(list(held_out.logits))]
        initial = [F.cross_entropy(z, held_out.labels).item() for z in before(list(held_out.logits))]
        mean = [F.cross_entropy(z, held_out.labels).item() for z in timm_exits.anytime_ensemble(list(held_out.logits))]
    assert all(f < i for f, i in zip(fitted, initial)) and fitted[-1] < mean[-1]
    assert not any(p.requires_grad for p in ensemble.parameters())


def test_early_exit_with_a_geometric_ensemble_equals_the_cached_outcome():
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=5), stages=[1, 2], input_size=(3, 32, 32)).eval()
    x = torch.randn(32, 3, 32, 32)
    cached = timm_exits.collect_exit_logits(model, [(x, torch.randint(0, 5, (32,)))])
    ensemble = GeometricEnsemble(3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k in range(3):
            ensemble.weights[k].copy_(torch.tensor([3.0] * (k + 1)))  # sharp: some samples leave early
    calibration = timm_exits.calibrate_thresholds(cached, (cached.flops[0] + cached.flops[-1]) / 2, ensemble=ensemble)
    result = model.early_exit(x, threshold=calibration, ensemble=ensemble)
    assert result.exit_counts(3) == [round(s * 32) for s in calibration.exit_shares] and result.exit_counts(3)[0] > 0
    every = ensemble(model.forward_exits(x))
    for i in range(32):
        torch.testing.assert_close(result.logits[i], every[int(result.exit_index[i])][i])
    with pytest.raises(ValueError, match=r"^the calibration was made with ensemble="):
        model.early_exit(x, threshold=calibration, ensemble=True)


def test_bad_ensembles_are_named():
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=5), stages=[1], input_size=(3, 32, 32)).eval()
    with pytest.raises(ValueError, match=exactly("the geometric ensemble was fit for 3 exits, this model has 2")):
        model.early_exit(torch.randn(2, 3, 32, 32), ensemble=GeometricEnsemble(3, 5))
    with pytest.raises(TypeError, match=r"^ensemble must be True \(the mean of the exits so far\), False, or a GeometricEnsemble"):
        model.early_exit(torch.randn(2, 3, 32, 32), ensemble="geometric")
    with pytest.raises(TypeError, match=exactly(
            "ensemble must be True (the mean of the exits so far), False, or a GeometricEnsemble (fit_geometric_ensemble), got int")):
        model.early_exit(torch.randn(2, 3, 32, 32), ensemble=1)
    with pytest.raises(ValueError, match=exactly("epochs must be an int >= 1, got 0")):
        timm_exits.fit_geometric_ensemble(cached_exits(), epochs=0)
