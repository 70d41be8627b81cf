"""Every example runs as a user would run it (``--smoke``: seconds on CPU), and says what it promises."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PROMISES = {
    "quickstart.py": "final exit == backbone output",
    "train_loop.py": "unwrap() gives the trained ResNet",
    "train_timm.py": "resumed from model_best.pth.tar",
    "train_lightning.py": "validation: {'val_acc/exit1'",
    "train_ddp.py": "2 replicas, largest difference from rank 0: 0\nreplicas identical",
}
NEEDS = {"train_lightning.py": "lightning"}  # test dependencies (the dev extra), not dependencies of timm-exits
LAUNCH = {"train_ddp.py": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]}


def test_every_example_has_a_promise():
    assert sorted(PROMISES) == [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path):
    need = NEEDS.get(path.name)
    # a missing one fails, never skips, so that CI (which installs the dev extra) always runs every example
    if need:
        assert importlib.util.find_spec(need) is not None, f"{path.name} needs {need}, a test dependency: pip install -e '.[dev]'"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if path.name in LAUNCH else os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v != ""}
    command = [sys.executable, *LAUNCH.get(path.name, []), str(path), "--smoke"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert PROMISES[path.name] in done.stdout, done.stdout[-3000:]


def test_train_timm_reads_an_image_folder_through_timms_loaders_and_writes_per_exit_columns(tmp_path):
    """A tiny ImageFolder built here from the digits: timm's create_dataset reads it, summary.csv gets every exit's terms."""
    from PIL import Image

    from timm_exits.data import corrupted_digits

    task = corrupted_digits(seed=0, variants=1)
    for split, data in (("train", task.train), ("validation", task.val)):
        for c in range(10):
            for i, image in enumerate(data.x[data.y == c][:4]):  # 40 training images: one batch of 32
                folder = tmp_path / "digits" / split / str(c)
                folder.mkdir(parents=True, exist_ok=True)
                scaled = (image[0] - image.min()) / (image.max() - image.min()) * 255
                Image.fromarray(scaled.byte().numpy(), mode="L").save(folder / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "examples" / "train_timm.py"), "--smoke",
               "--data", str(tmp_path / "digits"), "--output", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_ce/exit1", "train_ce/exit4", "eval_top1", "eval_top1/exit1", "eval_top1/exit4"} <= set(header)
    assert len((tmp_path / "out" / "summary.csv").read_text().splitlines()) == 3  # a header and two epochs
    import timm

    assert timm.create_model("resnet18", num_classes=10, checkpoint_path=str(tmp_path / "out" / "backbone.safetensors")) is not None
