"""profile_exits: each segment and head timed apart; the speedup it predicts follows from the parts (no timing asserted)."""

import pytest
import timm
import torch

import timm_exits
from conftest import exactly
from timm_exits.cost import ExitProfile, profile_exits


def test_a_profile_has_one_part_per_segment_and_head_and_restores_the_mode():
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2, 3], input_size=(3, 32, 32)).train()
    model.exits[0].eval()
    profile = profile_exits(model, torch.randn(8, 3, 32, 32), repeats=2)
    assert profile.batch_size == 8 and profile.stages == ["layer1", "layer2", "layer3", "final"] and profile.device == "cpu"
    assert len(profile.segment_seconds) == 4 and profile.head_seconds[-1] == 0.0 and min(profile.head_seconds[:3]) > 0
    parts = [s + h for s, h in zip(profile.segment_seconds, profile.head_seconds)]
    assert profile.seconds == pytest.approx([sum(parts[: k + 1]) / 8 for k in range(4)])  # leaving at exit k: the parts up to k, per sample
    assert model.training and not model.exits[0].training and model.exits[1].training


def test_callables_beside_the_profile_are_timed_in_its_rounds_and_each_round_is_a_profile():
    """beside=: a measured speedup and the prediction from the same rounds; rounds() gives each round's
    profile, whose medians are the profile's."""
    import statistics

    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2], input_size=(3, 32, 32)).eval()
    x = torch.randn(4, 3, 32, 32)
    calls = []
    beside = {
        "plain": lambda: calls.append("plain") or model.backbone(x),
        "early exit": lambda: calls.append("early exit") or model.early_exit(x, threshold=0.5),
    }
    profile = profile_exits(model, x, repeats=3, beside=beside)
    assert calls == ["plain", "early exit"] * 4  # a warm-up round and three timed ones; "plain" is not taken by the profile's own part
    assert set(profile.beside_seconds) == {"plain", "early exit"} and min(profile.beside_seconds.values()) > 0
    rounds = profile.rounds()
    assert len(rounds) == 3 and all(r.round_seconds == {} and r.repeats == 1 and r.rounds() == [r] for r in rounds)
    for k in range(3):
        assert profile.segment_seconds[k] == statistics.median(r.segment_seconds[k] for r in rounds)
        assert profile.head_seconds[k] == statistics.median(r.head_seconds[k] for r in rounds)
    assert profile.plain_seconds == statistics.median(r.plain_seconds for r in rounds)
    assert profile.beside_seconds == {name: statistics.median(r.beside_seconds[name] for r in rounds) for name in beside}
    assert profile_exits(model, x, repeats=1).beside_seconds == {}
    handmade = ExitProfile(4, ["a", "final"], [0.1, 0.1], [0.01, 0.0], 0.2, "cpu", 2)
    with pytest.raises(ValueError, match=exactly(
        "this profile of 2 rounds keeps no round's seconds (profile_exits keeps them; one made by hand does not)"
    )):
        handmade.rounds()
    with pytest.raises(TypeError, match=exactly("beside must be a dict of names to callables taking no argument, got list")):
        profile_exits(model, x, beside=["plain"])
    with pytest.raises(TypeError, match=exactly("beside['b'] must be a callable taking no argument, got int")):
        profile_exits(model, x, beside={"a": lambda: None, "b": 3})


def test_each_round_pairs_its_own_parts_with_its_own_beside_times(monkeypatch):
    """rounds(): round r's parts and callables beside are the ones timed in round r (a clock that counts calls tells them apart)."""
    import itertools

    import timm_exits.cost.profile as profile_module

    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2], input_size=(3, 32, 32)).eval()
    ticks = itertools.count()
    monkeypatch.setattr(profile_module, "_timed", lambda fn, sync: (fn(), float(next(ticks)))[1])
    profile = profile_exits(model, torch.randn(2, 3, 32, 32), repeats=4, beside={"a": lambda: None, "b": lambda: None})
    per_round = 1 + 3 + 2 + 2  # plain, 3 segments, 2 heads, 2 beside
    for r, one in enumerate(profile.rounds()):
        seen = [one.plain_seconds, *one.segment_seconds, *one.head_seconds[:2], *one.beside_seconds.values()]
        assert sorted(seen) == [float(t) for t in range(per_round * (r + 1), per_round * (r + 2))]  # round 0 is the warm-up, not kept


def test_a_failing_callable_beside_the_profile_leaves_the_model_as_it_was():
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1], input_size=(3, 32, 32)).train()
    model.exits[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}

    def broken():
        raise RuntimeError("the caller's run breaks")

    with pytest.raises(RuntimeError, match="the caller's run breaks"):
        profile_exits(model, torch.randn(2, 3, 32, 32), beside={"broken": broken})
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_the_predicted_speedup_is_the_plain_time_over_the_shares_of_each_exit_cost():
    profile = ExitProfile(batch_size=4, stages=["a", "b", "final"], segment_seconds=[0.4, 0.2, 0.2], head_seconds=[0.04, 0.04, 0.0],
                          plain_seconds=0.8, device="cpu", repeats=1)
    per_sample = [0.44 / 4, 0.68 / 4, 0.88 / 4]
    assert profile.seconds == pytest.approx(per_sample)
    expected = 0.2 / (0.5 * per_sample[0] + 0.25 * per_sample[1] + 0.25 * per_sample[2])
    assert profile.predicted_speedup([0.5, 0.25, 0.25]) == pytest.approx(expected)
    assert profile.predicted_speedup([0, 0, 1]) == pytest.approx(0.8 / 0.88)  # nobody leaves: the heads are pure cost
    with pytest.raises(ValueError, match=exactly("exit_shares must be 3 non-negative shares, one per exit, summing to 1; got [0.5, 0.5]")):
        profile.predicted_speedup([0.5, 0.5])
    with pytest.raises(ValueError, match=r"^exit_shares must be 3 non-negative shares"):
        profile.predicted_speedup([float("nan"), 0.5, 0.5])


def test_bad_input_is_named():
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1], input_size=(3, 32, 32))
    with pytest.raises(TypeError, match=exactly("model must be a MultiExitModel (timm_exits.wrap(...)), got ResNet")):
        profile_exits(model.backbone, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=exactly("repeats must be an int >= 1, got 0")):
        profile_exits(model, torch.randn(2, 3, 32, 32), repeats=0)
    with pytest.raises(ValueError, match=r"^example_input of shape \(2, 1, 32, 32\) has 1 channel"):
        profile_exits(model, torch.randn(2, 1, 32, 32))


def test_a_time_budget_is_met_on_the_profiles_own_costs():
    """calibrate_thresholds(costs=profile): the budget in seconds per sample, met on the cached data, as a FLOPs budget is."""
    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2], input_size=(3, 32, 32)).eval()
    x = torch.randn(24, 3, 32, 32)
    cached = timm_exits.collect_exit_logits(model, [(x, torch.randint(0, 10, (24,)))])
    # made up: the rule, not the clock, is under test
    profile = ExitProfile(batch_size=8, stages=["layer1", "layer2", "final"], segment_seconds=[0.004, 0.002, 0.002],
                          head_seconds=[0.0004, 0.0004, 0.0], plain_seconds=0.008, device="cpu", repeats=1)
    seconds = profile.seconds
    for budget in (seconds[0], (seconds[0] + seconds[-1]) / 2, seconds[-1]):
        calibration = timm_exits.calibrate_thresholds(cached, budget, costs=profile)
        spent = sum(share * cost for share, cost in zip(calibration.exit_shares, seconds))
        assert calibration.cost == pytest.approx(spent) and spent <= budget + 1e-15
        flops = sum(share * cost for share, cost in zip(calibration.exit_shares, cached.flops))
        assert calibration.flops == pytest.approx(flops)  # flops stay FLOPs
    curve = timm_exits.budgeted_curve(cached, 4, costs=profile)
    assert [p.budget for p in curve] == pytest.approx([seconds[0] + (seconds[-1] - seconds[0]) * i / 3 for i in range(4)])
    assert timm_exits.calibrate_thresholds(cached, cached.flops[-1]).cost is None


@pytest.mark.parametrize("costs, message", [
    ([1.0, 2.0], "costs has 2 values; give one per exit (3): what a sample leaving there costs"),
    ([1.0, 3.0, 2.0], "costs must not decrease from exit to exit (leaving later computes more), got [1.0, 3.0, 2.0]"),
    ([1.0, 0.0, 2.0], "costs must be finite numbers > 0, got [1.0, 0.0, 2.0]"),
    (ExitProfile(1, ["layer1", "layer3", "final"], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 3.0, "cpu", 1),
     "costs is a profile of a model with exits at ['layer1', 'layer3', 'final'], "
     "the cached exits are at ['layer1', 'layer2', 'final']: profile the same model"),
])
def test_bad_costs_are_named(costs, message):
    cached = timm_exits.CachedExits(torch.randn(3, 4, 5), torch.zeros(4, dtype=torch.long), [1.0, 2.0, 3.0], ["layer1", "layer2", "final"])
    with pytest.raises(ValueError, match=exactly(message)):
        timm_exits.calibrate_thresholds(cached, 1.5, costs=costs)


def test_a_failing_profile_or_drawing_leaves_the_model_as_it_was():
    """profile_exits and describe_exits switch the model to eval and run it: a failure mid-way gives every mode back and adds no hook."""
    from torch import nn

    from timm_exits.plots import describe_exits

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("the second head breaks")

    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1, 2], input_size=(3, 32, 32)).train()
    model.exits[1] = Broken()
    model.exits[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="the second head breaks"):
        profile_exits(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="the second head breaks"):
        describe_exits(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_host_syncs_counts_the_ops_that_read_the_device_on_the_host():
    x = torch.randn(6, 3)
    with timm_exits.host_syncs() as syncs:
        y = x.exp().sum(0) * 2  # stays on the device
        x.sum().item()
        bool(x.max() > 0)
        x.nonzero()
        x[x > 0]
        x.masked_select(x > 0)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # the size is given: no read
        torch.arange(3) + torch.ones(3)  # made on the device
        torch.arange(3).bincount(minlength=5)  # its length is the largest value: read on the host
        z = torch.zeros(6)
        z[torch.arange(2)] = 3  # a Python number written into a tensor travels by value (torch lifts it into a 0-d tensor first)
        z[-1], z[1:3] = 1.0, 2.0
        z.masked_fill_(z > 2, 0.0)
        z.fill_(1.0)
        z * torch.tensor(2.0)  # one number built into a tensor: on a GPU, a copy from the host
    assert dict(syncs.counts) == {"_local_scalar_dense": 2, "nonzero": 1, "index (boolean mask)": 1, "masked_select": 1,
                                  "repeat_interleave": 1, "tensor from host data": 3,  # torch.tensor([1, 2]) twice and torch.tensor(2.0)
                                  "bincount": 1}
    assert syncs.total == 10 and y.shape == (3,)


