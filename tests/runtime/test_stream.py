"""Early exit over a stream: each sample's decision as `early_exit` makes it, every segment run on full batches."""
import pytest
import timm
import torch

import timm_exits
from conftest import exactly, resnet10t_exits

TEMPERATURE = [1.5, 0.8, 1.0]


def model_and_data(cascade=False):
    model, x = resnet10t_exits(150, cascade)
    with torch.no_grad():
        every = model.forward_exits(x)
    thresholds = []
    for z, t in zip(every[:-1], TEMPERATURE):  # halfway between the two middle confidences: no sample sits on a threshold
        middle = (z / t).softmax(-1).amax(-1).sort().values[74:76]
        thresholds.append(float(middle.mean()))
    return model, x, thresholds


@pytest.mark.parametrize("cascade", [False, True])
def test_each_sample_gets_early_exits_answer_and_every_segment_sees_full_batches(cascade):
    model, x, thresholds = model_and_data(cascade)
    temperature = TEMPERATURE
    expected = model.early_exit(x, threshold=thresholds, temperature=temperature)
    seen = {k: [] for k in range(3)}
    hooks = [step.segment.register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0].shape[0]))
             for k, step in enumerate(model.steps())]
    try:
        batches = [x[i : i + 16] for i in range(0, 150, 16)] + [x[150:]]  # uneven sizes, an empty one at the end
        result = timm_exits.early_exit_stream(model, batches, threshold=thresholds, temperature=temperature)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(result.exit_index, expected.exit_index) and min(result.exit_counts(3)) > 10
    torch.testing.assert_close(result.logits, expected.logits)
    torch.testing.assert_close(result.flops, expected.flops)
    for k, sizes in seen.items():
        assert sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16, (k, sizes)  # full batches but the last
    assert sum(seen[0]) == 150 and sum(seen[1]) == 150 - result.exit_counts(3)[0]


def test_bad_streams_are_named():
    model, x, _ = model_and_data()
    with pytest.raises(ValueError, match=exactly("criterion='patience' reads each sample's earlier exits: use model.early_exit for it")):
        timm_exits.early_exit_stream(model, [x], criterion="patience")
    with pytest.raises(ValueError, match=exactly("batches is empty (or every batch in it is): there is nothing to classify")):
        timm_exits.early_exit_stream(model, [])
    with pytest.raises(ValueError, match=r"^batches is empty \(or every batch in it is\)"):
        timm_exits.early_exit_stream(model, [x[:0], x[:0]])
    cached = timm_exits.collect_exit_logits(model, [(x, torch.randint(0, 5, (150,)))], progress=False)
    with pytest.raises(ValueError,
                       match=r"^the calibration was made with ensemble=True: early_exit_stream decides on each exit's own logits"):
        timm_exits.early_exit_stream(model, [x], threshold=timm_exits.calibrate_thresholds(cached, cached.flops[-1], ensemble=True))
    with pytest.raises(ValueError,
                       match=exactly("every batch must have one sample shape: the first had (3, 32, 32), this one (3, 64, 64)")):
        timm_exits.early_exit_stream(model, [x[:4], torch.randn(4, 3, 64, 64)])
    with pytest.raises(ValueError, match=exactly("batch_size must be an int >= 1, got 0")):
        timm_exits.early_exit_stream(model, [x], batch_size=0)
    one_logit = timm_exits.wrap(timm.create_model("resnet10t", num_classes=1), stages=[1, 2], input_size=(3, 32, 32)).eval()
    with pytest.raises(ValueError, match=r"^criterion='max_prob' reads a softmax, which is always 1 over one logit "
                                         r"\(every sample would leave at exit 1\); pass a callable criterion"):
        timm_exits.early_exit_stream(one_logit, [x])


def test_empty_batches_are_skipped_wherever_they_come():
    model, x, thresholds = model_and_data()
    expected = timm_exits.early_exit_stream(model, [x[:64], x[64:]], threshold=thresholds)
    # the batch size comes from the first non-empty one
    result = timm_exits.early_exit_stream(model, [x[:0], x[:64], x[:0], x[64:]], threshold=thresholds)
    assert torch.equal(result.exit_index, expected.exit_index)
