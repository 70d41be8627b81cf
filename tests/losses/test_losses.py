"""Every loss against its formula, recomputed here by hand; detaching, schedules, targets, bad input."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

import timm_exits
from conftest import exactly
from timm_exits import (
    AppropriateTeachersLoss,
    DistillationBasedLoss,
    EnsembleKnowledgeDistillationLoss,
    ExitEnsembleLoss,
    MultiExitCELoss,
    MultiSelfDistillationLoss,
    SelfDistillationLoss,
    create_loss,
)

N, B, C = 4, 6, 5


def logits(seed=0, n=N, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, C, generator=g) * 2).requires_grad_(requires_grad) for _ in range(n)]


def labels(seed=1):
    return torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(seed))


# -- the formulas, written out independently of the library ------------------------------------


def ce(z, y):
    return -(z.log_softmax(1)[torch.arange(len(y)), y]).mean()


def kd(z, teacher_logits, T):
    """T^2 KL(softmax(t/T) || softmax(z/T)), the teacher detached; mean over the batch."""
    p = (teacher_logits.detach() / T).softmax(1)
    return T * T * (p * (p.log() - (z / T).log_softmax(1))).sum(1).mean()


def close(a, b):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def grads(loss, zs):
    return torch.autograd.grad(loss, zs, allow_unused=True)


def test_multi_exit_ce_fixed_weights_and_sdn_ramp():
    z, y = logits(), labels()
    w = [0.5, 1.0, 2.0, 1.5]
    assert close(MultiExitCELoss(weights=w)(z, y), sum(wi * ce(zi, y) for wi, zi in zip(w, z)))
    loss = MultiExitCELoss(schedule="sdn", epochs=10, depths=[0.15, 0.45, 0.75])
    for epoch in (0, 3, 9):
        loss.set_epoch(epoch)
        ramp = [min(c, 0.01 + (epoch + 1) * c / 10) for c in (0.15, 0.45, 0.75)] + [1.0]
        assert close(loss(z, y), sum(r * ce(zi, y) for r, zi in zip(ramp, z)))
    assert loss.current_weights(N) == pytest.approx([0.15, 0.45, 0.75, 1.0])  # the ramp tops out at C_i
    ramp = [0.01 + 0.25 / 4, 0.01 + 0.5 / 4, 0.01 + 0.75 / 4]
    assert MultiExitCELoss(schedule="sdn", epochs=4).current_weights(4)[:3] == pytest.approx(ramp)


@pytest.mark.parametrize("T", ["adaptive", 4.0])
def test_distillation_based_formula_and_detached_teacher(T):
    z, y = logits(), labels()
    loss_fn = DistillationBasedLoss(C=0.5, temperature=T)
    t = 1.0 if T == "adaptive" else T
    expected = 0.5 * sum(ce(zi, y) for zi in z) + 0.5 * sum(kd(zi, z[-1], t) for zi in z[:-1])
    assert close(loss_fn(z, y), expected)
    # with C = 1 the final exit is only a teacher: no gradient reaches it
    g = grads(DistillationBasedLoss(C=1.0, temperature=T)(z, y), z)
    assert g[-1] is None or g[-1].abs().max() == 0
    assert all(gi.abs().max() > 0 for gi in g[:-1])


def test_adaptive_temperature_rises_only_as_specified():
    loss_fn = DistillationBasedLoss()
    y = labels()
    unsure = [torch.zeros(B, C) for _ in range(N)]  # teacher max-prob 1/C = 0.2 <= 0.5
    sure = [torch.eye(C)[y] * 20 for _ in range(N)]  # teacher max-prob ~1 > 0.5
    loss_fn(unsure, y)
    assert float(loss_fn.temperature) == 1.0
    loss_fn(sure, y)
    loss_fn(sure, y)
    assert float(loss_fn.temperature) == pytest.approx(1.05**2)
    with torch.no_grad():  # a validation pass does not move it
        loss_fn(sure, y)
    loss_fn.eval()
    loss_fn(sure, y)
    assert float(loss_fn.temperature) == pytest.approx(1.05**2)
    assert loss_fn.components["temperature"] == pytest.approx(1.05**2)
    resumed = DistillationBasedLoss()
    resumed.load_state_dict(loss_fn.state_dict())
    assert float(resumed.temperature) == pytest.approx(1.05**2)
    fixed = DistillationBasedLoss(temperature=4.0)
    fixed(sure, y)
    assert float(fixed.temperature) == 4.0


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_exit_ensemble_formula(distance):
    z, y = logits(), labels()
    e = torch.stack(z).mean(0).detach()
    if distance == "mse":
        d = sum(((zi - e) ** 2).mean() for zi in z)
    else:
        d = 0.1 * sum(kd(zi, e, 3.0) for zi in z)
    assert close(ExitEnsembleLoss(distance=distance)(z, y), sum(ce(zi, y) for zi in z) + d)


def test_exit_ensemble_teacher_is_detached():
    z, y = logits(), labels()
    g = grads(ExitEnsembleLoss()(z, y), z)
    e = torch.stack(z).mean(0).detach()
    for zi, gi in zip(z, g):  # each exit's gradient is that of its own terms, the ensemble a constant
        own = ce(zi, y) + ((zi - e) ** 2).mean()
        assert torch.allclose(gi, torch.autograd.grad(own, zi)[0], atol=1e-6)


def test_exit_ensemble_feature_term_with_masked_mse():
    z, y = logits(), labels()
    g = torch.Generator().manual_seed(3)
    f = [torch.randn(B, 8, generator=g).requires_grad_() for _ in range(N)]
    out = timm_exits.ExitOutputs(z, f)
    tf = torch.stack(f).mean(0).detach()
    feat = sum((((fi - tf) ** 2) * ((fi > 0) | (tf > 0))).mean() for fi in f)
    expected = sum(ce(zi, y) for zi in z) + sum(((zi - torch.stack(z).mean(0).detach()) ** 2).mean() for zi in z) + 0.5 * feat
    loss_fn = ExitEnsembleLoss(feature_weight=0.5)
    assert close(loss_fn(out, y), expected)
    assert close(loss_fn.components["feature"].sum(), feat)


def test_byot_formula_and_hints():
    z, y = logits(), labels()
    g = torch.Generator().manual_seed(3)
    f = [torch.randn(B, 8, generator=g).requires_grad_() for _ in range(N)]
    a, T, b = 0.3, 3.0, 0.05
    expected = ce(z[-1], y) + sum((1 - a) * ce(zi, y) + a * kd(zi, z[-1], T) for zi in z[:-1])
    assert close(SelfDistillationLoss()(z, y), expected)
    hint = sum(((fi - f[-1].detach()) ** 2).mean() for fi in f[:-1])
    loss = SelfDistillationLoss(feature_weight=b)(timm_exits.ExitOutputs(z, f), y)
    assert close(loss, expected + b * hint)
    gz, gf = grads(loss, z[-1:]), grads(loss, f[-1:])
    assert torch.allclose(gz[0], torch.autograd.grad(ce(z[-1], y), z[-1])[0], atol=1e-6)  # the teacher only learns from labels
    assert gf[0] is None or gf[0].abs().max() == 0  # the final feature is the hint target, detached
    # the authors' code has no T^2 factor
    plain = SelfDistillationLoss(t_squared=False)(z, y)
    assert close(plain, ce(z[-1], y) + sum((1 - a) * ce(zi, y) + a * kd(zi, z[-1], T) / T**2 for zi in z[:-1]))


def test_msd_formula_mutual_and_cosine_hint_weight():
    z, y = logits(), labels()
    a, T = 0.5, 3.0
    mutual = sum(sum(kd(z[i], z[j], T) for j in range(N) if j != i) / (N - 1) for i in range(N))
    assert close(MultiSelfDistillationLoss()(z, y), (1 - a) * sum(ce(zi, y) for zi in z) + a * mutual)
    f = [torch.randn(B, 8).requires_grad_() for _ in range(N)]
    loss_fn = MultiSelfDistillationLoss(feature_weight=0.2, epochs=10)
    hint = sum(((fi - f[-1].detach()) ** 2).mean() for fi in f[:-1])
    for epoch in (0, 5, 10):
        loss_fn.set_epoch(epoch)
        b = 0.2 * 0.5 * (1 + math.cos(math.pi * epoch / 10))
        assert close(loss_fn(timm_exits.ExitOutputs(z, f), y), (1 - a) * sum(ce(zi, y) for zi in z) + a * mutual + b * hint)
    assert loss_fn.current_feature_weight() == pytest.approx(0.0, abs=1e-12)
    resumed = MultiSelfDistillationLoss(feature_weight=0.2, epochs=10)
    resumed.load_state_dict(loss_fn.state_dict())
    assert int(resumed.epoch) == 10


def test_mate_formula_teachers_and_gradients():
    z, y = logits(), labels()
    loss_fn = AppropriateTeachersLoss(num_exits=N, lam=0.7)
    with torch.no_grad():
        loss_fn.theta.copy_(torch.randn(N, N))
    w = loss_fn.theta.detach().softmax(1)
    teachers = [sum(w[k, j] * z[j].detach() for j in range(N)) for k in range(N)]
    off = 0.3 / (N - 1)
    expected = sum(ce(zi, y) + sum((0.7 if k == i else off) * kd(zi, teachers[k], 3.0) for k in range(N)) for i, zi in enumerate(z))
    expected = expected + sum(ce(t, y) for t in teachers)
    loss = loss_fn(z, y)
    assert close(loss, expected)
    # theta learns only from the teachers' CE; the exits see the teachers as constants
    (g_theta,) = torch.autograd.grad(loss, loss_fn.theta, retain_graph=True)
    t_theta = torch.einsum("kj,jbc->kbc", loss_fn.theta.softmax(1), torch.stack([zi.detach() for zi in z]))
    (g_ref,) = torch.autograd.grad(sum(ce(t, y) for t in t_theta), loss_fn.theta)
    assert torch.allclose(g_theta, g_ref, atol=1e-6)
    assert [n for n, _ in loss_fn.named_parameters()] == ["theta"]
    resumed = AppropriateTeachersLoss(num_exits=N, lam=0.7)
    resumed.load_state_dict(loss_fn.state_dict())
    assert torch.equal(resumed.theta, loss_fn.theta)


def test_ekd_formula_teachers_and_assignment():
    z, y = logits(), labels()
    g = torch.Generator().manual_seed(5)
    t = [torch.randn(B, C, generator=g).requires_grad_() for _ in range(N)]
    a, T = 0.5, 3.0
    ens = ce(torch.stack(z).mean(0), y)
    expected = sum((1 - a) * ce(zi, y) + a * kd(zi, ti, T) for zi, ti in zip(z, t)) + ens
    loss = EnsembleKnowledgeDistillationLoss()(z, y, t)
    assert close(loss, expected)
    assert all(gi is None for gi in grads(loss, t))  # teachers are constants
    one = EnsembleKnowledgeDistillationLoss()(z, y, t[0])
    assert close(one, sum((1 - a) * ce(zi, y) + a * kd(zi, t[0], T) for zi in z) + ens)
    assigned = EnsembleKnowledgeDistillationLoss(assignment=[1, 1, 0, 0])(z, y, t[:2])
    assert close(assigned, sum((1 - a) * ce(zi, y) + a * kd(zi, t[k], T) for zi, k in zip(z, [1, 1, 0, 0])) + ens)


# -- stop-gradients: each teacher is a constant for its students ----------------------------------


def features(seed=3, n=N, width=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, width, generator=g).requires_grad_() for _ in range(n)]


def hint(f):
    """sum_{i<N} ||f_i - sg f_N||^2, mean over batch and width."""
    return sum(((fi - f[-1].detach()) ** 2).mean() for fi in f[:-1])


def reference_loss(name, z, f, y, teacher_logits, theta):
    """Each method's objective with its stop-gradients written as explicit ``.detach()`` (kd() detaches its teacher)."""
    if name == "distillation":  # the final exit teaches: it learns from the labels only
        return 0.5 * sum(ce(zi, y) for zi in z) + 0.5 * sum(kd(zi, z[-1], 1.0) for zi in z[:-1])
    if name == "eed":  # the ensemble of logits and the mean feature are targets, not students
        e, tf = torch.stack(z).mean(0).detach(), torch.stack(f).mean(0).detach()
        feat = sum((((fi - tf) ** 2) * ((fi > 0) | (tf > 0))).mean() for fi in f)
        return sum(ce(zi, y) + ((zi - e) ** 2).mean() for zi in z) + 0.5 * feat
    if name == "byot":
        return ce(z[-1], y) + sum(0.7 * ce(zi, y) + 0.3 * kd(zi, z[-1], 3.0) for zi in z[:-1]) + 0.1 * hint(f)
    if name == "msd":  # every exit teaches every other one, as a constant
        mutual = sum(sum(kd(z[i], z[j], 3.0) for j in range(N) if j != i) / (N - 1) for i in range(N))
        return 0.5 * sum(ce(zi, y) for zi in z) + 0.5 * mutual + 0.1 * hint(f)
    if name == "mate":  # teachers mix detached exits: their CE trains theta alone
        w = theta.softmax(1)
        teachers = [sum(w[k, j] * z[j].detach() for j in range(N)) for k in range(N)]
        gate = lambda i, k: 0.5 if i == k else 0.5 / (N - 1)  # noqa: E731
        distilled = sum(ce(zi, y) + sum(gate(i, k) * kd(zi, teachers[k], 3.0) for k in range(N)) for i, zi in enumerate(z))
        return distilled + sum(ce(t, y) for t in teachers)
    if name == "ekd":  # external teachers are constants; the ensemble CE couples the exits
        return sum(0.5 * ce(zi, y) + 0.5 * kd(zi, ti, 3.0) for zi, ti in zip(z, teacher_logits)) + ce(torch.stack(z).mean(0), y)
    raise AssertionError(name)


LOSS_KWARGS = {"eed": {"feature_weight": 0.5}, "byot": {"feature_weight": 0.1}, "msd": {"feature_weight": 0.1}}


@pytest.mark.parametrize("name", ["distillation", "eed", "byot", "msd", "mate", "ekd"])
def test_gradients_equal_the_reference_whose_teachers_are_detached(name):
    z, f, y = logits(), features(), labels()
    g = torch.Generator().manual_seed(5)
    teacher_logits = [torch.randn(B, C, generator=g).requires_grad_() for _ in range(N)]
    loss_fn = create_loss(name, num_exits=N, **LOSS_KWARGS.get(name, {}))
    theta = None
    if name == "mate":
        with torch.no_grad():
            loss_fn.theta.copy_(torch.randn(N, N, generator=g))
        theta = loss_fn.theta
    extra = (teacher_logits,) if name == "ekd" else ()
    loss = loss_fn(timm_exits.ExitOutputs(z, f), y, *extra)
    expected = reference_loss(name, z, f, y, teacher_logits, theta)
    assert close(loss, expected)
    inputs = z + f + ([theta] if theta is not None else [])
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    want = torch.autograd.grad(expected, inputs, allow_unused=True)
    for k, (a, b) in enumerate(zip(got, want)):
        a = torch.zeros_like(inputs[k]) if a is None else a
        b = torch.zeros_like(inputs[k]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{name}: gradient of input {k}: {m}")
    # every exit learns something; the one that must not learn from a teacher term gets only its own
    assert all(a is not None and a.abs().max() > 0 for a in got[:N])
    if name == "ekd":
        assert all(t.grad is None for t in teacher_logits)


def test_the_teacher_side_gets_no_gradient_from_distillation_alone():
    z, f, y = logits(), features(), labels()
    # Phuong with C = 1 (distillation only): the final exit is only a teacher
    g = grads(DistillationBasedLoss(C=1.0, temperature=2.0)(z, y), z)
    assert (g[-1] is None or g[-1].abs().max() == 0) and all(gi.abs().max() > 0 for gi in g[:-1])
    # BYOT / MSD hints: the final feature is the target, the early ones move
    for loss_fn in (SelfDistillationLoss(feature_weight=1.0), MultiSelfDistillationLoss(feature_weight=1.0)):
        gf = grads(loss_fn(timm_exits.ExitOutputs(z, f), y), f)
        assert (gf[-1] is None or gf[-1].abs().max() == 0) and all(gi.abs().max() > 0 for gi in gf[:-1])
    # MSD, distillation only: exit i's gradient is the same whichever exits teach it, up to their values
    alone = MultiSelfDistillationLoss(alpha=1.0)
    gz = grads(alone(z, y), z)
    for i in range(N):
        own = sum(kd(z[i], z[j], 3.0) for j in range(N) if j != i) / (N - 1)
        torch.testing.assert_close(gz[i], torch.autograd.grad(own, z[i])[0], rtol=1e-4, atol=1e-6)
    # MATE: the teachers' cross entropy reaches theta, never the exits
    mate = AppropriateTeachersLoss(num_exits=N)
    mate(z, y)
    teacher_ce = sum(ce(t, y) for t in mate.teachers(z))
    *gz, g_theta = torch.autograd.grad(teacher_ce, z + [mate.theta], allow_unused=True)
    assert all(gi is None or gi.abs().max() == 0 for gi in gz) and g_theta.abs().max() > 0


@pytest.mark.parametrize("name", ["distillation", "eed", "byot", "msd", "mate", "ekd"])
def test_identical_exits_give_zero_distillation(name):
    z0 = logits()[0].detach()
    z, y = [z0.clone().requires_grad_() for _ in range(N)], labels()
    loss_fn = create_loss(name, num_exits=N, epochs=3)
    if name == "ekd":
        loss_fn(z, y, z0)
    else:
        loss_fn(z, y)
    assert loss_fn.components["distill"].abs().max() < 1e-5  # float32 rounding; a distinct teacher gives ~0.5


@pytest.mark.parametrize("name", timm_exits.loss_names())
def test_unlabeled_samples_add_no_ce(name):
    z, y = logits(), labels()
    loss_fn = create_loss(name, num_exits=N, epochs=3)
    call = (lambda zs, t: loss_fn(zs, t, z[0].detach())) if name == "ekd" else loss_fn
    y_half = y.clone()
    y_half[::2] = -100
    call(z, y_half)
    labeled = y_half != -100
    expected = torch.stack([ce(zi[labeled], y_half[labeled]) for zi in z])
    assert torch.allclose(loss_fn.components["ce"], expected, atol=1e-6)
    total = call(z, torch.full_like(y, -100))
    assert loss_fn.components["ce"].abs().max() == 0 and torch.isfinite(total)


def test_distillation_based_semi_supervised_keeps_the_kd_term():
    z = logits()
    loss = DistillationBasedLoss(temperature=4.0)(z, torch.full((B,), -100))
    assert close(loss, 0.5 * sum(kd(zi, z[-1], 4.0) for zi in z[:-1]))
    assert loss > 0


@pytest.mark.parametrize("name", timm_exits.loss_names())
def test_soft_targets_equal_one_hot_and_accept_mixup(name):
    z, y = logits(), labels()
    extra = (z[0].detach(),) if name == "ekd" else ()
    hard = create_loss(name, num_exits=N, epochs=3)(z, y, *extra)
    one_hot = create_loss(name, num_exits=N, epochs=3)(z, F.one_hot(y, C).float(), *extra)
    assert close(hard, one_hot)
    mixed = 0.7 * F.one_hot(y, C).float() + 0.3 * F.one_hot(y.roll(1), C).float()
    loss_fn = create_loss(name, num_exits=N, epochs=3, base_loss=SoftTargetCrossEntropy())
    loss = loss_fn(z, mixed, *extra)
    expected_ce = torch.stack([-(mixed * zi.log_softmax(1)).sum(1).mean() for zi in z])
    assert torch.allclose(loss_fn.components["ce"], expected_ce, atol=1e-6) and torch.isfinite(loss)


def test_label_smoothing_matches_torch():
    z, y = logits(), labels()
    loss_fn = MultiExitCELoss(label_smoothing=0.1)
    assert close(loss_fn(z, y), sum(F.cross_entropy(zi, y, label_smoothing=0.1) for zi in z))
    assert "label_smoothing=0.1" in repr(loss_fn)


@pytest.mark.parametrize("name", timm_exits.loss_names())
def test_every_loss_trains_a_wrapped_model_under_bf16_autocast(name, resnet18):
    model = timm_exits.wrap(resnet18, stages=[1, 2, 3], input_size=(3, 32, 32))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    loss_fn = create_loss(name, num_exits=model.num_exits, epochs=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(x)
        assert outputs[0].dtype == torch.bfloat16
        loss = loss_fn(outputs, y, torch.randn(4, 5)) if name == "ekd" else loss_fn(outputs, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for head in model.exits:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters() if p.requires_grad)


def test_feature_terms_on_a_wrapped_model_with_adapters_or_bottleneck_heads(resnet18):
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    model = timm_exits.wrap(resnet18, stages=[1, 2, 3], input_size=(3, 32, 32))
    out = model(x, return_features=True)
    dims = [f.shape[1] for f in out.features]
    assert dims == [64, 128, 256, 512]
    with pytest.raises(ValueError, match=r"feature_dims=\[64, 128, 256, 512\]"):
        ExitEnsembleLoss(feature_weight=1.0)(out, y)
    loss_fn = ExitEnsembleLoss(feature_weight=1.0, feature_dims=dims)
    assert sum(p.numel() for p in loss_fn.parameters()) == sum(d * 512 + 512 for d in dims[:-1])
    loss_fn(out, y).backward()
    assert all(p.grad is not None for p in loss_fn.parameters())
    bottleneck = timm_exits.wrap(timm.create_model("resnet18", num_classes=5), stages=[1, 2, 3], head="bottleneck", input_size=(3, 32, 32))
    loss = SelfDistillationLoss(feature_weight=0.03)(bottleneck(x, return_features=True), y)
    assert torch.isfinite(loss)


def test_components_and_repr_show_what_a_logger_needs():
    z, y = logits(), labels()
    loss_fn = DistillationBasedLoss()
    loss_fn(z, y)
    logged = loss_fn.log_dict(prefix="train/")
    assert set(logged) >= {f"train/ce/exit{i}" for i in range(1, N + 1)} | {"train/distill/exit1", "train/temperature"}
    assert all(isinstance(v, float) for v in logged.values())
    assert "C=0.5" in repr(loss_fn) and "adaptive" in repr(loss_fn)
    assert "alpha=0.3" in repr(SelfDistillationLoss()) and "temperature=3.0" in repr(SelfDistillationLoss())
    assert "lam=0.5" in repr(AppropriateTeachersLoss(num_exits=3))


@pytest.mark.parametrize(
    "build, shown",
    [
        (lambda: MultiExitCELoss(weights=[1, 2], label_smoothing=0.1), "weights=[1.0, 2.0], num_exits=2, label_smoothing=0.1"),
        (lambda: MultiExitCELoss(schedule="sdn", epochs=5, depths=[0.3]), "schedule='sdn', depths=[0.3], epochs=5, num_exits=2"),
        (lambda: MultiExitCELoss(base_loss=F.cross_entropy), "weights=None, base_loss=cross_entropy"),
        (lambda: DistillationBasedLoss(temperature=4.0, num_exits=3), "C=0.5, temperature=4.0, t_squared=True, num_exits=3"),
        (lambda: ExitEnsembleLoss(), "distance='mse', feature_weight=0.0"),
        (lambda: ExitEnsembleLoss(distance="kl", feature_weight=0.5),
         "distance='kl', temperature=3.0, kl_weight=0.1, t_squared=True, feature_weight=0.5"),
        (lambda: SelfDistillationLoss(t_squared=False), "alpha=0.3, temperature=3.0, feature_weight=0.0, t_squared=False"),
        (lambda: MultiSelfDistillationLoss(epochs=10, feature_weight=0.2),
         "alpha=0.5, temperature=3.0, feature_weight=0.2, epochs=10, t_squared=True"),
        (lambda: AppropriateTeachersLoss(num_exits=3, lam=0.7), "lam=0.7, temperature=3.0, t_squared=True, num_exits=3"),
        (lambda: EnsembleKnowledgeDistillationLoss(assignment=[0, 1]),
         "alpha=0.5, temperature=3.0, assignment=[0, 1], ensemble_weight=1.0, t_squared=True"),
    ],
)
def test_repr_shows_every_hyperparameter(build, shown):
    loss_fn = build()
    assert repr(loss_fn) == f"{type(loss_fn).__name__}({shown})"


def test_repr_names_a_base_loss_module_by_its_class():
    assert repr(MultiExitCELoss(base_loss=SoftTargetCrossEntropy())).startswith(
        "MultiExitCELoss(\n  weights=None, base_loss=SoftTargetCrossEntropy\n")


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outputs, match",
    [
        (torch.randn(B, C), "one tensor"),
        ([torch.randn(B, C), torch.randn(B, C, 2)], r"outputs\[1\] must be \(B, C\)"),
        ([torch.randn(B, C), torch.randn(B, C + 1), torch.randn(B, C)],
         exactly(f"all exits must give logits of one shape (B, C); outputs[0] is {(B, C)} but outputs[1] is {(B, C + 1)}")),
        ([torch.randn(B, C), "x"], exactly("outputs[1] must be a (B, C) logits tensor, got str")),
        ("abc", exactly("outputs must be a non-empty list of (B, C) logits tensors, got str")),
    ],
)
def test_outputs_that_are_not_per_exit_logits(outputs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ExitEnsembleLoss()(outputs, labels())


def test_wrong_number_of_exits_and_mismatched_targets():
    z, y = logits(), labels()
    with pytest.raises(ValueError, match="built for num_exits=3 but outputs holds 4"):
        ExitEnsembleLoss(num_exits=3)(z, y)
    with pytest.raises(ValueError, match="at least 2 exits"):
        DistillationBasedLoss()(z[:1], y)
    # not num_exits: the user gave none
    with pytest.raises(ValueError, match="weights has 3 entries, one per exit, but outputs holds 4 exits"):
        MultiExitCELoss(weights=[1, 1, 1])(z, y)
    with pytest.raises(ValueError, match="weights implies 3 exits but num_exits=4"):
        MultiExitCELoss(weights=[1, 1, 1], num_exits=4)
    with pytest.raises(ValueError, match=r"target has 5 labels but .* batch size 6"):
        MultiExitCELoss()(z, y[:5])
    with pytest.raises(ValueError, match=r"soft target must have the logits' shape"):
        MultiExitCELoss()(z, torch.full((B, C + 1), 1.0 / (C + 1)))
    with pytest.raises(ValueError, match="probability distributions"):
        MultiExitCELoss()(z, torch.rand(B, C) * 3)
    with pytest.raises(ValueError, match=r"\(B,\) integer class indices"):
        MultiExitCELoss()(z, y.float())
    with pytest.raises(TypeError, match="target must be a tensor"):
        MultiExitCELoss()(z, [0, 1])


def test_feature_terms_without_features_and_ekd_without_teachers():
    z, y = logits(), labels()
    with pytest.raises(ValueError, match="return_features=True"):
        SelfDistillationLoss(feature_weight=0.1)(z, y)
    with pytest.raises(ValueError, match="built with feature_dims"):
        ExitEnsembleLoss(feature_weight=1.0, feature_dims=[4, 4, 4, 8])(timm_exits.ExitOutputs(z, [torch.randn(B, 8)] * N), y)
    ekd = EnsembleKnowledgeDistillationLoss()
    with pytest.raises(TypeError, match="teacher_logits"):
        ekd(z, y)
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] must have the exits' logits shape"):
        ekd(z, y, torch.randn(B, C + 2))
    with pytest.raises(ValueError, match="3 teachers for 4 exits"):
        ekd(z, y, [torch.randn(B, C)] * 3)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DistillationBasedLoss(C=1.5), "C must be a number in"),
        (lambda: DistillationBasedLoss(temperature="hot"), "temperature must be 'adaptive'"),
        (lambda: ExitEnsembleLoss(distance="l1"), "distance must be one of"),
        (lambda: SelfDistillationLoss(temperature=0), "temperature must be a positive number"),
        (lambda: MultiExitCELoss(schedule="sdn"), "needs epochs"),
        (lambda: MultiExitCELoss(schedule="linear"), "schedule must be"),
        (lambda: AppropriateTeachersLoss(num_exits=None), "needs num_exits"),
        (lambda: create_loss("kd"), "unknown loss 'kd'"),
        (lambda: MultiExitCELoss(num_exits=0), "num_exits must be"),
        (lambda: ExitEnsembleLoss(feature_dims=[8]), "feature_dims"),
    ],
)
def test_bad_hyperparameters_are_named(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


POSITIVE = "{} must be a positive number, got {!r}"
NON_NEGATIVE = "{} must be a non-negative number, got {!r}"
FRACTION = "{} must be a number in [0, 1], got {!r}"
# (loss class, keyword, a bad value, the message) for every checked hyperparameter; the boundary values of each
# kind (0 and 1 for a fraction, 0 where zero is allowed, 1 epoch) are accepted in the test below
HYPERPARAMETERS = [
    (DistillationBasedLoss, "C", 1.5, FRACTION), (DistillationBasedLoss, "temperature", 0.0, POSITIVE),
    (DistillationBasedLoss, "maxprob", 2.0, FRACTION),
    (ExitEnsembleLoss, "temperature", float("nan"), POSITIVE), (ExitEnsembleLoss, "kl_weight", -0.1, NON_NEGATIVE),
    (ExitEnsembleLoss, "feature_weight", -1.0, NON_NEGATIVE),
    (SelfDistillationLoss, "alpha", -0.1, FRACTION), (SelfDistillationLoss, "temperature", float("inf"), POSITIVE),
    (SelfDistillationLoss, "feature_weight", True, NON_NEGATIVE),
    (MultiSelfDistillationLoss, "alpha", 1.1, FRACTION), (MultiSelfDistillationLoss, "temperature", -3.0, POSITIVE),
    (MultiSelfDistillationLoss, "feature_weight", "0.1", NON_NEGATIVE),
    (AppropriateTeachersLoss, "lam", 1.5, FRACTION), (AppropriateTeachersLoss, "temperature", 0, POSITIVE),
    (EnsembleKnowledgeDistillationLoss, "alpha", 2, FRACTION), (EnsembleKnowledgeDistillationLoss, "temperature", 0.0, POSITIVE),
    (EnsembleKnowledgeDistillationLoss, "ensemble_weight", -1.0, NON_NEGATIVE),
    (MultiExitCELoss, "label_smoothing", 1.5, FRACTION),
]


@pytest.mark.parametrize("cls, name, bad, message", HYPERPARAMETERS, ids=[f"{c.__name__}-{n}" for c, n, _, _ in HYPERPARAMETERS])
def test_every_bad_hyperparameter_is_named_with_its_value(cls, name, bad, message):
    extra = {"num_exits": 3} if cls is AppropriateTeachersLoss else {}
    with pytest.raises(ValueError, match=exactly(message.format(name, bad))):
        cls(**{name: bad}, **extra)
    boundary = {FRACTION: (0.0, 1.0), NON_NEGATIVE: (0.0,), POSITIVE: (1e-3,)}[message]
    for value in boundary:
        assert getattr(cls(**{name: value}, **extra), name) == value


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: MultiSelfDistillationLoss(epochs=0), ValueError,
         "epochs must be a positive int (or None for a constant hint weight), got 0"),
        (lambda: MultiSelfDistillationLoss(epochs=2.5), ValueError,
         "epochs must be a positive int (or None for a constant hint weight), got 2.5"),
        (lambda: AppropriateTeachersLoss(num_exits=None), ValueError,
         "AppropriateTeachersLoss needs num_exits (model.num_exits): it holds N teachers' weights"),
        (lambda: EnsembleKnowledgeDistillationLoss(assignment=[0, -1]), ValueError,
         "assignment must hold teacher indices >= 0, got [0, -1]"),
        (lambda: EnsembleKnowledgeDistillationLoss(num_exits=4, assignment=[0, 1]), ValueError, "assignment has 2 entries but num_exits=4"),
        (lambda: MultiExitCELoss(num_exits=0), ValueError, "num_exits must be an int >= 1 (or None for any), got 0"),
        (lambda: DistillationBasedLoss(num_exits=1), ValueError, "num_exits must be an int >= 2 (or None for any), got 1"),
        (lambda: MultiExitCELoss(base_loss="ce"), TypeError, "base_loss must be a callable (logits, target) -> loss, got str"),
        (lambda: MultiExitCELoss(weights=[1, 1], schedule="sdn", epochs=3), ValueError,
         "give either weights (fixed) or schedule='sdn', not both"),
        (lambda: MultiExitCELoss(schedule="sdn", epochs=0), ValueError,
         "schedule='sdn' needs epochs, the number of training epochs (a positive int), got 0"),
        (lambda: MultiExitCELoss(depths=[0.0, 0.5], schedule="sdn", epochs=3), ValueError,
         "depths must be fractions in (0, 1], one per early exit, got [0.0, 0.5]"),
        (lambda: MultiExitCELoss(depths=[0.5, 1.5], schedule="sdn", epochs=3), ValueError,
         "depths must be fractions in (0, 1], one per early exit, got [0.5, 1.5]"),
        (lambda: MultiExitCELoss(depths=[0.5], num_exits=3, schedule="sdn", epochs=3), ValueError,
         "depths implies 2 exits but num_exits=3"),
        (lambda: MultiExitCELoss(depths=[0.25, 0.5]), ValueError,
         "depths set the SDN schedule's C_i: give schedule='sdn' (and epochs) with them, or fixed weights without them"),
        (lambda: DistillationBasedLoss(t_mult=0.5), ValueError,
         "t_mult must be >= 1: the adaptive temperature only grows (T *= t_mult when the teacher is sure), got 0.5"),
        (lambda: DistillationBasedLoss(t_mult=-1.0), ValueError, "t_mult must be a positive number, got -1.0"),
        (lambda: MultiExitCELoss(weights=[1, -1]), ValueError, "weights must be non-negative numbers, got [1, -1]"),
        (lambda: MultiExitCELoss(weights=[1, float("nan")]), ValueError, "weights must be non-negative numbers, got [1, nan]"),
    ],
)
def test_bad_construction_messages(build, error, message):
    with pytest.raises(error, match=exactly(message)):
        build()


def test_boundaries_that_are_valid():
    assert MultiExitCELoss(schedule="sdn", epochs=1).epochs == 1
    assert MultiExitCELoss(depths=[1.0, 0.5], schedule="sdn", epochs=2).depths == [1.0, 0.5]
    assert MultiExitCELoss(weights=[0, 1]).weights == [0.0, 1.0]
    assert MultiSelfDistillationLoss(epochs=1).epochs == 1
    assert EnsembleKnowledgeDistillationLoss(num_exits=2, assignment=[0, 1]).assignment == [0, 1]
    assert MultiExitCELoss(num_exits=1).num_exits == 1 and DistillationBasedLoss(num_exits=2).num_exits == 2
    assert torch.equal(AppropriateTeachersLoss(num_exits=3).theta, torch.eye(3))  # teacher k starts centred on exit k
    assert torch.equal(AppropriateTeachersLoss(num_exits=3, primary_init=2.0).theta, 2 * torch.eye(3))


def test_set_epoch_and_log_dict():
    loss_fn = MultiExitCELoss()
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match=exactly(f"epoch must be a non-negative int, got {bad!r}")):
            loss_fn.set_epoch(bad)
    loss_fn.set_epoch(0)
    assert int(loss_fn.epoch) == 0
    loss_fn(logits(), labels())
    assert sorted(loss_fn.log_dict()) == sorted([f"ce/exit{i}" for i in range(1, N + 1)] + [f"weight/exit{i}" for i in range(1, N + 1)])


def test_ekd_call_errors_name_the_teacher_and_the_assignment():
    z, y = logits(), labels()
    with pytest.raises(TypeError, match=exactly(
        "EnsembleKnowledgeDistillationLoss needs the teachers' logits: loss_fn(outputs, target, teacher_logits)"
    )):
        EnsembleKnowledgeDistillationLoss()(z, y)
    with pytest.raises(ValueError, match=exactly(f"teacher_logits[1] must have the exits' logits shape (B, C) = {(B, C)}, got str")):
        EnsembleKnowledgeDistillationLoss()(z, y, [torch.randn(B, C), "t"])
    with pytest.raises(ValueError, match=exactly(
        f"teacher_logits[0] must have the exits' logits shape (B, C) = {(B, C)}, got {(B, C + 1)}"
    )):
        EnsembleKnowledgeDistillationLoss()(z, y, torch.randn(B, C + 1))
    assigned = EnsembleKnowledgeDistillationLoss(assignment=[0, 1, 1, 0])
    with pytest.raises(ValueError, match=exactly("assignment has 4 entries but outputs holds 3 exits")):
        assigned(z[:3], y, [torch.randn(B, C)] * 2)
    with pytest.raises(ValueError, match=exactly("assignment refers to teacher 1 but 1 teacher logits were given")):
        assigned(z, y, [torch.randn(B, C)])
    # the largest index is a valid teacher when there are that many plus one
    assert torch.isfinite(assigned(z, y, [torch.randn(B, C)] * 2))
    # the shapes are checked against the exits' own, and the target against their batch
    with pytest.raises(ValueError, match="target has 5 labels"):
        EnsembleKnowledgeDistillationLoss()(z, y[:5], torch.randn(B, C))


@pytest.mark.parametrize("name", ["distillation", "eed", "msd", "mate", "ekd"])
def test_t_squared_false_drops_the_factor_from_the_distillation_term(name):
    z, y = logits(), labels()
    kwargs = {"distance": "kl"} if name == "eed" else {"temperature": 4.0} if name == "distillation" else {}
    extra = (torch.randn(B, C, generator=torch.Generator().manual_seed(7)),) if name == "ekd" else ()
    with_t2 = create_loss(name, num_exits=N, **kwargs)
    without = create_loss(name, num_exits=N, t_squared=False, **kwargs)
    with_t2(z, y, *extra)
    without(z, y, *extra)
    T = 4.0 if name == "distillation" else 3.0
    torch.testing.assert_close(without.components["distill"] * T**2, with_t2.components["distill"], rtol=1e-5, atol=1e-6)
    assert with_t2.components["distill"].abs().max() > 0


def test_kd_loss_scales_by_t_squared_unless_told_not_to():
    # kd_loss is exported for losses of one's own: by default it carries Hinton's T^2, as every built-in loss does
    from timm_exits.losses import kd_loss
    from timm_exits.losses.base import kd_matrix, soft

    z, teacher = logits(requires_grad=False), soft(logits(seed=5, n=1, requires_grad=False)[0], 3.0)
    torch.testing.assert_close(kd_loss(z[0], teacher, 3.0), 9 * kd_loss(z[0], teacher, 3.0, t_squared=False))
    torch.testing.assert_close(kd_matrix(z, teacher.unsqueeze(0), 3.0), 9 * kd_matrix(z, teacher.unsqueeze(0), 3.0, t_squared=False))
    assert kd_loss(z[0], teacher, 3.0) > 0


def test_components_hold_every_term_per_exit():
    z, y, f = logits(), labels(), features()
    expected = {
        "distillation": {"ce": (N,), "distill": (N,), "temperature": (), "teacher_maxprob": ()},
        "byot": {"ce": (N,), "distill": (N,), "feature": (N - 1,)},
        "msd": {"ce": (N,), "distill": (N,), "feature": (N - 1,), "feature_weight": ()},
        "mate": {"ce": (N,), "distill": (N,), "teacher_ce": (N,)},
        "ekd": {"ce": (N,), "distill": (N,), "ensemble_ce": ()},
    }
    for name, shapes in expected.items():
        loss_fn = create_loss(name, num_exits=N, **({"feature_weight": 0.1} if name in ("msd", "byot") else {}))
        loss_fn(timm_exits.ExitOutputs(z, f), y, *((z[0].detach(),) if name == "ekd" else ()))
        assert {k: tuple(v.shape) for k, v in loss_fn.components.items()} == shapes, name


def test_phuong_temperature_stays_when_the_teacher_is_exactly_at_maxprob():
    loss_fn = DistillationBasedLoss()
    two_classes = [torch.zeros(B, 2) for _ in range(N)]  # the teacher's max-prob is exactly 0.5: not above it
    loss_fn(two_classes, torch.zeros(B, dtype=torch.long))
    assert float(loss_fn.temperature) == 1.0 and float(loss_fn.components["teacher_maxprob"]) == 0.5
    # T is kept in float64, so 1.05^k stays exact over a long run (and survives state_dict())
    assert loss_fn.temperature.dtype == torch.float64 and DistillationBasedLoss(temperature=4.0).temperature.dtype == torch.float64


def test_mate_checks_its_exit_count_and_keeps_base_loss_options():
    z, y = logits(), labels()
    with pytest.raises(ValueError, match="built for num_exits=3 but outputs holds 4"):
        AppropriateTeachersLoss(num_exits=3)(z, y)
    smoothed = AppropriateTeachersLoss(num_exits=N, label_smoothing=0.2)
    smoothed(z, y)
    torch.testing.assert_close(smoothed.components["ce"], torch.stack([F.cross_entropy(zi, y, label_smoothing=0.2) for zi in z]))


@pytest.mark.parametrize("name", ["ce", "sdn", "eed", "byot", "msd", "mate", "ekd"])
def test_losses_compute_where_the_logits_are(name):
    # the meta device stands in for a GPU: weights, gates and teachers made inside the loss must follow the logits
    z = [zi.detach().to("meta") for zi in logits()]
    extra = (torch.empty(B, C, device="meta"),) if name == "ekd" else ()
    with torch.no_grad():
        assert create_loss(name, num_exits=N, epochs=3)(z, labels().to("meta"), *extra).device.type == "meta"


@pytest.mark.parametrize("kwargs", [
    {"name": name} for name in ("ce", "sdn", "distillation", "eed", "byot", "msd", "mate", "ekd")
] + [{"name": "ce", "weights": [0.5, 1.0, 1.0, 2.0]}, {"name": "sdn", "depths": [0.2, 0.4, 0.6]}])
def test_a_loss_left_on_the_cpu_computes_on_a_gpu(kwargs, monkeypatch):
    # meta tensors mix with CPU tensors freely; fake tensors on a "cuda" device check devices as a GPU does, so every
    # buffer the loss keeps on the CPU (temperature, weights, depths, epoch, gates) must be moved to the logits. Fake
    # tensors hold no values: the target checks skip their host read, as they do under torch.compile.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        try:
            torch.zeros(1).to("cuda")
        except RuntimeError as error:  # torch 2.5 (the floor) does; 2.14 does not
            pytest.skip(f"this torch starts CUDA to move a CPU tensor to a fake cuda device, which needs a GPU driver: {error}")
    monkeypatch.setattr(timm_exits.losses.base, "_compiling", lambda: True)
    loss_fn = create_loss(num_exits=N, epochs=3, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        z = [zi.detach().to("cuda") for zi in logits()]
        extra = (torch.empty(B, C, device="cuda"),) if kwargs["name"] == "ekd" else ()
        assert loss_fn(z, labels().to("cuda"), *extra).device.type == "cuda"


def test_feature_terms_with_adapters_for_byot_and_msd():
    z, y = logits(), labels()
    g = torch.Generator().manual_seed(8)
    f = [torch.randn(B, w, generator=g).requires_grad_() for w in (4, 6, 8, 8)]
    for cls in (SelfDistillationLoss, MultiSelfDistillationLoss):
        loss_fn = cls(feature_weight=1.0, feature_dims=[4, 6, 8, 8], num_exits=N)
        assert [type(a).__name__ for a in loss_fn.adapters] == ["Linear", "Linear", "Identity"]
        loss_fn(timm_exits.ExitOutputs(z, f), y).backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in loss_fn.parameters())
        with torch.no_grad():
            aligned = [a(fi) for a, fi in zip(loss_fn.adapters, f)] + [f[-1]]
        torch.testing.assert_close(loss_fn.components["feature"], torch.stack([((a - aligned[-1]) ** 2).mean() for a in aligned[:-1]]))
        with pytest.raises(ValueError, match="built for num_exits=4 but outputs holds 3"):
            cls(num_exits=N)(z[:3], y)


def test_feature_width_errors_name_the_widths():
    z, y = logits(), labels()
    two_widths = timm_exits.ExitOutputs(z, [torch.randn(B, 4)] * 3 + [torch.randn(B, 8)])
    with pytest.raises(ValueError, match=exactly(
        "the exits' features have widths [4, 4, 4, 8]; a feature term compares them at the final exit's width (8). "
        "Pass feature_dims=[4, 4, 4, 8] so the loss builds linear adapters (then give the loss's parameters to the "
        "optimizer), or use heads that output the final width (head='bottleneck' or 'replica')"
    )):
        ExitEnsembleLoss(feature_weight=1.0)(two_widths, y)
    with pytest.raises(ValueError, match=exactly(
        "ExitEnsembleLoss has a feature term on: call it with model(x, return_features=True) "
        "(an ExitOutputs with logits and features), or set its feature weight to 0"
    )):
        ExitEnsembleLoss(feature_weight=1.0)(z, y)
    with pytest.raises(ValueError, match=exactly("outputs holds 4 logits but 3 features")):
        ExitEnsembleLoss(feature_weight=1.0)(timm_exits.ExitOutputs(z, [torch.randn(B, 8)] * 3), y)
    # identity adapters (an early exit already at the final width) expect the final width
    identity = ExitEnsembleLoss(feature_weight=1.0, feature_dims=[8, 4, 6, 8])
    assert torch.isfinite(identity(timm_exits.ExitOutputs(z, [torch.randn(B, w) for w in (8, 4, 6, 8)]), y))


def test_eed_feature_mask_keeps_only_where_either_side_is_positive():
    z, y = logits(n=2), labels()
    # exit 1's feature and the mean target: exact zeros and negatives, where the mask decides
    f = [torch.tensor([[0.0, -1.0, 2.0, 0.0]]).repeat(B, 1), torch.tensor([[-2.0, 1.0, 0.0, -2.0]]).repeat(B, 1)]
    # the mean target, (f[0] + f[1]) / 2, is [-1, 0, 1, -1]
    loss_fn = ExitEnsembleLoss(feature_weight=1.0)
    loss_fn(timm_exits.ExitOutputs(z, f), y)
    # exit 1: kept where f > 0 or target > 0 -> entry 2 only: (2 - 1)^2 / 4; exit 2: entries 1 (f = 1) and 2 (target = 1)
    expected = torch.tensor([(2.0 - 1.0) ** 2 / 4, ((1.0 - 0.0) ** 2 + (0.0 - 1.0) ** 2) / 4])
    torch.testing.assert_close(loss_fn.components["feature"], expected)


def test_supervised_term_options():
    z, y = logits(), labels()
    one_hot = F.one_hot(y, C).float()
    smoothed = MultiExitCELoss(label_smoothing=0.1)
    smoothed(z, one_hot)  # soft targets get the label smoothing too
    torch.testing.assert_close(smoothed.components["ce"], torch.stack([F.cross_entropy(zi, one_hot, label_smoothing=0.1) for zi in z]))
    custom = MultiExitCELoss(ignore_index=-1)
    y_some = y.clone()
    y_some[1:] = -1  # one labeled sample: its CE alone, not halved or averaged with the unlabeled
    custom(z, y_some)
    torch.testing.assert_close(custom.components["ce"], torch.stack([ce(zi[:1], y[:1]) for zi in z]))


def test_msd_and_mate_distillation_per_exit():
    z, y = logits(), labels()
    msd = MultiSelfDistillationLoss()
    msd(z, y)
    per_exit = torch.stack([sum(kd(z[i], z[j], 3.0) for j in range(N) if j != i) / (N - 1) for i in range(N)])
    torch.testing.assert_close(msd.components["distill"], per_exit.detach(), rtol=1e-5, atol=1e-6)
    mate = AppropriateTeachersLoss(num_exits=N, lam=0.7)
    with torch.no_grad():
        mate.theta.copy_(torch.randn(N, N, generator=torch.Generator().manual_seed(9)))
    mate(z, y)
    w = mate.theta.detach().softmax(1)
    teachers = [sum(w[k, j] * z[j].detach() for j in range(N)) for k in range(N)]
    gate = lambda i, k: 0.7 if i == k else 0.3 / (N - 1)  # noqa: E731
    per_exit = torch.stack([sum(gate(i, k) * kd(z[i], teachers[k], 3.0) for k in range(N)) for i in range(N)])
    torch.testing.assert_close(mate.components["distill"], per_exit.detach(), rtol=1e-5, atol=1e-6)


def test_feature_dims_boundaries():
    assert [type(a).__name__ for a in timm_exits.losses.base.feature_adapters([1, 8])] == ["Linear"]
    assert [type(a).__name__ for a in timm_exits.losses.base.feature_adapters([8, 8])] == ["Identity"]
    for bad in ([8], [0, 8], [4, -1, 8]):
        with pytest.raises(ValueError, match=exactly(
            f"feature_dims must list each exit's feature width (>= 2 exits, positive), got {bad!r}"
        )):
            timm_exits.losses.base.feature_adapters(bad)


def test_a_base_loss_with_class_indices_and_unlabeled_samples():
    z, y = logits(), labels()
    calls = []

    def base(logits_, target_):
        calls.append(len(target_))
        return F.cross_entropy(logits_, target_, label_smoothing=0.2)

    loss_fn = MultiExitCELoss(base_loss=base)
    loss_fn(z, y)
    torch.testing.assert_close(loss_fn.components["ce"], torch.stack([F.cross_entropy(zi, y, label_smoothing=0.2) for zi in z]))
    y_half = y.clone()
    y_half[::2] = -100
    loss_fn(z, y_half)  # the base loss sees only the labeled samples
    labeled = y_half != -100
    expected = torch.stack([F.cross_entropy(zi[labeled], y[labeled], label_smoothing=0.2) for zi in z])
    torch.testing.assert_close(loss_fn.components["ce"], expected)
    calls.clear()
    total = loss_fn(z, torch.full_like(y, -100))  # none labeled: zero, still part of the graph, the base loss not called
    assert calls == [] and total.item() == 0.0 and total.requires_grad


def test_target_checks_word_for_word():
    z, y = logits(), labels()
    loss_fn = MultiExitCELoss()
    near = F.one_hot(y, C).float() * 1.0005  # rows within 1e-3 of one are distributions
    assert torch.isfinite(loss_fn(z, near))
    for rows in (F.one_hot(y, C).float() * 1.01, F.one_hot(y, C).float() * 2 - 0.2 * torch.ones(B, C)):
        with pytest.raises(ValueError, match=r"^soft target rows must be probability distributions "
                                             r"\(non-negative, summing to 1\); row sums range over"):
            loss_fn(z, rows)
    negative = F.one_hot(y, C).float() * 1.5 - 0.5 * F.one_hot(y.roll(1), C).float()  # sums to one, with a negative entry
    with pytest.raises(ValueError, match="probability distributions"):
        loss_fn(z, negative)
    with pytest.raises(TypeError, match=exactly("target must be a tensor of (B,) class indices or (B, C) soft targets, got list")):
        loss_fn(z, [0, 1])
    with pytest.raises(ValueError, match=exactly("ExitEnsembleLoss was built for num_exits=3 but outputs holds 4 exits")):
        ExitEnsembleLoss(num_exits=3)(z, y)
    with pytest.raises(ValueError, match=exactly("DistillationBasedLoss needs at least 2 exits, outputs holds 1")):
        DistillationBasedLoss()(z[:1], y)
    assert torch.isfinite(DistillationBasedLoss()(z[:2], y))  # two exits are enough
    for bad in (True, 1.5):
        with pytest.raises(ValueError, match=exactly(f"label_smoothing must be a number in [0, 1], got {bad!r}")):
            MultiExitCELoss(label_smoothing=bad)
    with pytest.raises(ValueError, match=exactly("num_exits must be an int >= 1 (or None for any), got True")):
        MultiExitCELoss(num_exits=True)


def test_a_fresh_loss_has_no_components_and_counts_epochs_as_ints():
    loss_fn = ExitEnsembleLoss()
    assert loss_fn.components == {} and loss_fn.log_dict() == {}
    assert loss_fn.epoch.dtype == torch.long and int(loss_fn.epoch) == 0


def test_byot_hints_on_chosen_exits_with_the_released_l2_norm_and_linear_adapters():
    z, y = logits(), labels()
    f = features()
    a, T, b = 0.3, 3.0, 0.05
    expected = ce(z[-1], y) + sum((1 - a) * ce(zi, y) + a * kd(zi, z[-1], T) for zi in z[:-1])
    # BYOT's released torch.dist: the L2 norm of the whole (B, D) difference, not squared, not averaged
    l2 = [((fi - f[-1].detach()) ** 2).sum().sqrt() for fi in f[:-1]]
    loss_fn = SelfDistillationLoss(feature_weight=b, feature_distance="l2", hint_exits=[1, 0, 1])
    assert loss_fn.hint_exits == [0, 1]  # sorted, each once
    assert close(loss_fn(timm_exits.ExitOutputs(z, f), y), expected + b * (l2[0] + l2[1]))
    assert close(loss_fn.components["feature"], torch.stack([l2[0], l2[1], torch.tensor(0.0)]))
    assert repr(loss_fn) == ("SelfDistillationLoss(alpha=0.3, temperature=3.0, feature_weight=0.05, t_squared=True, "
                             "feature_distance='l2', hint_exits=[0, 1])")
    deepest = SelfDistillationLoss(feature_weight=b, hint_exits=[N - 2])  # the last early exit is a valid choice
    mse = ((f[N - 2] - f[-1].detach()) ** 2).mean()
    assert close(deepest(timm_exits.ExitOutputs(z, f), y), expected + b * mse)
    with pytest.raises(ValueError, match=exactly(f"hint_exits=[{N - 1}] names early exits that do not exist: there are {N - 1}")):
        SelfDistillationLoss(feature_weight=b, hint_exits=[N - 1])(timm_exits.ExitOutputs(z, f), y)
    # linear_adapters: a Linear on every early exit, also where the widths already match (the released code's choice)
    adapted = SelfDistillationLoss(feature_weight=b, feature_dims=[8] * N, linear_adapters=True)
    assert [type(m).__name__ for m in adapted.adapters] == ["Linear"] * (N - 1)
    assert [type(m).__name__ for m in SelfDistillationLoss(feature_weight=b, feature_dims=[8] * N).adapters] == ["Identity"] * (N - 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"feature_distance": "l1"}, "feature_distance must be one of ('mse', 'l2'), got 'l1'"),
        ({"hint_exits": [0, -1]}, "hint_exits must list early-exit indices (0 = the shallowest), got [0, -1]"),
        ({"hint_exits": [True]}, "hint_exits must list early-exit indices (0 = the shallowest), got [True]"),
        ({"hint_exits": [0.5]}, "hint_exits must list early-exit indices (0 = the shallowest), got [0.5]"),
        ({"linear_adapters": True}, "linear_adapters=True needs feature_dims, each exit's feature width, to build the adapters"),
    ],
)
def test_hint_options_are_checked_at_construction(kwargs, message):
    for cls in (SelfDistillationLoss, MultiSelfDistillationLoss):
        with pytest.raises(ValueError, match=exactly(message)):
            cls(feature_weight=0.1, **kwargs)
    assert SelfDistillationLoss(hint_exits=[0]).hint_exits == [0]  # index 0, the shallowest exit, is valid


def test_msd_reports_the_hint_weight_it_uses_each_epoch():
    loss_fn = MultiSelfDistillationLoss(feature_weight=0.2, epochs=10)
    for epoch in (0, 3, 5, 12):  # past `epochs` the weight stays at its end value
        loss_fn.set_epoch(epoch)
        b = 0.2 * 0.5 * (1 + math.cos(math.pi * min(epoch, 10) / 10))
        assert loss_fn.current_feature_weight() == pytest.approx(b, abs=1e-12)
        loss_fn(timm_exits.ExitOutputs(logits(), features()), labels())
        assert float(loss_fn.components["feature_weight"]) == pytest.approx(b, abs=1e-6)
    assert MultiSelfDistillationLoss(feature_weight=0.2).current_feature_weight() == 0.2  # no epochs: constant


def test_distillation_based_scale_and_the_least_t_mult():
    z, y = logits(), labels()
    assert close(DistillationBasedLoss(scale=2.5)(z, y), 2.5 * DistillationBasedLoss()(z, y))
    shown = "C=0.5, temperature=4.0, t_squared=True, scale=2.5"
    assert repr(DistillationBasedLoss(temperature=4.0, scale=2.5)) == f"DistillationBasedLoss({shown})"
    with pytest.raises(ValueError, match=exactly("scale must be a positive number, got 0.0")):
        DistillationBasedLoss(scale=0.0)
    assert DistillationBasedLoss(t_mult=1.0).t_mult == 1.0  # 1 keeps the temperature where it starts


def test_multi_exit_ce_without_weights_or_depths_and_what_its_state_holds():
    z, y = logits(), labels()
    plain = MultiExitCELoss()
    assert plain.current_weights(N) == [1.0] * N
    assert close(plain(z, y), sum(ce(zi, y) for zi in z))
    sdn = MultiExitCELoss(schedule="sdn", epochs=4)  # without depths, exit i of N sits at depth i / N
    sdn.set_epoch(1)
    ramp = [min(i / N, 0.01 + 2 * (i / N) / 4) for i in range(1, N)] + [1.0]
    assert sdn.current_weights(N) == pytest.approx(ramp)
    assert close(sdn(z, y), sum(r * ce(zi, y) for r, zi in zip(ramp, z)))
    # weights and depths are the constructor's, not state: a checkpoint holds the epoch only, so it loads
    # into a loss built with other weights
    weighted = MultiExitCELoss(weights=[1, 2, 3, 4])
    assert list(weighted.state_dict()) == ["epoch"]
    assert list(MultiExitCELoss(schedule="sdn", epochs=4, depths=[0.2, 0.5, 0.8]).state_dict()) == ["epoch"]
    plain.load_state_dict(weighted.state_dict())


def test_soft_targets_on_another_device_are_not_read_back():
    # meta tensors hold no values, so the check that soft target rows are distributions is skipped there, as under
    # torch.compile (where reading its answer would break the graph) and as for class indices
    z = [zi.detach().to("meta") for zi in logits()]
    soft_target = torch.empty(B, C, device="meta")
    with torch.no_grad():
        assert MultiExitCELoss()(z, soft_target).device.type == "meta"
