"""Early exit: samples that are confident stop, the rest go on; thresholds meet a budget."""
import math

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import timm_exits
from timm_exits.inference import exit_confidence


def resnet(seed=0):
    torch.manual_seed(seed)
    return timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2]).eval()


def vit(seed=0):
    torch.manual_seed(seed)
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32)
    return timm_exits.wrap(backbone, stages=[3, 6, 9]).eval()


def select(outputs, thresholds, criterion="max_prob"):
    """The reference: compute every exit, then each sample takes the first that passes."""
    exits = []
    for i in range(outputs[0].shape[0]):
        k = next((k for k, t in enumerate(thresholds) if exit_confidence(outputs[k][i : i + 1], criterion).item() >= t), len(outputs) - 1)
        exits.append(k)
    index = torch.tensor(exits)
    return torch.stack([outputs[k][i] for i, k in enumerate(exits)]), index


@pytest.mark.parametrize("build", [resnet, vit], ids=["resnet18", "vit_tiny"])
@pytest.mark.parametrize("batch", [1, 17])
def test_early_exit_equals_computing_every_exit_and_selecting(build, batch):
    model = build()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model(x)
    # thresholds at the median confidence of each exit: a mix of samples leaves at every exit
    thresholds = [exit_confidence(z).median().item() for z in outputs[:-1]]
    result = model.early_exit(x, threshold=thresholds)
    logits, index = select(outputs, thresholds)
    assert torch.equal(result.exit_index, index)
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)
    if batch == 17:
        assert len(set(index.tolist())) > 1
    # nobody passes: everyone gets the final exit; everybody passes: everyone leaves at exit 1
    none = model.early_exit(x, threshold=math.inf)
    assert (none.exit_index == model.num_exits - 1).all()
    torch.testing.assert_close(none.logits, outputs[-1], rtol=1e-4, atol=1e-5)
    everyone = model.early_exit(x, threshold=0.0)
    assert (everyone.exit_index == 0).all()
    torch.testing.assert_close(everyone.logits, outputs[0], rtol=1e-4, atol=1e-5)


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
    thresholds = [exit_confidence(z).quantile(0.6).item() for z in outputs[:-1]]
    result = model.early_exit(x, threshold=thresholds)
    counts = result.exit_counts(model.num_exits)
    assert counts[0] > 0 and counts[-1] > 0

    # what one sample costs in each segment and head, counted by torch on the operations run
    one = x[:1]
    segments, per_segment, per_head, state = model.segments(), [], [], (one,)
    with torch.no_grad():
        for segment, head in zip(segments[:-1], model.exits):
            per_segment.append(executed_flops(lambda: segment(*state)))
            feature, state = segment(*state)
            per_head.append(executed_flops(lambda: head(feature)))
        per_segment.append(executed_flops(lambda: segments[-1](*state)))
    running = [16 - sum(counts[:k]) for k in range(model.num_exits)]  # samples that entered segment k
    expected = sum(n * (s + h) for n, s, h in zip(running, per_segment, per_head + [0]))
    assert executed_flops(lambda: model.early_exit(x, threshold=thresholds)) == expected
    assert expected < 16 * (sum(per_segment) + sum(per_head))


def test_anytime_ensemble_option_equals_selecting_on_the_ensembles():
    model = resnet()
    x = torch.randn(17, 3, 32, 32)
    with torch.no_grad():
        ensembles = timm_exits.anytime_ensemble(model(x))
    thresholds = [exit_confidence(z).median().item() for z in ensembles[:-1]]
    result = model.early_exit(x, threshold=thresholds, ensemble=True)
    logits, index = select(ensembles, thresholds)
    assert torch.equal(result.exit_index, index)
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["entropy", "margin", lambda z: -z.logsumexp(-1)])
def test_other_criteria(criterion):
    model = resnet()
    x = torch.randn(17, 3, 32, 32)
    with torch.no_grad():
        outputs = model(x)
    scores = [exit_confidence(z, criterion) for z in outputs[:-1]]
    thresholds = [s.median().item() for s in scores]
    if criterion == "entropy":  # thresholds on the entropy itself: leave when H <= t
        user = [-t for t in thresholds]
        result = model.early_exit(x, threshold=user, criterion="entropy")
    else:
        result = model.early_exit(x, threshold=thresholds, criterion=criterion)
    _, index = select(outputs, thresholds, criterion)
    assert torch.equal(result.exit_index, index)


def test_inference_mode_and_mode_errors():
    model = resnet()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        result = model.early_exit(x, threshold=0.5)
    assert result.logits.shape == (3, 5)
    model.train()
    with pytest.raises(RuntimeError, match="call model.eval"):
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


def cached_digits_like(num_exits=3, n=400, classes=5, seed=0):
    """Cached exits whose later exits are more accurate and more confident, like a trained model."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = []
    for k in range(num_exits):
        z = torch.randn(n, classes, generator=g)
        z[torch.arange(n), labels] += 1.0 + 1.5 * k
        logits.append(z)
    return timm_exits.CachedExits(torch.stack(logits), labels, [100.0 * (k + 1) + 1 for k in range(num_exits)], [f"s{k}" for k in range(num_exits)])


def test_calibrated_thresholds_meet_the_budget_on_their_data():
    cached = cached_digits_like()
    for budget in (101.0, 150.0, 200.0, 250.0, 301.0):
        c = timm_exits.calibrate_thresholds(cached, budget)
        assert c.flops <= budget + 1e-9
        again = timm_exits.evaluate_thresholds(cached, c.thresholds)
        assert again.flops == c.flops and again.accuracy == c.accuracy
        assert math.isclose(sum(c.exit_shares), 1.0)
    assert timm_exits.calibrate_thresholds(cached, 301.0).exit_shares[-1] == 1.0


def test_budgeted_curve_is_monotone_and_anytime_accuracy_rises():
    cached = cached_digits_like()
    curve = timm_exits.budgeted_curve(cached, budgets=10)
    flops = [p.flops for p in curve]
    assert all(p.flops <= p.budget + 1e-9 for p in curve)
    assert flops == sorted(flops)
    assert curve[-1].accuracy > curve[0].accuracy
    anytime = timm_exits.anytime_accuracy(cached)
    assert [p.flops for p in anytime] == cached.flops
    assert [p.accuracy for p in anytime] == sorted(p.accuracy for p in anytime)
    held_out = cached_digits_like(seed=1)
    on_test = timm_exits.budgeted_curve(cached, budgets=10, evaluate_on=held_out)
    assert [p.thresholds for p in on_test] == [p.thresholds for p in curve]
    assert on_test[-1].accuracy == timm_exits.anytime_accuracy(held_out)[-1].accuracy
    with pytest.raises(ValueError, match="evaluate_on has 4 exits"):
        timm_exits.budgeted_curve(cached, evaluate_on=cached_digits_like(num_exits=4))


def test_accuracy_target_is_met_at_less_cost():
    cached = cached_digits_like()
    final = timm_exits.anytime_accuracy(cached)[-1].accuracy
    c = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.01)
    assert c.accuracy >= final - 0.01 and c.flops < cached.flops[-1]
    strict = timm_exits.calibrate_thresholds(cached, max_accuracy_drop=0.0)
    assert strict.accuracy >= final and strict.flops >= c.flops


def test_calibration_bad_input():
    cached = cached_digits_like()
    with pytest.raises(ValueError, match="between the first exit's cost"):
        timm_exits.calibrate_thresholds(cached, 50.0)
    with pytest.raises(ValueError, match="between the first exit's cost"):
        timm_exits.calibrate_thresholds(cached, 1e6)
    with pytest.raises(ValueError, match="exactly one of"):
        timm_exits.calibrate_thresholds(cached)
    with pytest.raises(ValueError, match="one per early exit \\(2"):
        timm_exits.evaluate_thresholds(cached, [0.5, 0.5, 0.5])
    four = timm_exits.calibrate_thresholds(cached_digits_like(num_exits=4), 250.0)
    with pytest.raises(ValueError, match="one per early exit \\(2"):
        resnet().early_exit(torch.randn(2, 3, 32, 32), threshold=four)
    with pytest.raises(ValueError, match="flops has 2 values for 3 exits"):
        timm_exits.CachedExits(cached.logits, cached.labels, [1.0, 2.0], ["a", "b", "c"])


def test_collect_calibrate_early_exit_end_to_end(tmp_path):
    model = resnet()
    model.eval_output = "final"  # a model set up for plain evaluation still gives every exit here
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))) for _ in range(4)]
    cached = timm_exits.collect_exit_logits(model, data)
    assert cached.logits.shape == (3, 32, 5) and cached.labels.shape == (32,)
    calibration = timm_exits.calibrate_thresholds(cached, (cached.flops[0] + cached.flops[-1]) / 2)
    x = torch.cat([b[0] for b in data])
    result = model.early_exit(x, threshold=calibration)
    assert math.isclose(result.flops.double().mean().item(), calibration.flops, rel_tol=1e-6)
    pytest.importorskip("matplotlib")
    path = timm_exits.plot_tradeoff(timm_exits.budgeted_curve(cached, 5), tmp_path / "tradeoff.png", anytime=timm_exits.anytime_accuracy(cached))
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000 and path.endswith(".png")
