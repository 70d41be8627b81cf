"""The main job runs end to end and learns something (two short epochs)."""
from timm_exits.cli import main
from timm_exits.demo import load_digits_32, run_demo


def test_digits_split_is_fixed_and_32x32():
    a, b = load_digits_32(), load_digits_32()
    assert a[0].shape == (1347, 1, 32, 32) and a[2].shape == (450, 1, 32, 32)
    assert (a[1] == b[1]).all() and (a[3] == b[3]).all()


def test_demo_trains_and_reports_every_exit(tmp_path):
    lines = []
    result = run_demo(epochs=2, log=lines.append, plot=str(tmp_path / "tradeoff.png"))
    assert len(result["accuracy"]) == 4
    assert result["accuracy"][-1] > 0.3  # well above chance (0.1) after two short epochs (0.51 when written)
    assert any(line.strip().startswith("4  head (backbone)") for line in lines)
    assert result["flops"] == sorted(result["flops"]) and result["flops"][0] > 0
    # the early-exit trade-off: five budgets from the first exit's cost to the whole model's
    budgets = result["early_exit"]["budgets"]
    assert len(budgets) == 5 and budgets[-1]["exit_shares"][-1] == 1.0 and budgets[0]["exit_shares"][0] == 1.0
    assert result["early_exit"]["speedup"] > 0 and any("faster than the plain" in line for line in lines)
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000


def test_demo_takes_a_loss_by_name_and_trains_a_teacher_for_ekd():
    lines = []
    result = run_demo(loss="ekd", epochs=1, log=lines.append)
    assert result["loss"] == "ekd" and len(result["accuracy"]) == 4
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
