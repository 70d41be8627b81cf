"""Combining exits: the mean of logits or of probabilities, weights, anytime ensembles."""
import pytest
import torch

import timm_exits
from conftest import exactly
from timm_exits import ExitEnsemble, anytime_ensemble, exit_ensemble


def logits(n=3, b=5, c=7):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, c, generator=g) for _ in range(n)]


def test_mean_of_logits_and_of_probabilities():
    z = logits()
    assert torch.allclose(exit_ensemble(z), (z[0] + z[1] + z[2]) / 3, atol=1e-6)
    probs = exit_ensemble(z, mode="probs").softmax(1)
    assert torch.allclose(probs, sum(zi.softmax(1) for zi in z) / 3, atol=1e-6)


def test_fixed_weights_are_normalised():
    z = logits()
    w = [1.0, 0.0, 3.0]
    assert torch.allclose(exit_ensemble(z, weights=w), 0.25 * z[0] + 0.75 * z[2], atol=1e-6)
    probs = exit_ensemble(z, weights=w, mode="probs").softmax(1)
    assert torch.allclose(probs, 0.25 * z[0].softmax(1) + 0.75 * z[2].softmax(1), atol=1e-6)


def test_anytime_ensemble_combines_exits_one_to_k():
    z = logits(n=4)
    any_k = anytime_ensemble(z)
    assert len(any_k) == 4
    assert torch.allclose(any_k[0], z[0])
    assert torch.allclose(any_k[1], (z[0] + z[1]) / 2, atol=1e-6)
    assert torch.allclose(any_k[-1], exit_ensemble(z), atol=1e-6)
    assert torch.allclose(anytime_ensemble(z, weights=[1, 3, 1, 1])[1], 0.25 * z[0] + 0.75 * z[1], atol=1e-6)


def test_learnable_weights_get_gradients_and_fixed_ones_do_not():
    z, y = logits(), torch.randint(0, 7, (5,))
    ens = ExitEnsemble(3, mode="probs", learnable=True)
    torch.nn.functional.cross_entropy(ens(z), y).backward()
    assert ens.log_weights.grad is not None and ens.log_weights.grad.abs().sum() > 0
    assert torch.allclose(ens.weights, torch.full((3,), 1 / 3))
    fixed = ExitEnsemble(3, weights=[2, 1, 1])
    assert list(fixed.parameters()) == []
    assert torch.allclose(fixed(z), exit_ensemble(z, weights=[2, 1, 1]), atol=1e-6)
    assert torch.allclose(fixed.anytime(z)[1], (2 * z[0] + z[1]) / 3, atol=1e-5)
    assert repr(fixed) == "ExitEnsemble(num_exits=3, mode='logits', learnable=False, weights=[0.500, 0.250, 0.250])"


def test_ensemble_of_a_wrapped_model_in_eval(resnet18):
    model = timm_exits.wrap(resnet18, stages=[1, 2], input_size=(3, 32, 32), eval_output="ensemble").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        single = model(x)
        model.eval_output = "all"
        assert torch.allclose(single, exit_ensemble(model(x)), atol=1e-5)


def test_bad_input():
    z = logits()
    with pytest.raises(ValueError, match="mode must be one of"):
        exit_ensemble(z, mode="vote")
    with pytest.raises(ValueError, match=r"one number per exit \(3\)"):
        exit_ensemble(z, weights=[1, 2])
    with pytest.raises(TypeError, match="one tensor"):
        exit_ensemble(z[0])
    with pytest.raises(ValueError, match="combines 3 exits, got 2"):
        ExitEnsemble(3)(z[:2])
    with pytest.raises(ValueError, match="non-negative"):
        ExitEnsemble(3, weights=[1, -1, 1])
    with pytest.raises(ValueError, match="num_exits must be"):
        ExitEnsemble(0)


def test_the_ensemble_keeps_the_exits_dtype_and_computes_in_float32():
    z = [zi.to(torch.bfloat16) for zi in logits()]
    for mode in ("logits", "probs"):
        out = exit_ensemble(z, weights=[1, 2, 1], mode=mode)
        assert out.dtype == torch.bfloat16
        reference = exit_ensemble([zi.float() for zi in z], weights=[1, 2, 1], mode=mode)
        torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)
    assert all(e.dtype == torch.bfloat16 for e in anytime_ensemble(z))
    # integer and float64 weights give the same ensemble as float32 ones
    z32 = logits()
    for w in ([1, 0, 3], torch.tensor([1, 0, 3]), torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)):
        torch.testing.assert_close(exit_ensemble(z32, weights=w), 0.25 * z32[0] + 0.75 * z32[2], rtol=1e-6, atol=1e-6)


def test_ensemble_weight_edge_cases():
    z = logits()
    single = ExitEnsemble(1)  # one exit: the ensemble is that exit
    torch.testing.assert_close(single(z[:1]), z[0])
    zero = ExitEnsemble(3, weights=[1, 0, 1])  # a zero weight is allowed: that exit is left out
    torch.testing.assert_close(zero(z), (z[0] + z[2]) / 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zero.weights, torch.tensor([0.5, 0.0, 0.5]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"non-negative with a positive sum, got \[0.0, 0.0, 0.0\]"):
        ExitEnsemble(3, weights=[0, 0, 0])
    small = [0.1, 0.0, 0.3]  # any positive sum is valid, also one below 1
    torch.testing.assert_close(exit_ensemble(z, weights=small), 0.25 * z[0] + 0.75 * z[2], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="combines 3 exits, got 2"):
        ExitEnsemble(3).anytime(z[:2])
    assert len(ExitEnsemble(3, learnable=True).anytime(z)) == 3


def test_weights_follow_the_logits_device():
    # the meta device stands in for a GPU: weights made on the CPU must move to where the logits are
    z = [torch.empty(5, 7, device="meta") for _ in range(3)]
    for mode in ("logits", "probs"):
        assert exit_ensemble(z, weights=[1.0, 2.0, 1.0], mode=mode).device.type == "meta"
        assert ExitEnsemble(3, mode=mode)(z).device.type == "meta"


def test_geometric_ensemble_checks_its_sizes_and_is_seeded_by_the_generator():
    for num_exits, num_classes in [(0, 5), (3, 0), (2.0, 5), (3, "5")]:
        message = f"num_exits and num_classes must be ints >= 1, got {num_exits!r} and {num_classes!r}"
        with pytest.raises(ValueError, match=exactly(message)):
            timm_exits.GeometricEnsemble(num_exits, num_classes)
    smallest = timm_exits.GeometricEnsemble(1, 1)  # one exit, one class: the least that is valid
    assert smallest.num_exits == 1 and smallest.biases[0].shape == (1,)
    a, b = (timm_exits.GeometricEnsemble(3, 7, generator=torch.Generator().manual_seed(4)) for _ in range(2))
    assert all(torch.equal(wa, wb) for wa, wb in zip(a.weights, b.weights))  # the generator decides the initial weights
    assert [w.shape for w in a.weights] == [(1,), (2,), (3,)]  # exit k weighs exits 0..k
    z = logits(n=3)
    assert a.combine(z).shape == (5, 7)  # the deepest exit's ensemble
    with pytest.raises(ValueError, match=exactly("the ensemble has 3 exits, given the logits of 4")):
        a.combine(logits(n=4))
    with pytest.raises(ValueError, match=exactly("the ensemble has 3 exits, given the logits of 0")):
        a.combine([])
