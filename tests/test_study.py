"""The loss study's statistics: intervals, paired differences over common seeds, and verdicts (benchmarks/loss_study.py)."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("loss_study", ROOT / "benchmarks" / "loss_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_interval_is_students_t(study):
    mean, half = study.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    # 19 degrees of freedom
    assert study.interval([1.0, 3.0] * 10)[1] == pytest.approx(2.093 * math.sqrt(20 / 19) / math.sqrt(20), rel=1e-3)
    assert math.isnan(study.interval([1.0])[1])


def test_verdicts_need_every_part_on_the_claimed_side(study):
    assert study.verdict([[1.0, 1.1, 0.9], [0.5, 0.6, 0.4]]) == "confirmed"
    assert study.verdict([[1.0, 1.1, 0.9], [-0.5, -0.6, -0.4]]) == "contradicted"
    assert study.verdict([[1.0, -1.0, 0.5]]) == "not seen"
    assert study.verdict([]) == study.verdict([[1.0]]) == "not seen (fewer than two common seeds)"


def test_differences_pair_the_same_seeds(study):
    results = {"a": {"0": {"test": [0.5]}, "1": {"test": [0.7]}, "2": {"test": [0.9]}}, "b": {"2": {"test": [0.1]}, "0": {"test": [0.4]}}}
    assert study.paired(results, "a", "b", "test", 0) == pytest.approx([0.1, 0.8])  # seeds 0 and 2, in order


def test_a_report_of_a_resumed_study_with_uneven_seeds_runs(study, tmp_path, capsys):
    pytest.importorskip("matplotlib")

    def run(acc):
        return {"test": [acc] * 4, "anytime_ensemble": [acc] * 4, "val_by_epoch": [[acc] * 4] * 2, "curve": [acc] * 20,
                "curve_flops": [1e6 * (i + 1) for i in range(20)], "seconds": 1.0}

    results = {"meta": {"epochs": 2, "batch": 64, "stages": [1, 2, 3], "flops": [1e6, 2e6, 3e6, 4e6], "backbone_flops": 4e6,
                        "budgets": [1e6 * (i + 1) for i in range(20)], "train": 10, "val": 5, "test": 5, "labeled": 2},
               "baseline": {"0": {"test": [0.8], "val_by_epoch": [[0.7], [0.8]], "seconds": 1.0},
                            "1": {"test": [0.82], "val_by_epoch": [[0.7], [0.8]], "seconds": 1.0}},
               **{name: {"0": run(0.80), "1": run(0.81), "2": run(0.83)} for name in study.LOSSES},
               "eed": {"0": run(0.85), "1": run(0.86)}}
    study.report(results, str(tmp_path / "study.png"))
    out = capsys.readouterr().out
    ce_row = next(line for line in out.splitlines() if line.startswith("| ce |"))
    eed_row = next(line for line in out.splitlines() if line.startswith("| eed |"))
    assert "(n=" not in ce_row and eed_row.count("(n=2)") == 4  # a cell over fewer seeds than the header's says how many
    assert (tmp_path / "study.png").exists()


def test_a_second_dataset_sets_each_verdict_beside_the_first_and_shows_presets_and_early_exit(study, tmp_path, capsys):
    pytest.importorskip("matplotlib")

    def run(acc):
        return {"test": [acc] * 4, "anytime_ensemble": [acc] * 4, "val_by_epoch": [[acc] * 4] * 2, "curve": [acc] * 20,
                "curve_flops": [1e6 * (i + 1) for i in range(20)], "seconds": 1.0}

    def study_results(data, eed_gain):
        meta = {"epochs": 2, "batch": 64, "stages": [1, 2, 3], "flops": [1e6, 2e6, 3e6, 4e6], "backbone_flops": 4e6,
                "budgets": [1e6 * (i + 1) for i in range(20)], "train": 10, "val": 5, "test": 5, "labeled": 2}
        if data:
            meta["data"] = data
        out = {"meta": meta, **{name: {s: run(0.80 + 0.01 * int(s)) for s in "012"} for name in study.LOSSES},
               "baseline": {s: {"test": [0.8], "val_by_epoch": [[0.7], [0.8]], "seconds": 1.0} for s in "012"}}
        out["eed"] = {s: run(0.80 + 0.01 * int(s) + eed_gain + 0.001 * int(s)) for s in "012"}
        return out

    digits, fashion = study_results(None, 0.02), study_results("Fashion-MNIST", -0.02)
    fashion["sdn/authors"] = {s: run(0.9) for s in "012"}
    fashion["early_exit"] = {"seed": 0, "loss": "eed", "repeats": 3, "batch": 64, "threads": 2, "segment_seconds": [1, 1, 1, 1],
                             "budgets": [{"budget": 2e6, "accuracy": 0.8, "flops": 1.9e6, "exit_shares": [0.5, 0.2, 0.2, 0.1],
                                          "measured": 1.5, "measured_per_batch": 1.4, "time_predicted": 1.6, "flops_predicted": 2.1}]}
    study.report(fashion, str(tmp_path / "f.png"), beside=digits)
    out = capsys.readouterr().out
    assert out.startswith("Fashion-MNIST: 10 train")
    assert "| sdn, authors' preset | 90.00 ± 0.00 |" in out
    assert "| 2.00 | 80.00 | 1.90 | 1.50x | 1.40x | 1.60x | 2.10x | 50% / 20% / 20% / 10% |" in out
    assert "| paper | claim | corrupted digits | Fashion-MNIST | same verdict |" in out
    eed = next(line for line in out.splitlines() if line.startswith("| EED (Lee et al.) |"))
    assert "| confirmed | contradicted | no |" in eed  # better than ce on the digits, worse here
    assert "Published for resnet18 on Fashion-MNIST" in out
