"""The corrupted-digits task: deterministic, split by scan with nothing shared, and graded from easy to hard."""
import pytest
import torch

from timm_exits.data.digits import CORRUPTIONS, _scans, corrupted_digits
from timm_exits.data.splits import UNLABELED


@pytest.fixture(scope="module")
def task():
    return corrupted_digits(seed=0, variants=4)


def test_same_seed_same_bytes_other_seed_other_task(task):
    again, other = corrupted_digits(seed=0, variants=4), corrupted_digits(seed=1, variants=4)
    for name in ("train", "val", "test"):
        a, b = getattr(task, name), getattr(again, name)
        fields = ("x", "y", "source", "severity", "corruption")
        assert all(torch.equal(getattr(a, field), getattr(b, field)) for field in fields)
    assert torch.equal(task.labeled, again.labeled)
    assert not torch.equal(task.test.source, other.test.source) and not torch.equal(task.train.x[:100], other.train.x[:100])


def test_no_scan_is_in_two_splits_and_every_class_is_in_each(task):
    scans = [set(getattr(task, name).source.tolist()) for name in ("train", "val", "test")]
    assert not (scans[0] & scans[1]) and not (scans[0] & scans[2]) and not (scans[1] & scans[2])
    assert len(scans[0] | scans[1] | scans[2]) == 1797
    _, labels = _scans(8)
    for split in (task.train, task.val, task.test):
        assert torch.equal(split.y, labels[split.source])  # each image keeps its scan's label
        assert set(split.y.tolist()) == set(range(10))
        assert len(split) == 4 * len(set(split.source.tolist()))  # every variant of a scan goes with it
    shares = torch.tensor([len(s) for s in (task.train, task.val, task.test)]) / (4 * 1797)
    assert torch.allclose(shares, torch.tensor([0.6, 0.15, 0.25]), atol=0.01)


def test_limited_labels_are_few_per_class_from_distinct_scans(task):
    limited = task.limited()
    labeled = limited.y != UNLABELED
    assert torch.equal(labeled, task.labeled) and len(limited) == len(task.train)
    for c in range(10):
        rows = labeled & (task.train.y == c)
        assert int(rows.sum()) == 20 and len(set(task.train.source[rows].tolist())) == 20
    only = task.limited(unlabeled=False)
    assert len(only) == 200 and bool((only.y >= 0).all())


def test_every_corruption_and_severity_appears_and_severity_means_harder(task):
    train = task.train
    assert set(train.severity.tolist()) == {1, 2, 3, 4, 5} and set(train.corruption.tolist()) == set(range(len(CORRUPTIONS)))
    clean, _ = _scans(32)
    # the change from the clean scan (each image rescaled to [0, 1]) grows with severity, for every corruption
    for code, name in enumerate(CORRUPTIONS):
        change = []
        for s in range(1, 6):
            rows = (train.corruption == code) & (train.severity == s)
            low, high = train.x[rows].amin((1, 2, 3), keepdim=True), train.x[rows].amax((1, 2, 3), keepdim=True)
            images = (train.x[rows] - low) / (high - low).clamp_min(1e-6)
            change.append(float((images - clean[train.source[rows]]).abs().mean()))
        assert change == sorted(change), (name, change)


@pytest.mark.parametrize("kwargs, message", [
    ({"variants": 0}, "variants must be an int >= 1, got 0"),
    ({"size": 4}, "size must be an int >= 8, got 4"),
    ({"labels_per_class": 0}, "labels_per_class must be an int >= 1, got 0"),
    ({"labels_per_class": 500}, "labels_per_class must be at most"),
    ({"fractions": (0.8, 0.3)}, "fractions must be (train, val) shares > 0 that sum below 1, got (0.8, 0.3)"),
    ({"seed": 1.5}, "seed must be an int, got 1.5"),
    ({"variants": True}, "variants must be an int >= 1, got True"),
    ({"fractions": 0.6}, "fractions must be (train, val) shares > 0 that sum below 1, got 0.6"),
    ({"fractions": (0.6, 0.399)}, "fractions must be shares that leave every split a scan of every class, got (0.6, 0.399)"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        corrupted_digits(**kwargs)
