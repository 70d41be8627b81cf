"""The main job runs end to end and learns something (one short epoch)."""
import pathlib

import pytest

from conftest import fashion_mnist_arrays, write_idx_files
from timm_exits.cli import main
from timm_exits.data import DEBIAN_FASHION_MNIST
from timm_exits.demo import load_digits_32, run_demo


def test_digits_split_is_fixed_and_32x32():
    a, b = load_digits_32(), load_digits_32()
    assert a[0].shape == (1347, 1, 32, 32) and a[2].shape == (450, 1, 32, 32)
    assert (a[1] == b[1]).all() and (a[3] == b[3]).all()


def test_demo_trains_and_reports_every_exit_beside_its_baselines(tmp_path):
    lines = []
    result = run_demo(epochs=3, variants=1, log=lines.append, plot=str(tmp_path / "tradeoff.png"))
    assert len(result["accuracy"]) == 4
    assert result["accuracy"][-1] > 0.3  # well above chance (0.1) after three short epochs on the corrupted digits
    assert any(line.startswith("exit 4         head (backbone)") for line in lines)
    assert [line.split()[0] for line in lines if line.startswith(("baseline ", "smaller plain "))] == ["baseline", "smaller"]
    assert set(result["baselines"]) == {"baseline", "smaller plain"}
    assert result["baselines"]["baseline"]["flops"] == result["flops"][-1] > result["baselines"]["smaller plain"]["flops"]
    assert result["flops"] == sorted(result["flops"]) and result["flops"][0] > 0
    # the early-exit trade-off: five budgets from the first exit's cost to the whole model's, each speedup three ways
    budgets = result["early_exit"]["budgets"]
    assert len(budgets) == 5 and budgets[-1]["exit_shares"][-1] == 1.0 and budgets[0]["exit_shares"][0] == 1.0
    assert all(b["measured"] > 0 and b["measured_per_batch"] > 0 and b["time_predicted"] > 0 for b in budgets)
    assert all(b["flops_predicted"] > 0.99 for b in budgets)
    assert budgets[-1]["flops_predicted"] == pytest.approx(1.0, abs=1e-3)  # nobody leaves early: no gain
    profile = result["early_exit"]["profile"]
    assert [b["time_predicted"] for b in budgets] == [profile.predicted_speedup(b["exit_shares"]) for b in budgets]
    header = next(line for line in lines if line.lstrip().startswith("budget MFLOPs"))
    assert [h in header for h in ("streamed", "batch by batch", "time-predicted", "FLOPs-predicted")] == [True] * 4
    # the takeaway: one line, the numbers of the budget where the share of images leaving early is nearest half
    takeaway = result["early_exit"]["takeaway"]
    assert takeaway in lines and takeaway.startswith("takeaway: ")
    row = min(budgets, key=lambda b: abs(0.5 - (1 - b["exit_shares"][-1])))
    quoted = [
        f"{row['budget'] / 1e6:.2f} MFLOPs",
        f"{1 - row['exit_shares'][-1]:.0%} of images leave early",
        f"streamed early exit is {row['measured']:.2f}x",
        f"batch by batch {row['measured_per_batch']:.2f}x",
        f"time-predicted {row['time_predicted']:.2f}x",
    ]
    assert [q in takeaway for q in quoted] == [True] * len(quoted), takeaway
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000


def test_demo_takes_a_loss_by_name_and_trains_a_teacher_for_ekd(capfd):
    lines = []
    result = run_demo(loss="ekd", epochs=1, variants=1, baselines=False, log=lines.append, progress=False)
    assert result["loss"] == "ekd" and len(result["accuracy"]) == 4 and "baselines" not in result
    err = capfd.readouterr().err  # progress=False: neither the teacher's training nor the rest says how far it came
    assert not [line for line in err.splitlines() if line.startswith(("training ", "collecting exit logits", "timing "))]
    assert any("training the teacher" in line for line in lines)
    assert any(line.startswith("loss: EnsembleKnowledgeDistillationLoss(") for line in lines)


def test_cli_rejects_an_unknown_loss(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["demo", "--loss", "kd"])
    assert "invalid choice: 'kd'" in capsys.readouterr().err


def test_cli_lists_stages(capsys):
    assert main(["stages", "resnet18", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "layer3" in out and "(final: feeds the head)" in out


def test_the_demo_into_a_log_says_how_far_its_long_work_came(capsys):
    import torch

    import timm_exits

    run_demo(epochs=1, variants=1, baselines=False, log=lambda line: None)  # standard error is a log here, not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err  # plain lines, not a bar redrawn in place
    lines = err.splitlines()
    assert any(line.startswith("training eed: epoch 1/1, batch 0/") for line in lines)
    assert any(line.startswith("training eed: epoch 1/1, batch ") and "(100%)" in line for line in lines)
    assert any(line.startswith("collecting exit logits, batch ") and "(100%)" in line for line in lines)
    timing = "timing the plain ResNet, 4 segments and 3 exit heads, and 11 callables beside them"  # plain; 5 budgets x 2 ways
    assert any(line.startswith(timing) for line in lines)
    assert any(line.startswith("timing exits, round 6/6 (100%)") for line in lines)
    model = timm_exits.wrap(__import__("timm").create_model("resnet10t", num_classes=10), stages=[1], input_size=(3, 32, 32))
    timm_exits.collect_exit_logits(model, [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))], progress=False)
    assert capsys.readouterr().err == ""  # off when asked, and by default where standard error is not a terminal and logging is not set up
    timm_exits.collect_exit_logits(model, [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))])
    assert capsys.readouterr().err == ""


def test_demo_refuses_a_final_stage_before_building_the_data(monkeypatch, capsys):
    """`timm-exits demo --stages 4` built the 10,782 digits, then said stage 4 is the final one."""
    import timm_exits.data

    def built(*args, **kwargs):
        raise AssertionError("the data was built before the stages were checked")

    monkeypatch.setattr(timm_exits.data, "corrupted_digits", built)
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--stages", "4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("timm-exits demo: error: ") and "final" in err and "data was built" not in err, err


def test_demo_on_fashion_mnist_files_a_user_has(tmp_path):
    write_idx_files(tmp_path / "FashionMNIST" / "raw", fashion_mnist_arrays(n_train=5200, n_test=60))
    lines = []
    result = run_demo(data="fashion-mnist", data_root=tmp_path, train_size=200, epochs=1, baselines=False, log=lines.append,
                      progress=False)
    assert lines[0] == ("Fashion-MNIST: 200 train / 5000 validation (both from the training file) / 60 test images, 1x28x28, 10 classes "
                        f"(read from {tmp_path})")
    assert len(result["accuracy"]) == 4 and len(result["early_exit"]["budgets"]) == 5


def test_demo_refuses_fashion_mnist_arguments_with_the_digits_and_a_folder_without_the_files(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"data_root=.* and train_size=None are Fashion-MNIST's: give data='fashion-mnist'"):
        run_demo(data_root=tmp_path)
    with pytest.raises(ValueError, match=r"data must be one of \['digits', 'fashion-mnist'\], got 'mnist'"):
        run_demo(data="mnist")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--data", "fashion-mnist", "--data-root", str(tmp_path), "--no-baselines", "--epochs", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "timm-exits demo: error: Fashion-MNIST: train-images-idx3-ubyte" in err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


@pytest.mark.slow  # a minute or two: 15,000 real images through resnet18 for the validation, test and timing
@pytest.mark.skipif(not pathlib.Path(DEBIAN_FASHION_MNIST).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_demo_command_on_the_real_fashion_mnist(tmp_path, capsys):
    assert main(["demo", "--data", "fashion-mnist", "--train-size", "500", "--epochs", "1", "--no-baselines",
                 "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "Fashion-MNIST: 500 train / 5000 validation (both from the training file) / 10000 test images" in out
    assert "takeaway: " in out and (tmp_path / "p.png").stat().st_size > 1000
