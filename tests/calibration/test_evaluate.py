"""evaluate_exits, as a user meets it: a wrapped timm resnet18, their own DataLoaders, one call, a printed table (no timing asserted)."""
import re

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import timm_exits
from conftest import exactly


def loader(n: int, seed: int, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)), batch_size=batch_size)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2, 3], input_size=(3, 32, 32))


@pytest.fixture(scope="module")
def test_loader():
    return loader(24, seed=1)


@pytest.fixture(scope="module")
def val_loader():
    return loader(24, seed=2)


def test_each_exit_is_scored_over_the_loader_as_by_hand_and_costs_what_flops_report_counts(model, test_loader):
    model.train()
    evaluation = timm_exits.evaluate_exits(model, test_loader, progress=False)
    assert model.training  # the user's mode is back
    model.eval()
    correct, seen = torch.zeros(model.num_exits, dtype=torch.long), 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += torch.stack([(z.argmax(-1) == y).sum() for z in model(x)])
            seen += len(y)
    report = timm_exits.flops_report(model, input_size=(3, 32, 32))
    assert evaluation.images == 24 and evaluation.model == "resnet18" and evaluation.backbone_flops == report.backbone_flops
    assert [e.accuracy for e in evaluation.exits] == pytest.approx([c / seen for c in correct.tolist()], abs=1e-12)
    assert [e.stage for e in evaluation.exits] == ["layer1", "layer2", "layer3", "final"]
    assert [e.flops for e in evaluation.exits] == [e.flops for e in report.exits]
    assert [e.share for e in evaluation.exits] == pytest.approx([e.share for e in report.exits]) and evaluation.exits[-1].share == 1.0


def test_operating_points_are_evaluate_thresholds_on_the_loader_with_thresholds_fit_on_calibrate_on(model, test_loader, val_loader):
    given = [0.3, [0.5, 0.4, 0.3]]
    evaluation = timm_exits.evaluate_exits(model, test_loader, calibrate_on=val_loader, thresholds=given, budgets=2, progress=False)
    val = timm_exits.collect_exit_logits(model, val_loader, progress=False)
    test = timm_exits.collect_exit_logits(model, test_loader, progress=False)
    lo, hi = val.flops[0], val.flops[-1]
    budgets = [lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3]  # inside the range: its ends are the first and last exit alone
    fits = [timm_exits.calibrate_thresholds(val, b) for b in budgets]
    expected = [timm_exits.evaluate_thresholds(test, t) for t in fits + given]
    assert [p.budget for p in evaluation.points[:2]] == pytest.approx(budgets) and [p.budget for p in evaluation.points[2:]] == [None, None]
    assert [p.thresholds for p in evaluation.points] == [fit.thresholds for fit in fits] + [[0.3] * 3, [0.5, 0.4, 0.3]]
    assert [p.calibration for p in evaluation.points] == fits + [None, None]
    for point, want in zip(evaluation.points, expected):
        assert (point.accuracy, point.flops, point.exit_shares) == (want.accuracy, want.flops, want.exit_shares)
        assert point.share == pytest.approx(want.flops / evaluation.backbone_flops)
        assert point.flops_predicted_speedup == pytest.approx(evaluation.backbone_flops / want.flops)
        assert point.measured_speedup is None and point.time_predicted_speedup is None
    assert not evaluation.calibrated_on_evaluated_data and evaluation.calibration_images == 24 and evaluation.profile is None
    explicit = timm_exits.evaluate_exits(model, test_loader, calibrate_on=val_loader, budgets=[budgets[1]], progress=False)
    assert [p.thresholds for p in explicit.points] == [fits[1].thresholds]


def test_without_calibrate_on_the_thresholds_fit_the_evaluated_data_and_the_table_says_so(model, test_loader, val_loader):
    evaluation = timm_exits.evaluate_exits(model, test_loader, progress=False)
    test = timm_exits.collect_exit_logits(model, test_loader, progress=False)
    lo, hi = test.flops[0], test.flops[-1]
    fits = [timm_exits.calibrate_thresholds(test, lo + (hi - lo) * i / 4) for i in (1, 2, 3)]  # 3 budgets by default
    assert [p.thresholds for p in evaluation.points] == [fit.thresholds for fit in fits]
    assert evaluation.calibrated_on_evaluated_data
    assert "calibrated on the evaluated 24 images themselves (no calibrate_on): these accuracies are optimistic" in str(evaluation)
    same = timm_exits.evaluate_exits(model, test_loader, calibrate_on=test_loader, progress=False)  # the same loader again
    assert same.calibrated_on_evaluated_data and "optimistic" in str(same)
    held_out = timm_exits.evaluate_exits(model, test_loader, calibrate_on=val_loader, progress=False)
    assert "optimistic" not in str(held_out) and "thresholds calibrated on calibrate_on's 24 images" in str(held_out)
    given = timm_exits.evaluate_exits(model, test_loader, thresholds=[0.5], progress=False)  # nothing calibrated, nothing optimistic
    assert len(given.points) == 1 and not given.calibrated_on_evaluated_data and "calibrated" not in str(given)


def test_speedup_is_measured_beside_the_plain_backbone_only_when_asked(model, test_loader, val_loader):
    evaluation = timm_exits.evaluate_exits(model, test_loader, calibrate_on=val_loader, budgets=2, thresholds=[0.5],
                                           speedup=True, repeats=1, timed_batches=2, progress=False)
    profile = evaluation.profile
    assert evaluation.timed_images == 16 and profile.batch_size == 8 and profile.repeats == 1
    assert set(profile.beside_seconds) == {"plain", 0, 1, 2}  # the plain backbone and each operating point, in the same rounds
    model.eval()
    timed = [x for x, _ in list(test_loader)[:2]]
    for i, point in enumerate(evaluation.points):
        assert point.measured_speedup > 0 and point.time_predicted_speedup > 0
        assert point.measured_speedup == profile.beside_seconds["plain"] / profile.beside_seconds[i]
        threshold = point.calibration if point.calibration is not None else point.thresholds
        counts = sum(torch.tensor(model.early_exit(x, threshold=threshold).exit_counts(model.num_exits)) for x in timed)
        assert point.time_predicted_speedup == pytest.approx(profile.predicted_speedup((counts / counts.sum()).tolist()))
    text = str(evaluation)
    assert "measured" in text and "time-predicted" in text and "measured on the first 16 of the 24 images at batch 8" in text
    plain = timm_exits.evaluate_exits(model, test_loader, calibrate_on=val_loader, budgets=2, progress=False)
    assert plain.profile is None and plain.timed_images is None and "measured" not in str(plain)
    assert all(p.measured_speedup is None and p.time_predicted_speedup is None and p.flops_predicted_speedup > 0 for p in plain.points)


def test_the_printed_tables_have_a_row_per_exit_and_per_operating_point(model, test_loader, val_loader):
    evaluation = timm_exits.evaluate_exits(model, test_loader, calibrate_on=val_loader, budgets=3, thresholds=[0.5], progress=False)
    text = str(evaluation)
    assert text == evaluation.table()
    lines = text.splitlines()
    for e in evaluation.exits:
        row = rf"^\s*{e.index + 1}\s+{e.stage}\s+{e.accuracy:.4f}\s+{e.flops / 1e6:.4g}\s+{e.share:.1%}$"
        assert sum(bool(re.match(row, line)) for line in lines) == 1, e
    for p in evaluation.points:
        budget = "-" if p.budget is None else f"{p.budget / 1e6:.4g}"
        row = rf"^\s*{re.escape(budget)}\s+.*\s{p.accuracy:.4f}\s+{p.flops / 1e6:.4g}\s+{p.flops_predicted_speedup:.2f}x\s"
        assert sum(bool(re.match(row, line)) for line in lines) == 1, p
    assert len(evaluation.points) == 4 and "leaving at exit 1 / 2 / 3 / 4" in text
    github = evaluation.table("github").splitlines()  # markdown: a title line, then the header, its rule and a row per exit
    assert all(line.startswith("|") for line in github[1:7]) and not github[7].startswith("|")


def test_a_failing_call_leaves_the_model_as_it_was():
    model = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2], input_size=(3, 32, 32)).train()
    model.exits[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}

    def breaking():
        yield torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
        raise RuntimeError("the loader breaks")

    with pytest.raises(RuntimeError, match="the loader breaks"):
        timm_exits.evaluate_exits(model, breaking(), progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes


EMPTY = DataLoader(TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)), batch_size=8)
BUDGETS = r"a count >= 1 or a list of average FLOPs per image \(between the first exit's cost and the full model's\)"
RANGE = r"average FLOPs per image between the first exit's cost \([\d,]+\) and the full model's \([\d,]+\) on the calibration data"


@pytest.mark.parametrize("kwargs, error, message", [
    ({"loader": EMPTY}, ValueError, exactly("loader is empty (len(loader) == 0): give a loader with at least one (inputs, labels) batch")),
    ({"loader": iter([])}, ValueError, exactly("loader gave no batches: give a loader with at least one (inputs, labels) batch")),
    ({"calibrate_on": EMPTY}, ValueError, exactly(
        "calibrate_on is empty (len(calibrate_on) == 0): give a loader with at least one (inputs, labels) batch")),
    ({"loader": torch.randn(8, 3, 32, 32)}, TypeError, exactly(
        "loader must be an iterable of (inputs, labels) batches, such as a DataLoader; got a tensor of shape (8, 3, 32, 32) "
        "(for tensors: DataLoader(TensorDataset(x, y), batch_size=64))")),
    ({"loader": [torch.randn(2, 3, 32, 32)]}, ValueError, exactly("loader: each batch of the loader must be (inputs, labels, ...)")),
    ({"budgets": 0}, ValueError, rf"^budgets must be {BUDGETS}; got 0 \(leave it None to give only thresholds\)$"),
    ({"budgets": "3"}, ValueError, rf"^budgets must be {BUDGETS}; got '3'$"),
    ({"budgets": []}, ValueError, rf"^budgets is empty: give {BUDGETS}$"),
    ({"budgets": [2e7, True]}, ValueError, rf"^budgets\[1\] must be {BUDGETS}, got True$"),
    ({"budgets": [2e7, 1e9]}, ValueError, rf"^budgets\[1\] must be {RANGE}; got 1000000000.0$"),
    ({"budgets": [0.5]}, ValueError, rf"^budgets\[0\] must be {RANGE}; got 0.5 \(a share of the backbone\? give FLOPs: 0.5 \* [\d,]+\)$"),
    ({"budgets": [float("nan")]}, ValueError, rf"^budgets\[0\] must be {RANGE}; got nan$"),
    ({"thresholds": 0.9}, ValueError, exactly(
        "thresholds must be a list of operating points, each a number, one per early exit or a Calibration; got 0.9 "
        "(one operating point: thresholds=[0.9])")),
    ({"thresholds": [0.9, [0.9, 0.8]]}, ValueError, exactly(
        "thresholds[1]: threshold has 2 values; give one number or one per early exit (3: the last exit takes every sample left)")),
    ({"criterion": "confidence"}, ValueError, r"^unknown criterion 'confidence'; use one of \('max_prob'"),
    ({"speedup": "yes"}, ValueError, exactly("speedup must be True or False, got 'yes'")),
    ({"speedup": True, "repeats": 0}, ValueError, exactly("repeats must be an int >= 1, got 0")),
    ({"speedup": True, "timed_batches": 1.5}, ValueError, exactly("timed_batches must be an int >= 1, got 1.5")),
    ({"speedup": True, "thresholds": []}, ValueError, exactly(
        "speedup=True times early exit at the operating points, and there are none (thresholds=[] and no budgets): "
        "give budgets or thresholds")),
])
def test_bad_input_is_named_at_the_call(model, kwargs, error, message):
    kwargs = {"loader": loader(4, seed=3, batch_size=4), **kwargs}  # a small one: some checks need the calibration data's costs
    with pytest.raises(error, match=message):
        timm_exits.evaluate_exits(model, kwargs.pop("loader"), progress=False, **kwargs)


def test_a_model_that_is_not_wrapped_is_named(model, test_loader):
    with pytest.raises(TypeError, match=exactly("model must be a MultiExitModel (timm_exits.wrap(model, stages=[...])), got ResNet")):
        timm_exits.evaluate_exits(model.backbone, test_loader)


@pytest.mark.parametrize("kwargs, message", [
    ({"budgets": "3"}, r"^budgets must be a count >= 1"),
    ({"thresholds": 0.9}, r"^thresholds must be a list of operating points"),
    ({"speedup": True, "repeats": -1}, r"^repeats must be an int >= 1, got -1$"),
])
def test_argument_errors_come_before_the_pass_over_the_data(model, kwargs, message):
    class Untouchable:
        def __iter__(self):
            raise AssertionError("the loader was read before the arguments were checked")

    with pytest.raises(ValueError, match=message):
        timm_exits.evaluate_exits(model, Untouchable(), progress=False, **kwargs)


def test_a_streaming_loader_without_a_length_is_evaluated(model, test_loader):
    """A DataLoader over an IterableDataset has __len__ but no length (webdataset, streamed datasets)."""
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for x, y in test_loader:
                yield from zip(x, y)

    streamed = timm_exits.evaluate_exits(model, DataLoader(Stream(), batch_size=8), budgets=1, progress=False)
    listed = timm_exits.evaluate_exits(model, test_loader, budgets=1, progress=False)
    assert streamed.images == 24 and [e.accuracy for e in streamed.exits] == [e.accuracy for e in listed.exits]


def test_an_error_raised_while_reading_the_first_batch_is_the_one_reported(model):
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise ValueError("decoding image 0 failed")

    with pytest.raises(ValueError, match=r"^loader: decoding image 0 failed"):
        timm_exits.evaluate_exits(model, DataLoader(Broken(), batch_size=2), progress=False)
