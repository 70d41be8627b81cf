"""`create_loss(name, preset="authors")` computes what the authors' released code computes.

Each reference below is written out from the released code (the repository and file are in
`timm_exits.losses.presets.SOURCES`), with its own choices: soft cross entropy where the authors use it,
`torch.dist` for BYOT's feature term. The gradients must be equal; the values differ only by the
teacher's entropy where the authors use soft cross entropy and we use KL (a constant).
"""
import pytest
import torch
import torch.nn.functional as F

import timm_exits
from conftest import exactly

N, B, C = 4, 6, 5


def inputs(width=(8, 8, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(B, C, generator=g, requires_grad=True) for _ in range(N)]
    features = [torch.randn(B, w, generator=g).relu().requires_grad_() for w in width]
    target = torch.randint(0, C, (B,), generator=g)
    return logits, features, target


def soft_ce(student, teacher_probs, T):
    return -(F.log_softmax(student / T, dim=1) * teacher_probs).sum(1).mean()


def entropy(p):
    return -(p * p.log()).sum(1).mean()


def check(ours, reference, leaves, offset=0.0):
    torch.testing.assert_close(ours, reference + offset, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ours, leaves, allow_unused=True)
    want = torch.autograd.grad(reference, leaves, allow_unused=True)
    for got, expected in zip(grads, want, strict=True):
        if expected is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_byot_matches_the_released_train_py():
    logits, features, target = inputs(width=(3, 5, 7, 8))
    loss = timm_exits.create_loss("byot", num_exits=N, preset="authors", feature_dims=[3, 5, 7, 8])
    ours = loss(timm_exits.ExitOutputs(logits, features), target)
    T, a = 3.0, 0.3
    teacher = F.softmax(logits[-1].detach() / T, dim=1)
    reference = F.cross_entropy(logits[-1], target)
    for z in logits[:-1]:
        reference = reference + (1 - a) * F.cross_entropy(z, target) + a * soft_ce(z, teacher, T)  # no T^2
    final = features[-1].detach()
    for k in (0, 1):  # `if index != 1`: every early exit but the deepest (index 1 of their deepest-first list)
        reference = reference + 0.03 * torch.dist(loss.adapters[k](features[k]), final)
    assert all(isinstance(a, torch.nn.Linear) for a in loss.adapters)
    # soft CE = KL + the teacher's entropy, on each of the N - 1 early exits
    check(ours, reference, [*logits, *features, *loss.adapters.parameters()], offset=-(N - 1) * a * entropy(teacher))


def test_phuong_matches_the_released_distillation_loss_with_its_global_scale():
    logits, _, target = inputs()
    target[:2] = -100  # their semi-supervised labels: CE over the labeled samples, KD over all
    loss = timm_exits.create_loss("distillation", num_exits=N, preset="authors").train()
    ours = loss(logits, target)
    T, c, g = 1.0, 0.5, 2.0 * 5 / N  # T starts at 1; the global scale of train_cifar.py
    teacher = F.softmax(logits[-1].detach() / T, dim=1)
    cum = (1 - c) * F.cross_entropy(logits[-1], target)
    for z in logits[:-1]:
        cum = cum + (1 - c) * F.cross_entropy(z, target) + T**2 * c * soft_ce(z, teacher, T)
    check(ours, g * cum, logits, offset=-g * (N - 1) * c * T**2 * entropy(teacher))
    assert g == 2.5


def test_eed_matches_the_released_train_py_feature_term_on():
    logits, features, target = inputs()
    ours = timm_exits.create_loss("eed", num_exits=N, preset="authors")(timm_exits.ExitOutputs(logits, features), target)
    teacher = (sum(logits) / N).detach()
    teacher_f = (sum(features) / N).detach()
    reference = sum(F.cross_entropy(z, target) for z in logits) + sum(F.mse_loss(z, teacher) for z in logits)
    reference = reference + sum(((f - teacher_f) ** 2 * ((f > 0) | (teacher_f > 0)).float()).abs().mean() for f in features)
    check(ours, reference, [*logits, *features])


@pytest.mark.parametrize("epoch", [0, 4, 99])
def test_sdn_matches_the_released_coefficients_and_ramp(epoch):
    logits, _, target = inputs()
    loss = timm_exits.create_loss("sdn", num_exits=N, epochs=100, preset="authors")
    loss.set_epoch(epoch)
    max_coeffs = [0.15, 0.3, 0.45]  # by classifier index
    e = epoch + 1  # their loop counts epochs from 1
    coeffs = [min(m, 0.01 + e * (m / 100)) for m in max_coeffs] + [1.0]
    reference = sum(w * F.cross_entropy(z, target) for w, z in zip(coeffs, logits))
    check(loss(logits, target), reference, logits)


@pytest.mark.parametrize("call,message", [
    (lambda: timm_exits.create_loss("mate", num_exits=4, preset="authors"),
     "'mate' has no authors' preset: no released code to match (presets exist for ['byot', 'distillation', 'eed', 'sdn']); "
     "its defaults follow the paper"),
    (lambda: timm_exits.create_loss("eed", preset="paper"), "preset must be 'authors' (or None for the library's defaults), got 'paper'"),
    (lambda: timm_exits.create_loss("distillation", preset="authors"),
     "the authors' preset of 'distillation' needs num_exits (model.num_exits, at least 2): its weights depend on it, got None"),
    (lambda: timm_exits.create_loss("byot", num_exits=4, preset="authors"),
     "the authors' preset of 'byot' adapts each early exit's feature with a Linear: give feature_dims, each exit's feature width"),
    (lambda: timm_exits.create_loss("sdn", num_exits=9, epochs=3, preset="authors"),
     "the SDN authors define C_i for at most 6 internal classifiers (0.15, 0.3, ..., 0.9); this model has 8"),
])
def test_presets_that_cannot_be_built_say_why(call, message):
    with pytest.raises(ValueError, match=exactly(message)):
        call()


def test_arguments_given_beside_a_preset_override_it():
    loss = timm_exits.create_loss("eed", num_exits=N, preset="authors", feature_weight=0.5)
    assert loss.feature_weight == 0.5 and loss.distance == "mse"
