"""The patience criterion (PBEE, Zhou et al. 2020): leave once the prediction has held for p exits; checked against a
per-sample reference."""
import pytest
import timm
import torch

import timm_exits
from conftest import exactly


def reference_exit(predictions: list[int], patience: int) -> int:
    """Per sample, as the paper's loop reads: count the exits in a row agreeing with the current one; leave when the count reaches p."""
    count, last = 0, None
    for k, p in enumerate(predictions):
        count = count + 1 if p == last else 1
        last = p
        if count >= patience and k < len(predictions) - 1:
            return k
    return len(predictions) - 1


@pytest.fixture(scope="module")
def model_and_data():
    """A resnet10t trained for a few steps on the digits: its exits disagree on some samples and change their minds on others."""
    from timm_exits.data import corrupted_digits

    torch.manual_seed(0)
    task = corrupted_digits(seed=0, variants=1)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10, in_chans=1), stages=[1, 2, 3], input_size=(1, 32, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = timm_exits.MultiExitCELoss()
    for _ in range(12):
        rows = torch.randint(0, len(task.train), (64,))
        loss = loss_fn(model(task.train.x[rows]), task.train.y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = task.test.x[:96]
    every = torch.stack([z.argmax(-1) for z in model.eval().forward_exits(x)])
    assert len({tuple(c) for c in every.T.tolist()}) > 10  # many different paths of predictions through the exits
    return model, x


@pytest.mark.parametrize("patience", [1, 2, 3])
@pytest.mark.parametrize("ensemble", [False, True])
def test_patience_equals_computing_every_exit_and_selecting(model_and_data, patience, ensemble):
    model, x = model_and_data
    every = model.forward_exits(x)
    if ensemble:
        every = timm_exits.anytime_ensemble(every)
    predictions = torch.stack([z.argmax(-1) for z in every])  # (E, N)
    expected = [reference_exit(predictions[:, i].tolist(), patience) for i in range(x.shape[0])]
    result = model.early_exit(x, criterion="patience", patience=patience, ensemble=ensemble)
    assert result.exit_index.tolist() == expected
    for i, k in enumerate(expected):
        torch.testing.assert_close(result.logits[i], every[k][i])
    cached = timm_exits.collect_exit_logits(model, [(x, torch.zeros(len(x), dtype=torch.long))])
    on_cache = timm_exits.evaluate_thresholds(cached, criterion="patience", patience=patience, ensemble=ensemble)
    assert on_cache.exit_shares == [expected.count(k) / len(expected) for k in range(4)]
    assert len(set(expected)) > 1 or patience == 1  # the samples part ways
    if patience == 1:
        assert set(expected) == {0}  # a prediction always holds for one exit


def test_patience_thresholds_can_be_calibrated_per_exit(model_and_data):
    model, x = model_and_data
    cached = timm_exits.collect_exit_logits(model, [(x, torch.zeros(len(x), dtype=torch.long))])
    calibration = timm_exits.calibrate_thresholds(cached, (cached.flops[0] + cached.flops[-1]) / 2, criterion="patience")
    assert calibration.criterion == "patience" and calibration.flops <= (cached.flops[0] + cached.flops[-1]) / 2
    result = model.early_exit(x, threshold=calibration, criterion="patience")
    assert result.exit_counts(4) == [round(s * len(x)) for s in calibration.exit_shares]
    assert len(timm_exits.budgeted_curve(cached, 4, criterion="patience")) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"criterion": "patience", "patience": 0},
     "patience must be a whole number of exits from 1 to 3 (the last exit takes every sample left; inf keeps everyone going), got 0"),
    ({"criterion": "patience", "patience": 4},
     "patience must be a whole number of exits from 1 to 3 (the last exit takes every sample left; inf keeps everyone going), got 4"),
    ({"criterion": "patience", "patience": 1.5}, "patience must be a whole number of exits (1 = leave at the first exit), got 1.5"),
    ({"criterion": "max_prob", "patience": 2}, "patience=2 is for criterion='patience', not criterion='max_prob'"),
    ({"criterion": "patience", "threshold": 0.9},
     "patience must be a whole number of exits from 1 to 3 (the last exit takes every sample left; inf keeps everyone going), got 0.9"),
])
def test_bad_patience_is_named(model_and_data, kwargs, message):
    model, x = model_and_data
    with pytest.raises(ValueError, match=exactly(message)):
        model.early_exit(x, **kwargs)


def test_the_patience_criterion_alone_says_it_needs_the_earlier_exits():
    with pytest.raises(ValueError, match=r"^the patience criterion reads the exits before this one"):
        timm_exits.runtime.exit_confidence(torch.randn(2, 3), "patience")
