"""Long work reports progress where standard error is a log, not a terminal (pytest's capture is not one).

A log gets a plain line at the start, at most one per interval and one at the end; a terminal
keeps tqdm's bar; ``progress=False`` says nothing. The clock is a fake one that the loops move,
so the pace is checked without timing anything.
"""
import io
import itertools
import logging
import re

import pytest
import timm
import torch

import timm_exits
from timm_exits._progress import Progress
from timm_exits.demo import fit

LINE = re.compile(r"^counting, batch (\d+)/1000 \((\d+)%\), (\d+)s$")


class FakeClock:
    """Seconds that pass only when the loop under test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_log_gets_a_line_at_the_start_the_end_and_at_most_one_per_interval(capsys):
    clock = FakeClock()
    for _ in Progress(True, interval=100, clock=clock)(range(1000), "counting"):
        clock.now += 1  # a second a batch: 1000 s in all
    captured = capsys.readouterr()
    assert captured.out == ""  # standard output stays the results'
    lines = captured.err.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines  # every line says where the loop is, in its share and seconds
    done = [int(m[1]) for m in matches]
    assert done[0] == 0 and done[-1] == 1000 and lines[-1].endswith("(100%), 1000s")
    assert [int(m[2]) for m in matches] == [100 * n // 1000 for n in done]
    assert done == sorted(set(done))  # the end is not said twice
    # throttled: a second a batch and one line per 100 s at most, so 100 batches apart at least
    assert all(b - a >= 100 for a, b in itertools.pairwise(done))
    assert 10 <= len(lines) <= 1000 // 100 + 1


def test_the_loops_of_one_job_share_the_pace(capsys):
    clock = FakeClock()
    report = Progress(True, interval=1000, clock=clock)
    for epoch in range(3):
        for _ in report(range(30), f"training: epoch {epoch + 1}/3"):
            clock.now += 1
    # the first start, then each epoch's end; no epoch starts with a line of its own right after the last one's end
    assert capsys.readouterr().err.splitlines() == [
        "training: epoch 1/3, batch 0/30 (0%), 0s",
        "training: epoch 1/3, batch 30/30 (100%), 30s",
        "training: epoch 2/3, batch 30/30 (100%), 60s",
        "training: epoch 3/3, batch 30/30 (100%), 90s",
    ]


def test_a_loader_without_a_length_is_reported_by_position(capsys):
    clock = FakeClock()
    for _ in Progress(True, interval=5, clock=clock)((i for i in range(12)), "streaming", unit="image"):
        clock.now += 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "streaming, image 0, 0s" and lines[-1] == "streaming, image 12, 12s"
    assert "%" not in "".join(lines)


def test_progress_off_says_nothing(capfd):
    clock = FakeClock()
    items = list(range(1000))
    seen = []
    for item in Progress(False, interval=0, clock=clock)(items, "counting"):
        seen.append(item)
        clock.now += 1
    assert seen == items
    assert capfd.readouterr() == ("", "")


def test_by_default_a_log_gets_the_lines_through_logging_at_info(capsys, caplog):
    clock = FakeClock()
    for _ in Progress(None, interval=100, clock=clock)(range(1000), "counting"):
        clock.now += 1
    assert capsys.readouterr().err == ""  # a script that never configured logging stays quiet
    with caplog.at_level(logging.INFO, logger="timm_exits"):
        for _ in Progress(None, interval=100, clock=clock)(range(1000), "counting"):
            clock.now += 1
    records = [r for r in caplog.records if r.name == "timm_exits"]
    assert records and all(r.levelno == logging.INFO and LINE.match(r.getMessage()) for r in records)
    assert records[-1].getMessage().startswith("counting, batch 1000/1000 (100%)")
    assert capsys.readouterr().err == ""  # through the application's handlers, not beside them


def test_a_terminal_keeps_the_tqdm_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    for _ in Progress(True)(range(50), "counting"):
        pass
    assert "counting:" in terminal.getvalue() and "\r" in terminal.getvalue() and "/50" in terminal.getvalue()
    assert "counting, batch" not in terminal.getvalue()


@pytest.fixture(scope="module")
def model():
    return timm_exits.wrap(timm.create_model("resnet10t", num_classes=10), stages=[1], input_size=(3, 32, 32))


def loader(batches: int):
    return [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)) for _ in range(batches)]


def test_collecting_exit_logits_into_a_log_says_how_far_it_came(model, capsys, caplog):
    timm_exits.collect_exit_logits(model, loader(3), progress=True)
    err = capsys.readouterr().err
    assert "collecting exit logits, batch 0/3 (0%)" in err and "collecting exit logits, batch 3/3 (100%)" in err
    assert "\r" not in err  # lines, not a bar redrawn in place
    timm_exits.collect_exit_logits(model, loader(3), progress=False)
    assert capsys.readouterr().err == ""
    with caplog.at_level(logging.INFO, logger="timm_exits"):
        timm_exits.collect_exit_logits(model, loader(3))
    assert capsys.readouterr().err == ""
    assert any(r.getMessage().startswith("collecting exit logits, batch 3/3 (100%)") for r in caplog.records)


def test_profile_exits_into_a_log_says_what_it_times_and_the_round(model, capsys):
    x = torch.randn(2, 3, 32, 32)
    timm_exits.profile_exits(model, x, repeats=2, beside={"early exit": lambda: model.early_exit(x, threshold=0.5)}, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("timing the plain ResNet, 2 segments and 1 exit head, and 1 callable beside them, on a batch of 2: "
                        "2 rounds after one warm-up round")
    assert lines[1].startswith("timing exits, round 0/3 (0%)") and lines[-1].startswith("timing exits, round 3/3 (100%)")
    timm_exits.profile_exits(model, x, repeats=2, progress=False)
    assert capsys.readouterr().err == ""


def test_the_demo_training_into_a_log_says_the_epoch_and_batch(capfd):
    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))
    net = timm.create_model("resnet10t", num_classes=10)
    fit(net, torch.nn.functional.cross_entropy, x, y, epochs=2, batch_size=8, progress="baseline")
    lines = capfd.readouterr().err.splitlines()
    assert lines[0].startswith("training baseline: epoch 1/2, batch 0/3 (0%)")
    assert lines[-1].startswith("training baseline: epoch 2/2, batch 3/3 (100%)")
    fit(net, torch.nn.functional.cross_entropy, x, y, epochs=1, batch_size=8)
    assert capfd.readouterr().err == ""
