"""Early exit: samples that are confident stop, the rest go on; thresholds meet a budget.

The reference throughout is written out here, not taken from the library: the criteria
(`confidence`), the anytime ensemble (`running_means`) and "compute every exit, then each sample
takes the first exit it passes" (`select`).
"""
import json
import math
import warnings

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import timm_exits
from conftest import DataDependent, exactly, resnet10t_exits

CRITERIA = ["max_prob", "margin", "entropy"]


def resnet(seed=0):
    torch.manual_seed(seed)
    return timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2]).eval()


def vit(seed=0):
    torch.manual_seed(seed)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32)
    return timm_exits.wrap(backbone, stages=[3, 6, 9]).eval()


def fallback_resnet(seed=0):
    """A resnet18 that fx cannot trace: wrap() runs it through timm's forward_intermediates."""
    torch.manual_seed(seed)
    backbone = timm.create_model("resnet18", num_classes=5)
    backbone.layer2[0].act1 = DataDependent()
    with pytest.warns(UserWarning, match="forward_intermediates"):
        return timm_exits.wrap(backbone, stages=[1, 2]).eval()


# -- the reference ------------------------------------------------------------------------------


def confidence(z, criterion):
    """Each criterion from its definition. max_prob: the top softmax probability; margin: the top
    minus the second probability; entropy: -sum p log p (the one where lower means confident)."""
    p = z.float().softmax(-1)
    if criterion == "max_prob":
        return p.max(-1).values
    if criterion == "margin":
        ranked = p.sort(-1, descending=True).values
        return ranked[:, 0] - ranked[:, 1]
    if criterion == "entropy":
        return -(p * p.log()).sum(-1)
    return criterion(z)


def passes(z, threshold, criterion):
    """Whether each sample leaves at an exit with logits `z`: entropy at or below, the others at or above the threshold."""
    score = confidence(z, criterion)
    return score <= threshold if criterion == "entropy" else score >= threshold


def running_means(outputs):
    """The anytime ensemble: after exit k, the mean of the logits of exits 0..k."""
    return [torch.stack(outputs[: k + 1]).mean(0) for k in range(len(outputs))]


def select(outputs, thresholds, criterion="max_prob"):
    """Every exit computed; each sample takes the first exit it passes, the last exit if none."""
    batch = outputs[0].shape[0]
    index = torch.full((batch,), len(outputs) - 1)
    for k in reversed(range(len(outputs) - 1)):
        index[passes(outputs[k], thresholds[k], criterion)] = k
    return torch.stack(outputs)[index, torch.arange(batch)], index


def threshold_between(scores, q=0.5):
    """A threshold halfway between the two scores around quantile `q`: no sample sits on it, so float rounding decides nothing."""
    ranked = scores.double().sort().values
    k = min(int(q * (len(ranked) - 1)), len(ranked) - 2)
    return ((ranked[k] + ranked[k + 1]) / 2).item()


def spent_per_exit(model, size=(3, 32, 32)):
    """What leaving at exit k costs one sample: the backbone up to k and every head scored on the way."""
    exits = timm_exits.flops_report(model, input_size=size).exits
    heads = [sum(e.head_flops for e in exits[: k + 1]) for k in range(len(exits))]
    return torch.tensor([float(e.backbone_flops + h) for e, h in zip(exits, heads)])


# -- early exit against the reference -----------------------------------------------------------


@pytest.mark.parametrize("build", [resnet, vit], ids=["resnet18", "vit_tiny"])
@pytest.mark.parametrize("batch", [1, 2, 17])
def test_early_exit_equals_computing_every_exit_and_selecting(build, batch):
    model = build()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model(x)
    # thresholds around the median confidence of each exit: a mix of samples leaves at every exit
    thresholds = [threshold_between(confidence(z, "max_prob")) for z in outputs[:-1]] if batch > 1 else [0.3] * (len(outputs) - 1)
    result = model.early_exit(x, threshold=thresholds)
    logits, index = select(outputs, thresholds)
    assert torch.equal(result.exit_index, index)
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)
    if batch > 1:
        assert len(set(index.tolist())) > 1
    # nobody passes: everyone gets the final exit; everybody passes: everyone leaves at exit 1
    none = model.early_exit(x, threshold=math.inf)
    assert (none.exit_index == model.num_exits - 1).all()
    torch.testing.assert_close(none.logits, outputs[-1], rtol=1e-4, atol=1e-5)
    everyone = model.early_exit(x, threshold=0.0)
    assert (everyone.exit_index == 0).all()
    torch.testing.assert_close(everyone.logits, outputs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", CRITERIA + [lambda z: -z.logsumexp(-1)], ids=CRITERIA + ["callable"])
@pytest.mark.parametrize("ensemble", [False, True], ids=["exit", "ensemble"])
@pytest.mark.parametrize("build", [resnet, fallback_resnet], ids=["traced", "fallback"])
def test_every_criterion_with_and_without_the_anytime_ensemble(build, criterion, ensemble):
    model = build()
    x = torch.randn(17, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = model(x)
    decided_on = running_means(outputs) if ensemble else outputs
    thresholds = [threshold_between(confidence(z, criterion)) for z in decided_on[:-1]]
    if build is fallback_resnet:  # fx could not trace it: every exit is computed, then one selected
        with pytest.warns(UserWarning, match="every exit is computed, then one is selected"):
            result = model.early_exit(x, threshold=thresholds, criterion=criterion, ensemble=ensemble)
    else:
        result = model.early_exit(x, threshold=thresholds, criterion=criterion, ensemble=ensemble)
    logits, index = select(decided_on, thresholds, criterion)
    assert torch.equal(result.exit_index, index) and len(set(index.tolist())) == model.num_exits
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(result.flops, spent_per_exit(model)[index].to(result.flops.dtype))
    assert result.exit_counts() == torch.bincount(index).tolist() and result.exit_counts(5) == torch.bincount(index, minlength=5).tolist()


@pytest.mark.parametrize("build", [resnet, fallback_resnet], ids=["traced", "fallback"])
def test_a_sample_exactly_at_its_threshold_leaves(build):
    model = build()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        outputs = model(x)
    scores = outputs[0].softmax(-1).amax(-1)
    at = scores[2].item()  # the float32 score itself: sample 2 sits on the threshold
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning is checked above
        result = model.early_exit(x, threshold=[at, math.inf])
    assert result.exit_index[2] == 0 and torch.equal(result.exit_index == 0, scores >= at)


def test_criteria_on_logits_worked_by_hand():
    # exit 1: sample 0 uniform over 4 classes (p = .25 each: max .25, margin 0, entropy ln 4 = 1.386);
    # sample 1 with p = (.5, .3, .1, .1): max .5, margin .2, entropy .5 ln 2 + .3 ln(1/.3) + .2 ln 10 = 1.168
    first = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(5), math.log(3), 0.0, 0.0]])
    cached = timm_exits.CachedExits(torch.stack([first, torch.zeros(2, 4)]), torch.tensor([0, 0]), [1.0, 2.0], ["s", "final"])
    cases = [
        ("max_prob", 0.2, [1.0, 0.0]), ("max_prob", 0.49, [0.5, 0.5]), ("max_prob", 0.51, [0.0, 1.0]),
        ("margin", 0.15, [0.5, 0.5]), ("margin", 0.25, [0.0, 1.0]),
        ("entropy", 1.4, [1.0, 0.0]), ("entropy", 1.2, [0.5, 0.5]), ("entropy", 1.1, [0.0, 1.0]),
    ]
    for criterion, threshold, shares in cases:
        outcome = timm_exits.evaluate_thresholds(cached, [threshold], criterion)
        assert outcome.exit_shares == shares, (criterion, threshold, outcome.exit_shares)


def test_flops_per_sample_follow_the_exit_taken():
    model = resnet()
    x = torch.randn(9, 3, 32, 32)
    report = timm_exits.flops_report(model, input_size=(3, 32, 32)).exits
    result = model.early_exit(x, threshold=0.0)
    assert (result.flops == report[0].flops).all()
    result = model.early_exit(x, threshold=math.inf)
    # the last exit computed the whole backbone and was scored by every early head on the way
    assert (result.flops == report[-1].flops + report[0].head_flops + report[1].head_flops).all()


def executed_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("build", [resnet, vit], ids=["resnet18", "vit_tiny"])
def test_samples_that_left_are_not_computed_further(build):
    model = build()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outputs = model(x)
    thresholds = [threshold_between(confidence(z, "max_prob"), 0.6) for z in outputs[:-1]]
    result = model.early_exit(x, threshold=thresholds)
    counts = result.exit_counts(model.num_exits)
    assert len(result.exit_counts()) == int(result.exit_index.max()) + 1
    assert counts[0] > 0 and counts[-1] > 0

    # what one sample costs in each segment and head, counted by torch on the operations run
    one = x[:1]
    segments, per_segment, per_head, state = model.segments(), [], [], (one,)
    with torch.no_grad():
        for segment, head in zip(segments[:-1], model.exits):
            per_segment.append(executed_flops(lambda: segment(*state)))  # noqa: B023 - called at once, in this iteration
            feature, state = segment(*state)
            per_head.append(executed_flops(lambda: head(feature)))  # noqa: B023 - called at once, in this iteration
        per_segment.append(executed_flops(lambda: segments[-1](*state)))
    running = [16 - sum(counts[:k]) for k in range(model.num_exits)]  # samples that entered segment k
    expected = sum(n * (s + h) for n, s, h in zip(running, per_segment, per_head + [0]))
    assert executed_flops(lambda: model.early_exit(x, threshold=thresholds)) == expected
    assert expected < 16 * (sum(per_segment) + sum(per_head))


# -- values carried past the exits that are not plain batch tensors ---------------------------------


def _median_thresholds(model, x):
    """Thresholds at each early exit's median confidence on `x`: about half of those still running leave at each exit."""
    with torch.no_grad():
        return [confidence(z, "max_prob").median().item() for z in model(x)[:-1]]


def test_early_exit_reads_the_device_once_per_exit_it_decides_at():
    """One read per early exit reached (how many stay: the next segment's batch size), none in the forward.
    With a nonzero for each side it was two per exit; the stream, which decides the same way, is the reference."""
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2, 3], input_size=(3, 32, 32)).eval()
    x = torch.randn(32, 3, 32, 32)
    median = _median_thresholds(model, x)
    timm_exits.early_exit(model, x, threshold=median)  # learns the batch layout and the costs once
    with timm_exits.host_syncs() as forward:
        model(x)
    assert forward.total == 0
    inf = float("inf")  # keeps everyone: that exit's decision is known without reading its logits
    for threshold, decided in [(median, 3), ([0.0, 0.0, 0.0], 1), ([2.0, 2.0, 2.0], 3), ([inf] * 3, 0), ([inf, 2.0, inf], 1)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 2.0 is above any probability: it warns, and keeps everyone
            with timm_exits.host_syncs() as syncs:
                result = timm_exits.early_exit(model, x, threshold=threshold)
            with timm_exits.host_syncs() as streamed:
                reference = timm_exits.early_exit_stream(model, [x], threshold=threshold)
        assert dict(syncs.counts) == ({"_local_scalar_dense": decided} if decided else {}), threshold
        assert streamed.counts.get("_local_scalar_dense", 0) == decided, (threshold, dict(streamed.counts))
        assert torch.equal(result.exit_index, reference.exit_index) and torch.equal(result.logits, reference.logits)
    assert len(set(timm_exits.early_exit(model, x, threshold=median).exit_index.tolist())) == 4  # the median case splits at every exit


def test_what_early_exit_learns_about_a_model_is_kept_until_its_steps_change():
    # which carried values follow the batch, and what each exit costs: learned once per model, not on every call
    from timm_exits.runtime import rows

    model, x = resnet10t_exits(images=2)
    model.early_exit(x)
    learned = rows._learned(model)
    model.early_exit(x)
    assert rows._learned(model) is learned
    model.exits[0] = nn.Sequential(*model.exits[0].children())  # a replaced head: the steps are rebuilt, and so is what they taught
    assert rows._learned(model) is not learned


class Pair(nn.Module):
    """Returns a nested tuple holding the batch size; as a leaf module it is one traced value, carried whole."""

    def forward(self, x):
        return x.mean((2, 3)), (x.amax((2, 3)), x.shape[0])


class Carries(nn.Module):
    """A classifier whose values live across its exits are not all batch tensors: the batch size and the width
    as ints, a nested tuple, a (B,) vector, constants of no, one and three rows (three is the batch size early
    exit probes with), and with `mix` pixels of the whole batch as rows (B * H * W, C) or columns (C, B * H * W)."""

    def __init__(self, mix=None):
        super().__init__()
        self.mix = mix
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.layer2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pair = Pair()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.offset = nn.Parameter(torch.randn(3, 8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        batch = x.shape[0]
        h = self.stem(x)
        width = h.shape[1]
        pair = self.pair(h)
        scale, total, offset = self.scale * 2.0, self.scale.sum(), self.offset * 1.0
        norms = h.flatten(1).norm(dim=1)
        pixels = h.flatten(2).transpose(1, 2).reshape(-1, 8) if self.mix else None
        if self.mix == "columns":
            pixels = pixels.t()
        h = self.layer2(self.layer1(h).relu()).relu()
        pooled = h.reshape(batch, width, -1).mean(-1) * scale / total + pair[0] + 0.5 * pair[1][0] + offset.mean(0)
        pooled = pooled + 0.01 * norms.unsqueeze(1)
        if self.mix == "rows":
            pooled = pooled + pixels.reshape(batch, -1, 8).mean(1)
        if self.mix == "columns":
            pooled = pooled + pixels.t().reshape(batch, -1, 8).mean(1)
        return self.fc(pooled.reshape(pair[1][1], 8))


def test_carried_ints_nested_tuples_and_constants_follow_the_samples_that_stay():
    torch.manual_seed(0)
    model = timm_exits.wrap(Carries(), stages=["layer1", "layer2"], leaf_modules=[Pair], input_size=(3, 16, 16)).eval()
    x = torch.randn(13, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outputs = model(x)
    thresholds = [threshold_between(confidence(z, "max_prob")) for z in outputs[:-1]]
    result = model.early_exit(x, threshold=thresholds)
    logits, index = select(outputs, thresholds)
    assert torch.equal(result.exit_index, index) and (index == 2).sum() not in (0, 13)
    # the final exit saw only the samples still running, with the batch size it carried made to match
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)
    one = model.early_exit(x[:1], threshold=thresholds)
    torch.testing.assert_close(one.logits[0], logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mix", ["rows", "columns"])
def test_a_carried_value_that_mixes_the_batch_cannot_be_split(mix):
    torch.manual_seed(0)
    model = timm_exits.wrap(Carries(mix=mix), stages=["layer1", "layer2"], leaf_modules=[Pair], input_size=(3, 16, 16)).eval()
    x = torch.randn(5, 3, 16, 16)
    with pytest.raises(ValueError, match=exactly(
        "early_exit cannot split the batch after exit 1 ('layer1'): a value carried past it mixes the batch with another dimension; "
        "choose another stage"
    )):
        model.early_exit(x, threshold=0.3)
    # one sample has nothing to split: it runs, and equals the full forward
    with torch.no_grad():
        torch.testing.assert_close(model.early_exit(x[:1], threshold=math.inf).logits, model(x[:1])[-1])


def test_inference_mode_and_mode_errors():
    model = resnet()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        result = model.early_exit(x, threshold=0.5)
    assert result.logits.shape == (3, 5)
    model.train()
    with pytest.raises(RuntimeError, match=r"call model.eval"):
        model.early_exit(x)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"threshold": [0.5, 0.5, 0.5]}, ValueError, "one per early exit \\(2"),
        ({"threshold": [0.5, float("nan")]}, ValueError, "NaN not"),
        ({"criterion": "confidence"}, ValueError, "unknown criterion 'confidence'"),
        ({"criterion": lambda z: z}, ValueError, "one score per sample, shape \\(3,\\); it returned \\(3, 5\\)"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        resnet().early_exit(torch.randn(3, 3, 32, 32), **kwargs)


# -- calibration --------------------------------------------------------------------------------


def cached_digits_like(num_exits=3, n=400, classes=5, seed=0):
    """Cached exits whose later exits are more accurate and more confident, like a trained model."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = []
    for k in range(num_exits):
        z = torch.randn(n, classes, generator=g)
        z[torch.arange(n), labels] += 1.0 + 1.5 * k
        logits.append(z)
    flops = [100.0 * (k + 1) + 1 for k in range(num_exits)]
    return timm_exits.CachedExits(torch.stack(logits), labels, flops, [f"s{k}" for k in range(num_exits)])


def outcome(cached, thresholds, criterion="max_prob", ensemble=False):
    """Accuracy, average FLOPs and exit shares of thresholds on cached exits, from the reference."""
    outputs = list(cached.logits)
    logits, index = select(running_means(outputs) if ensemble else outputs, thresholds, criterion)
    accuracy = (logits.argmax(-1) == cached.labels).double().mean().item()
    flops = torch.tensor(cached.flops, dtype=torch.float64)[index].mean().item()
    shares = (torch.bincount(index, minlength=len(outputs)).double() / len(index)).tolist()
    return accuracy, flops, shares


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("ensemble", [False, True], ids=["exit", "ensemble"])
def test_calibrated_thresholds_meet_the_budget_on_their_data(criterion, ensemble):
    cached = cached_digits_like()
    for budget in (101.0, 150.0, 200.0, 250.0, 301.0):
        c = timm_exits.calibrate_thresholds(cached, budget, criterion=criterion, ensemble=ensemble)
        assert (c.criterion, c.ensemble) == (criterion, ensemble)
        assert c.flops <= budget + 1e-9
        accuracy, flops, shares = outcome(cached, c.thresholds, criterion, ensemble)
        assert math.isclose(c.accuracy, accuracy) and math.isclose(c.flops, flops) and c.exit_shares == pytest.approx(shares)
        again = timm_exits.evaluate_thresholds(cached, c.thresholds, criterion, ensemble)
        assert (again.flops, again.accuracy, again.exit_shares) == (c.flops, c.accuracy, c.exit_shares)
        assert (again.criterion, again.ensemble, again.thresholds) == (criterion, ensemble, c.thresholds)
    assert timm_exits.evaluate_thresholds(cached, 0.5).ensemble is False  # the default decides on each exit alone
    # MSDNet's protocol spends most of a middle budget: a share q^k leaves at exit k, as many as fit
    assert timm_exits.calibrate_thresholds(cached, 200.0, criterion=criterion, ensemble=ensemble).flops > 190.0
    assert timm_exits.calibrate_thresholds(cached, 301.0, criterion=criterion, ensemble=ensemble).exit_shares[-1] == 1.0
    assert timm_exits.calibrate_thresholds(cached, 101.0, criterion=criterion, ensemble=ensemble).exit_shares[0] == 1.0


def test_msdnet_shares_fall_geometrically_with_the_exit():
    cached = cached_digits_like(num_exits=4, n=1000)
    c = timm_exits.calibrate_thresholds(cached, 250.0)
    shares = c.exit_shares
    # q^1 : q^2 : q^3 : q^4 with one q for the whole budget (floor rounding takes at most a sample per exit)
    q = shares[1] / shares[0]
    assert shares[2] / shares[1] == pytest.approx(q, rel=0.05) and q > 0
    assert sum(shares[:3]) <= 1.0 and shares[3] >= 0


def test_budgeted_curve_is_monotone_and_anytime_accuracy_rises():
    cached = cached_digits_like()
    curve = timm_exits.budgeted_curve(cached, budgets=10)
    flops = [p.flops for p in curve]
    assert all(p.flops <= p.budget + 1e-9 for p in curve)
    assert flops == sorted(flops)
    assert curve[-1].accuracy > curve[0].accuracy
    anytime = timm_exits.anytime_accuracy(cached)
    assert [p.flops for p in anytime] == cached.flops
    assert [p.accuracy for p in anytime] == [(z.argmax(-1) == cached.labels).double().mean().item() for z in cached.logits]
    assert [p.accuracy for p in anytime] == sorted(p.accuracy for p in anytime)
    assert [(p.exit, p.stage) for p in anytime] == [(0, "s0"), (1, "s1"), (2, "s2")]
    # by default 20 budgets, evenly from the first exit's cost to the full model's
    default = timm_exits.budgeted_curve(cached)
    assert [p.budget for p in default] == pytest.approx([101.0 + 200.0 * i / 19 for i in range(20)])
    assert [p.budget for p in timm_exits.budgeted_curve(cached, budgets=1)] == [301.0]
    assert [p.budget for p in timm_exits.budgeted_curve(cached, budgets=2)] == [101.0, 301.0]
    assert [p.budget for p in timm_exits.budgeted_curve(cached, budgets=[150.0, 250.0])] == [150.0, 250.0]
    # the criterion and the ensemble reach the calibration and the held-out evaluation
    for point in timm_exits.budgeted_curve(cached, budgets=[150.0, 250.0], criterion="margin", ensemble=True,
                                           evaluate_on=cached_digits_like(seed=2)):
        alone = timm_exits.calibrate_thresholds(cached, point.budget, criterion="margin", ensemble=True)
        assert point.thresholds == alone.thresholds
        accuracy, flops, _ = outcome(cached_digits_like(seed=2), point.thresholds, "margin", True)
        assert (point.accuracy, point.flops) == pytest.approx((accuracy, flops))
    on_ensembles = timm_exits.anytime_accuracy(cached, ensemble=True)
    assert [p.accuracy for p in on_ensembles] == [
        (z.argmax(-1) == cached.labels).double().mean().item() for z in running_means(list(cached.logits))
    ]
    held_out = cached_digits_like(seed=1)
    on_test = timm_exits.budgeted_curve(cached, budgets=10, evaluate_on=held_out)
    assert [p.thresholds for p in on_test] == [p.thresholds for p in curve]
    for point in on_test:
        accuracy, flops, shares = outcome(held_out, point.thresholds)
        assert (point.accuracy, point.flops) == pytest.approx((accuracy, flops)) and point.exit_shares == pytest.approx(shares)
    with pytest.raises(ValueError, match="evaluate_on has 4 exits"):
        timm_exits.budgeted_curve(cached, evaluate_on=cached_digits_like(num_exits=4))


def test_a_calibration_round_trips_through_its_file(tmp_path):
    calibration = timm_exits.Calibration([0.5, float("inf")], "entropy", True, 0.75, 1.5e6, [0.5, 0.0, 0.5], [0.5, 1.0, 2.0])
    assert timm_exits.Calibration.load(calibration.save(tmp_path / "c.json")) == calibration
    (tmp_path / "bad.json").write_text('{"thresholds": [0.5]}')
    with pytest.raises(ValueError, match=r"bad.json is not a calibration Calibration.save wrote: it needs the keys \['accuracy', "):
        timm_exits.Calibration.load(tmp_path / "bad.json")
    (tmp_path / "text.json").write_text("thresholds 0.5")
    with pytest.raises(ValueError, match=r"text.json is not a calibration Calibration.save wrote: it is not JSON"):
        timm_exits.Calibration.load(tmp_path / "text.json")


def test_a_calibration_file_is_indented_json_and_names_what_it_lacks(tmp_path):
    calibration = timm_exits.Calibration([0.5, 0.25], "max_prob", False, 0.75, 2.0e6, [0.25, 0.25, 0.5])
    text = calibration.save(tmp_path / "c.json").read_text()
    assert text.startswith('{\n  "thresholds": [\n    0.5,') and text.endswith("}\n")  # a file a person can read and edit
    needed = {"thresholds": [0.5], "criterion": "max_prob", "ensemble": False, "accuracy": 0.5, "flops": 1.0, "exit_shares": [1.0, 0.0]}
    (tmp_path / "needed.json").write_text(json.dumps(needed))  # the optional keys may be left out
    assert timm_exits.Calibration.load(tmp_path / "needed.json") == timm_exits.Calibration(**needed)
    prefix = f"{tmp_path / 'bad.json'} is not a calibration Calibration.save wrote: it needs the keys "
    keys = "['accuracy', 'criterion', 'ensemble', 'exit_shares', 'flops', 'thresholds'] (and may have ['cost', 'temperature'])"
    (tmp_path / "bad.json").write_text('{"thresholds": [0.5], "colour": "red"}')
    with pytest.raises(ValueError, match=exactly(f"{prefix}{keys}; it has ['colour', 'thresholds']")):
        timm_exits.Calibration.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("[0.5]")
    with pytest.raises(ValueError, match=exactly(f"{prefix}{keys}; it has list")):
        timm_exits.Calibration.load(tmp_path / "bad.json")
    geometric = timm_exits.Calibration([0.5], "max_prob", timm_exits.GeometricEnsemble(2, 3), 0.5, 1.0, [1.0, 0.0])
    with pytest.raises(ValueError, match=exactly(
            "a calibration made with a GeometricEnsemble cannot be saved as JSON (the ensemble is a module with weights): "
            "keep it in Python, or torch.save the ensemble beside the thresholds")):
        geometric.save(tmp_path / "g.json")
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("costs, message", [
    ([1.0, 2.0], "costs has 2 values; give one per exit (3): what a sample leaving there costs"),
    (torch.tensor([1.0, 0.0, 2.0]), "costs must be finite numbers > 0, got [1.0, 0.0, 2.0]"),
    ([1.0, float("inf"), 2.0], "costs must be finite numbers > 0, got [1.0, inf, 2.0]"),
    ([1.0, float("nan"), 2.0], "costs must be finite numbers > 0, got [1.0, nan, 2.0]"),
    ([True, 2.0, 3.0], "costs must be finite numbers > 0, got [True, 2.0, 3.0]"),
    (["1", 2.0, 3.0], "costs must be finite numbers > 0, got ['1', 2.0, 3.0]"),
    ([1.0, 3.0, 2.0], "costs must not decrease from exit to exit (leaving later computes more), got [1.0, 3.0, 2.0]"),
    (timm_exits.ExitProfile(1, ["s0", "s2", "s1"], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 3.0, "cpu", 1),
     "costs is a profile of a model with exits at ['s0', 's2', 's1'], the cached exits are at ['s0', 's1', 's2']: profile the same model"),
])
def test_costs_in_another_unit_are_checked_against_the_cached_exits(costs, message):
    with pytest.raises(ValueError, match=exactly(message)):
        timm_exits.calibrate_thresholds(cached_digits_like(), 2.0, costs=costs)


def test_costs_as_a_profile_or_a_tensor_give_the_cost_in_their_unit():
    profile = timm_exits.ExitProfile(1, ["s0", "s1", "s2"], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 3.0, "cpu", 1)
    as_tensor = timm_exits.calibrate_thresholds(cached_digits_like(), 2.0, costs=torch.tensor(profile.seconds))
    assert timm_exits.calibrate_thresholds(cached_digits_like(), 2.0, costs=profile) == as_tensor  # a profile is its seconds
    assert as_tensor.cost == pytest.approx(sum(share * cost for share, cost in zip(as_tensor.exit_shares, profile.seconds)))
    assert timm_exits.calibrate_thresholds(cached_digits_like(), 201.0).cost is None  # FLOPs: no other unit to report
    valid = "an average cost (in the unit of costs) per sample between the first exit's cost (1) and the full model's (3)"
    with pytest.raises(ValueError, match=exactly(f"budget must be {valid}, got 5.0")):
        timm_exits.calibrate_thresholds(cached_digits_like(), 5.0, costs=profile)


def test_two_exits_may_cost_the_same():
    # costs must not decrease, but may stay level: a timing profile can give two neighbouring exits the same seconds
    c = timm_exits.calibrate_thresholds(cached_digits_like(), 1.5, costs=[1.0, 1.0, 2.0])
    assert c.cost <= 1.5 and c.cost == pytest.approx(c.exit_shares[2] + 1.0)


def test_each_input_size_is_charged_its_own_flops():
    model, _ = resnet10t_exits(images=0)
    small, large = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    for x in (small, large, small):  # the costs are kept per input size: the second size must not reuse the first's
        result = model.early_exit(x, threshold=math.inf)
        exits = timm_exits.flops_report(model, input_size=tuple(x.shape[1:])).exits  # every head scored it, the backbone ran whole
        assert result.flops.tolist() == [float(exits[-1].backbone_flops + sum(e.head_flops for e in exits))] * 2


def test_budgeted_curve_passes_temperatures_and_costs_to_each_calibration():
    cached, temperature, costs = cached_digits_like(), [2.0, 1.0, 0.5], [1.0, 3.0, 4.0]
    curve = timm_exits.budgeted_curve(cached, budgets=4, temperature=temperature, costs=costs)
    assert [p.budget for p in curve] == pytest.approx([1.0, 2.0, 3.0, 4.0])  # spread over the costs' range, not the FLOPs'
    for point in curve:
        alone = timm_exits.calibrate_thresholds(cached, point.budget, temperature=temperature, costs=costs)
        assert point.thresholds == alone.thresholds and point.flops == pytest.approx(alone.flops)
    assert [p.thresholds for p in curve] != [p.thresholds for p in timm_exits.budgeted_curve(cached, budgets=4, costs=costs)]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("ensemble", [False, True], ids=["exit", "ensemble"])
def test_accuracy_target_is_met_at_less_cost(criterion, ensemble):
    cached = cached_digits_like()
    final = (cached.logits[-1].argmax(-1) == cached.labels).double().mean().item()
    c = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.01, criterion=criterion, ensemble=ensemble)
    accuracy, flops, _ = outcome(cached, c.thresholds, criterion, ensemble)
    assert math.isclose(c.accuracy, accuracy) and math.isclose(c.flops, flops)
    assert accuracy >= final - 0.01 and flops < cached.flops[-1]
    strict = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.0, criterion=criterion, ensemble=ensemble)
    assert strict.accuracy >= final and strict.flops >= c.flops
    # a looser target never costs more
    loose = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.1, criterion=criterion, ensemble=ensemble)
    assert loose.flops <= c.flops and loose.accuracy >= final - 0.1


def cached_with_boosts(n, boosts, classes=5):
    """Cached exits of random logits where exit k adds `boosts[k]` = (which, size) to the right class or to a wrong one."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(len(boosts), n, classes, generator=g)
    for k, (which, size) in enumerate(boosts):
        logits[k, torch.arange(n), labels if which == "right" else (labels + 1) % classes] += size
    return timm_exits.CachedExits(logits, labels, [100.0 * (k + 1) + 1 for k in range(len(boosts))], [f"s{k}" for k in range(len(boosts))])


def test_an_accuracy_target_takes_the_cheapest_thresholds_not_the_least_accurate():
    # a middle exit that is confident and mostly wrong: routing samples there loses accuracy and still costs more
    # than letting them leave at the first exit, so the least accurate thresholds that meet a loose target are not the cheapest
    cached = cached_with_boosts(400, [("right", 2.0), ("wrong", 6.0), ("right", 4.0)])
    c = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.9)
    assert c.exit_shares == [1.0, 0.0, 0.0] and c.flops == 101.0  # everyone leaves at the first exit: the least it can cost


def test_a_target_no_early_exit_can_meet_runs_every_sample_to_the_end():
    # both early exits are confidently wrong: any sample leaving early costs accuracy, so with no drop allowed the only
    # thresholds that qualify keep everyone (2,000 samples: MSDNet's most patient q still lets 2 leave at exit 1)
    cached = cached_with_boosts(2000, [("wrong", 6.0), ("wrong", 6.0), ("right", 4.0)])
    c = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.0)
    assert c.thresholds == [math.inf, math.inf] and c.exit_shares == [0.0, 0.0, 1.0]


def test_average_flops_and_costs_stay_exact_past_float32():
    # a resnet50's exits cost billions of FLOPs, past float32's exact integers (2^24), and seconds such as 0.1 are not
    # exact in float32 either: the averages are taken in float64, and evaluating a calibration gives its FLOPs back
    base = cached_digits_like()
    flops, seconds = [1_300_000_001.0, 2_700_000_003.0, 4_100_000_005.0], [0.1, 0.3, 0.7]
    cached = timm_exits.CachedExits(base.logits, base.labels, flops, base.stages)
    c = timm_exits.calibrate_thresholds(cached, 2_000_000_000.0)
    assert c.flops == pytest.approx(sum(s * f for s, f in zip(c.exit_shares, flops)), rel=1e-12, abs=0)
    assert timm_exits.evaluate_thresholds(cached, c).flops == c.flops
    timed = timm_exits.calibrate_thresholds(cached, 0.4, costs=seconds)
    assert timed.cost == pytest.approx(sum(s * t for s, t in zip(timed.exit_shares, seconds)), rel=1e-12, abs=0)
    assert timed.flops == pytest.approx(sum(s * f for s, f in zip(timed.exit_shares, flops)), rel=1e-12, abs=0)


def test_a_budget_of_the_whole_model_runs_every_sample_to_the_end():
    # at q = 1e4, the search's largest, 1 sample in 10^4 would still leave at exit 1: 20,000 samples see the difference
    cached = cached_digits_like(n=20000)
    c = timm_exits.calibrate_thresholds(cached, cached.flops[-1])
    assert c.thresholds == [math.inf, math.inf] and c.exit_shares == [0.0, 0.0, 1.0]


def test_calibration_bad_input():
    cached = cached_digits_like()
    with pytest.raises(ValueError, match="between the first exit's cost"):
        timm_exits.calibrate_thresholds(cached, 50.0)
    with pytest.raises(ValueError, match="between the first exit's cost"):
        timm_exits.calibrate_thresholds(cached, 1e6)
    with pytest.raises(ValueError, match="exactly one of"):
        timm_exits.calibrate_thresholds(cached)
    with pytest.raises(ValueError, match="exactly one of"):
        timm_exits.calibrate_thresholds(cached, 150.0, max_accuracy_drop=0.01)
    with pytest.raises(ValueError, match=r"max_accuracy_drop must be a fraction in \[0, 1\]"):
        timm_exits.calibrate_thresholds(cached, max_accuracy_drop=1.5)
    with pytest.raises(ValueError, match="unknown criterion 'top1'"):
        timm_exits.calibrate_thresholds(cached, 150.0, criterion="top1")
    with pytest.raises(ValueError, match="one per early exit \\(2"):
        timm_exits.evaluate_thresholds(cached, [0.5, 0.5, 0.5])
    four = timm_exits.calibrate_thresholds(cached_digits_like(num_exits=4), 250.0)
    with pytest.raises(ValueError, match="one per early exit \\(2"):
        resnet().early_exit(torch.randn(2, 3, 32, 32), threshold=four)
    margin = timm_exits.calibrate_thresholds(cached, 150.0, criterion="margin")
    with pytest.raises(ValueError, match="made for criterion='margin', not 'max_prob'"):
        resnet().early_exit(torch.randn(2, 3, 32, 32), threshold=margin)
    with pytest.raises(ValueError, match="flops has 2 values for 3 exits"):
        timm_exits.CachedExits(cached.logits, cached.labels, [1.0, 2.0], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        timm_exits.CachedExits(cached.logits, cached.labels[:5], cached.flops, cached.stages)
    with pytest.raises(ValueError, match=r"logits must be \(num_exits, N, C\)"):
        timm_exits.CachedExits(cached.logits[0], cached.labels, cached.flops, cached.stages)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("ensemble", [False, True], ids=["exit", "ensemble"])
def test_collect_calibrate_early_exit_end_to_end(criterion, ensemble):
    model = resnet()
    model.eval_output = "final"  # a model set up for plain evaluation still gives every exit here
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]
    cached = timm_exits.collect_exit_logits(model, data)
    assert cached.logits.shape == (3, 32, 5) and cached.labels.shape == (32,) and model.eval_output == "final"
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        model.eval_output = "all"
        torch.testing.assert_close(cached.logits, torch.stack(model(x)), rtol=1e-4, atol=1e-5)
        model.eval_output = "final"
    assert cached.flops == spent_per_exit(model).tolist()
    calibration = timm_exits.calibrate_thresholds(cached, (cached.flops[0] + cached.flops[-1]) / 2, criterion=criterion, ensemble=ensemble)
    result = model.early_exit(x, threshold=calibration, criterion=criterion, ensemble=ensemble)
    assert math.isclose(result.flops.double().mean().item(), calibration.flops, rel_tol=1e-6)
    assert math.isclose((result.logits.argmax(-1) == cached.labels).double().mean().item(), calibration.accuracy)
    assert result.exit_counts(3) == [round(s * 32) for s in calibration.exit_shares]


def test_plot_tradeoff_draws_the_curve_and_the_exits(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    backend = matplotlib.get_backend()
    cached = cached_digits_like()
    curve, anytime = timm_exits.budgeted_curve(cached, 5), timm_exits.anytime_accuracy(cached)
    fig = timm_exits.plot_tradeoff(curve, tmp_path / "tradeoff.png", anytime=anytime)
    assert type(fig).__name__ == "Figure" and matplotlib.get_backend() == backend  # returned, and the global backend untouched
    png = (tmp_path / "tradeoff.png").read_bytes()
    size = (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and size == (780, 540)  # 6.5 x 4.5 in at 120 dpi
    (ax,) = fig.axes
    (budgeted, exits) = ax.get_lines()
    exact = dict(rel=1e-12)
    assert budgeted.get_xdata() == pytest.approx([p.flops / 1e6 for p in curve], **exact)
    assert budgeted.get_ydata() == pytest.approx([100 * p.accuracy for p in curve], **exact)
    assert exits.get_xdata() == pytest.approx([p.flops / 1e6 for p in anytime], **exact)
    assert exits.get_ydata() == pytest.approx([100 * p.accuracy for p in anytime], **exact)
    assert ax.xaxis.get_gridlines()[0].get_alpha() == 0.3 and ax.get_legend()._loc == 4  # a light grid; the legend lower right
    assert (budgeted.get_marker(), budgeted.get_linestyle(), exits.get_marker(), exits.get_linestyle()) == ("o", "-", "s", "--")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["early exit, budgeted (MSDNet protocol)", "each exit alone (anytime)"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("average MFLOPs per sample", "accuracy (%)", "accuracy vs FLOPs")
    assert [t.get_text() for t in ax.texts] == [f"exit {k}" for k in range(1, len(anytime) + 1)]  # each exit labeled where it is drawn
    assert [c for t in ax.texts for c in t.xy] == pytest.approx([c for p in anytime for c in (p.flops / 1e6, 100 * p.accuracy)], **exact)
    fig = timm_exits.plot_tradeoff(curve, title="digits", points={"plain": (cached.flops[-1], 0.5)})  # no path: nothing written
    (ax,) = fig.axes
    (_, plain) = ax.get_lines()
    assert ax.get_title() == "digits" and plain.get_label() == "plain"
    assert (plain.get_xdata()[0], plain.get_ydata()[0]) == (cached.flops[-1] / 1e6, 50.0)
    low, high = ax.get_ylim()
    values = [100 * p.accuracy for p in curve] + [50.0]
    assert low <= min(values) and high >= max(values) and high - low >= 10  # everything shown, and never fewer than 10 points of accuracy


def test_plot_tradeoff_draws_into_a_given_axes_in_gflops_and_any_format(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figure = Figure()
    left, right = figure.subplots(1, 2)
    curve = [timm_exits.calibration.CurvePoint(f, a, f, [1.0], []) for f, a in [(1.2e9, 0.70), (2.4e9, 0.75), (4.6e9, 0.80)]]
    assert timm_exits.plot_tradeoff(curve, tmp_path / "vit.pdf", ax=right) is figure
    assert not left.get_lines() and right.get_lines()[0].get_xdata() == pytest.approx([1.2, 2.4, 4.6])
    assert right.get_xlabel() == "average GFLOPs per sample"
    assert (tmp_path / "vit.pdf").read_bytes()[:5] == b"%PDF-"


def test_plot_tradeoff_does_not_magnify_a_few_images_into_a_cliff():
    pytest.importorskip("matplotlib")
    # two images of 450
    curve = [timm_exits.calibration.CurvePoint(f, a, f, [1.0], []) for f, a in [(1e6, 0.9950), (2e6, 0.9956), (3e6, 0.9956)]]
    low, high = timm_exits.plot_tradeoff(curve).axes[0].get_ylim()
    assert high - low >= 10 and high <= 100


def test_plot_tradeoff_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"^plot_tradeoff needs matplotlib: pip install 'timm-exits\[demo\]'$"):
        timm_exits.plot_tradeoff([1], tmp_path / "x.png")


def named_score(z):
    return -z.logsumexp(-1)


def test_a_calibration_names_its_criterion():
    cached = cached_digits_like()
    assert timm_exits.calibrate_thresholds(cached, 150.0, criterion=named_score).criterion == "named_score"
    assert timm_exits.evaluate_thresholds(cached, 0.5, criterion=lambda z: z.amax(-1)).criterion == "<lambda>"

    class Score:  # a callable object has no __name__
        def __call__(self, z):
            return z.amax(-1)

    assert timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.05, criterion=Score()).criterion == "callable"
    assert timm_exits.calibrate_thresholds(cached, 150.0).ensemble is False  # the default decides on each exit alone
    assert timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.05, ensemble=True).ensemble is True
    torch.testing.assert_close(cached.confidences(), torch.stack([z.softmax(-1).amax(-1) for z in cached.logits]))
    assert torch.equal(cached.predictions(), cached.logits.argmax(-1))


def test_msdnet_thresholds_worked_by_hand():
    from timm_exits.calibration.thresholds import _msdnet_thresholds

    # q = 1: a third of the 9 samples leaves at each early exit, the most confident first
    conf = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.95, 0.85, 0.75, 0.65, 0.55, 0.45], [0.0] * 9])
    assert _msdnet_thresholds(conf, 1.0) == pytest.approx([0.7, 0.75])  # exit 1 takes samples 0-2, exit 2 samples 3-5
    # a tie at the threshold: both tied samples leave, and the next exit picks from the one left
    tied = torch.tensor([[0.9, 0.9, 0.1], [0.5, 0.4, 0.3], [0.0] * 3])
    assert _msdnet_thresholds(tied, 1.0) == pytest.approx([0.9, 0.3])
    # q = 3: shares 3/39, 9/39, 27/39; exit 1's is too small for one of 9 samples (inf), exit 2 still takes its 2
    assert _msdnet_thresholds(conf, 3.0) == [math.inf, pytest.approx(0.85)]


@pytest.mark.parametrize("ensemble", [False, True], ids=["exit", "ensemble"])
def test_accuracy_target_takes_the_cheapest_thresholds_that_meet_it(ensemble):
    cached = cached_digits_like(num_exits=4)
    final = (cached.logits[-1].argmax(-1) == cached.labels).double().mean().item()
    c = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.02, ensemble=ensemble)
    assert len(c.thresholds) == 3 and (c.criterion, c.ensemble) == ("max_prob", ensemble)
    decided_on = running_means(list(cached.logits)) if ensemble else list(cached.logits)
    scores = torch.cat([confidence(z, "max_prob") for z in decided_on[:-1]])
    for t in torch.quantile(scores.double(), torch.linspace(0, 1, 41, dtype=torch.float64)).tolist():  # one shared threshold
        accuracy, flops, _ = outcome(cached, [t] * 3, "max_prob", ensemble)
        if accuracy >= final - 0.02:
            assert c.flops <= flops + 1e-9, (t, accuracy, flops, c)
    assert timm_exits.calibrate_thresholds(cached, max_accuracy_drop=1.0).exit_shares[0] == 1.0  # any accuracy: all leave first


def test_calibration_messages_word_for_word():
    cached = cached_digits_like()
    with pytest.raises(ValueError, match=exactly("give exactly one of budget (average FLOPs per sample) or max_accuracy_drop")):
        timm_exits.calibrate_thresholds(cached)
    with pytest.raises(ValueError, match=exactly(
        "budget must be an average FLOPs per sample between the first exit's cost (101) and the full model's (301), got '150'"
    )):
        timm_exits.calibrate_thresholds(cached, "150")
    with pytest.raises(ValueError, match=exactly("max_accuracy_drop must be a fraction in [0, 1] (0.01 = one point), got '0.1'")):
        timm_exits.calibrate_thresholds(cached, max_accuracy_drop="0.1")
    with pytest.raises(ValueError, match=exactly("labels must be (N,) = (400,), got shape (5,)")):
        timm_exits.CachedExits(cached.logits, cached.labels[:5], cached.flops, cached.stages)
    with pytest.raises(ValueError, match=exactly(
            "logits hold one logit per sample (C = 1): thresholds read a prediction as the argmax over classes and a confidence "
            "from a softmax, both constant over one logit; cache two-class logits instead, "
            "torch.cat([torch.zeros_like(z), z], -1) (their softmax is sigmoid(z))")):
        timm_exits.CachedExits(cached.logits[..., :1], cached.labels * 0, cached.flops, cached.stages)


def test_defaults_and_argument_checks_of_early_exit(recwarn):
    model = resnet()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        outputs = model(x)
    _, index = select(outputs, [0.9, 0.9])
    default = model.early_exit(x)
    assert torch.equal(default.exit_index, index)  # threshold 0.9 on the top probability of each exit alone
    torch.testing.assert_close(default.logits, torch.stack(outputs)[index, torch.arange(6)], rtol=1e-4, atol=1e-5)  # not the ensemble
    direct = timm_exits.early_exit(model, x)
    assert torch.equal(direct.exit_index, index) and torch.equal(direct.logits, default.logits)
    sharp = [z / 1e-3 for z in outputs[:-1]] + [outputs[-1]]  # at temperature 1e-3 some samples pass 0.9 early
    _, index = select(sharp, [0.9, 0.9])
    assert torch.equal(model.early_exit(x, temperature=[1e-3, 1e-3, 1.0]).exit_index, index) and index.min() == 0
    assert torch.equal(timm_exits.early_exit(model, x, temperature=[1e-3, 1e-3, 1.0]).exit_index, index)  # the function's own default
    assert torch.equal(model.early_exit(x, threshold=torch.tensor([0.25, 0.3])).exit_index, select(outputs, [0.25, 0.3])[1])
    with pytest.raises(ValueError, match=exactly("thresholds must be numbers (inf allowed, NaN not), got [True, 0.5]")):
        model.early_exit(x, threshold=[True, 0.5])
    with pytest.raises(TypeError, match=exactly("early_exit needs a MultiExitModel (timm_exits.wrap(...)), got ResNet")):
        timm_exits.early_exit(model.backbone, x)
    with pytest.raises(ValueError, match=exactly("x must be a batch tensor (B, ...), got str")):
        model.early_exit("images")
    with pytest.raises(ValueError, match=exactly("x must be a batch tensor (B, ...), got torch.Size([3])")):
        model.early_exit(torch.randn(3))
    with pytest.raises(ValueError, match=exactly(
            "x of shape (3, 32, 32) has no batch dimension: the model takes (B, 3, 224, 224); for one image, x.unsqueeze(0)")):
        model.early_exit(x[0])
    with pytest.raises(ValueError, match=exactly("x of shape (6, 1, 32, 32) has 1 channel; the model's first layer (conv1) expects 3")):
        model.early_exit(x[:, :1])
    one_logit = timm_exits.wrap(timm.create_model("resnet10t", num_classes=1), stages=[1], input_size=(3, 32, 32)).eval()
    with pytest.raises(ValueError, match=exactly(
            "criterion='margin' reads a softmax, which is always 1 over one logit (every sample would leave at exit 1); "
            "pass a callable criterion, e.g. lambda z: (z.sigmoid() - 0.5).abs().squeeze(1)")):
        one_logit.early_exit(x, criterion="margin")
    with pytest.raises(RuntimeError,
                       match=exactly("early_exit runs in eval mode (batch norm statistics, dropout); call model.eval() first")):
        model.train().early_exit(x)
    # a calibration made for a callable criterion is used with it
    cached = timm_exits.collect_exit_logits(model.eval(), [(x, torch.zeros(6, dtype=torch.long))])
    calibration = timm_exits.calibrate_thresholds(cached, (cached.flops[0] + cached.flops[-1]) / 2, criterion=named_score)
    counts = model.early_exit(x, threshold=calibration, criterion=named_score).exit_counts(3)
    assert counts == [round(s * 6) for s in calibration.exit_shares]


def test_exit_confidence_on_its_own():
    from timm_exits.runtime import exit_confidence

    z = torch.tensor([[math.log(5), math.log(3), 0.0, 0.0]])  # p = (.5, .3, .1, .1), one sample
    torch.testing.assert_close(exit_confidence(z), torch.tensor([0.5]))  # max_prob by default
    torch.testing.assert_close(exit_confidence(z, "margin"), torch.tensor([0.2]))
    torch.testing.assert_close(exit_confidence(torch.zeros(3, 1), "margin"), torch.ones(3))  # one class: nothing to be unsure about
    with pytest.raises(ValueError, match=exactly("the criterion callable must return one score per sample, shape (1,); it returned float")):
        exit_confidence(z, lambda logits: 0.5)
    with pytest.raises(ValueError, match=exactly(
        "unknown criterion 'top1'; use one of ('max_prob', 'entropy', 'margin', 'patience') or a callable (logits) -> (B,) confidence"
    )):
        exit_confidence(z, "top1")
    with pytest.raises(ValueError, match=exactly(
            "the patience criterion reads the exits before this one (how long the prediction has held): "
            "use patience_streaks on every exit's logits")):
        exit_confidence(z, "patience")


def test_a_patience_calibration_may_hold_a_count_between_whole_ones():
    # a shared threshold is a quantile of the streaks, which interpolates (1.5 takes streaks of 2 and more): what a
    # calibration found is used as it is, where a count given by hand must be whole
    cached = cached_digits_like()
    calibration = timm_exits.Calibration([1.5, 1.5], "patience", False, 0.0, 0.0, [0.0, 0.0, 1.0])
    found = timm_exits.evaluate_thresholds(cached, calibration, criterion="patience")
    whole = timm_exits.evaluate_thresholds(cached, [2, 2], criterion="patience")
    assert (found.accuracy, found.flops, found.exit_shares) == (whole.accuracy, whole.flops, whole.exit_shares)
    with pytest.raises(ValueError, match=exactly(
            "patience must be a whole number of exits from 1 to 2 (the last exit takes every sample left; inf keeps everyone going), "
            "got 1.5")):
        timm_exits.evaluate_thresholds(cached, [1.5, 2], criterion="patience")


def test_fallback_warning_points_at_the_caller_and_bf16_keeps_its_dtype():
    model = fallback_resnet()
    x = torch.randn(4, 3, 32, 32)
    with pytest.warns(UserWarning, match="every exit is computed") as caught:
        timm_exits.early_exit(model, x, threshold=0.5)
    assert caught[0].filename != timm_exits.runtime.criteria.__file__  # the caller's line, not the library's (stacklevel)
    assert str(caught[0].message) == ("this model runs through forward_intermediates (fx could not trace it): "
                                      "every exit is computed, then one is selected")
    traced = resnet()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ensemble in (False, True):
            assert traced.early_exit(x, threshold=[0.0, math.inf], ensemble=ensemble).logits.dtype == torch.bfloat16
            assert traced.early_exit(x, threshold=math.inf, ensemble=ensemble).logits.dtype == torch.bfloat16


class Float64(nn.Module):
    def forward(self, x):
        return x.double()


def test_only_a_built_in_confidence_at_inf_is_known_to_pass_nobody():
    from timm_exits.runtime.criteria import passes_nobody

    assert passes_nobody(math.inf, "max_prob") and passes_nobody(math.inf, "margin")
    assert not passes_nobody(0.99, "max_prob")
    assert not passes_nobody(math.inf, "patience")  # the streaks must still be counted for the exits after
    assert not passes_nobody(math.inf, lambda z: z.amax(-1))  # a callable's score may be inf


@pytest.mark.parametrize("ensemble", [False, True, "geometric"])
def test_exits_of_different_dtypes_give_the_first_exits_dtype(ensemble):
    # a head of the user's may return another dtype than the backbone's own (a float32 head under bf16 autocast; here a
    # float64 one at the first exit): the result takes the first exit's dtype, whichever exit each sample leaves at
    model, x = resnet10t_exits(images=8)
    model.exits[0] = nn.Sequential(model.exits[0], Float64())
    ensemble = timm_exits.GeometricEnsemble(3, 5) if ensemble == "geometric" else ensemble
    with torch.no_grad():
        outputs = model(x)
    half = threshold_between(confidence(outputs[0], "max_prob"))
    for thresholds, left in (([math.inf, math.inf], {2}), ([math.inf, 0.0], {1}), ([half, 0.0], {0, 1}), ([half, math.inf], {0, 2})):
        result = model.early_exit(x, threshold=thresholds, ensemble=ensemble)
        assert result.logits.dtype == torch.float64 and result.logits.shape == (8, 5)
        if ensemble is False:
            assert set(result.exit_index.tolist()) == left
            logits, index = select(outputs, thresholds)
            assert torch.equal(result.exit_index, index) and torch.equal(result.logits, logits)
            streamed = timm_exits.early_exit_stream(model, [x[:3], x[3:]], threshold=thresholds, batch_size=4)
            assert torch.equal(streamed.exit_index, index) and torch.equal(streamed.logits, logits)


class ReusedOutput(nn.Module):
    """Hands out one output buffer, overwritten by each call, as a compiled step (CUDA graphs) does."""

    def __init__(self):
        super().__init__()
        self.out = None

    def forward(self, x):
        if self.out is None or self.out.shape != x.shape:
            self.out = torch.empty_like(x)
        return self.out.copy_(x)


def test_a_result_outlives_the_next_call_of_a_step_that_reuses_its_output():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet10t", num_classes=5)
    backbone.fc = nn.Sequential(backbone.fc, ReusedOutput())
    model = timm_exits.wrap(backbone, stages=[1, 2], input_size=(3, 32, 32), leaf_modules=[ReusedOutput]).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        last = torch.cat([model(x[:4])[-1].clone(), model(x[4:])[-1].clone()])
    first = model.early_exit(x[:4], threshold=math.inf)  # nobody leaves early: the last exit's logits are the result
    model.early_exit(x[4:], threshold=math.inf)
    assert torch.equal(first.logits, last[:4])
    streamed = timm_exits.early_exit_stream(model, [x[:4], x[4:]], threshold=math.inf)  # each batch's last exit is kept
    assert torch.equal(streamed.logits, last)


def test_early_exit_keeps_channels_last_for_the_rows_that_stay():
    """The rows that stay were gathered into a contiguous tensor, which the next segment converted back."""
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2], input_size=(3, 32, 32)).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        threshold = [timm_exits.runtime.exit_confidence(z).median().item() for z in model(x)[:-1]]
    plain = timm_exits.early_exit(model, x, threshold=threshold)
    model = model.to(memory_format=torch.channels_last)
    seen = []
    model.backbone.layer3[0].conv1.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].shape[0], args[0].is_contiguous(memory_format=torch.channels_last))))
    result = timm_exits.early_exit(model, x.contiguous(memory_format=torch.channels_last), threshold=threshold)
    assert seen and all(last for _, last in seen) and 0 < seen[-1][0] < 16, seen  # layer3 ran on the rows that stayed, in channels_last
    assert torch.equal(result.exit_index, plain.exit_index)
    torch.testing.assert_close(result.logits, plain.logits, rtol=1e-4, atol=1e-5)
