"""How strong the test suite is: plant small, plausible bugs one at a time and see whether a test catches each.

Each bug is one textual change to one file of the package, made in a scratch copy of the
repository; the test file meant to catch it then runs against that copy. A bug that no test
catches is a hole in the suite. Prints one row per bug and exits 1 if any survives:

    python tools/planted_bugs.py [--only NAME ...]
    python tools/planted_bugs.py --check    # only that every bug's text and test files are found; no tests run

A test file is named by its file name alone and found wherever it lies under tests/, so the list
holds whether the suite is flat or in folders that mirror the package.

The first six are the ones that passed every test before the tests were rewritten against
independent references (docs/testing.md; the third now plants its fallback slip in the steps, where
moving every call onto the model's one loop put that path); the next five put back, one at a time,
the runtime faults that moving every call onto the model's one loop fixed; the next three are slips in the corrupted-digits evidence, the
next three in the timm-native saving and resetting, the next six in temperature scaling, patience,
Learn-then-Test and Zero Time Waste, three in compiled and streamed early exit, four in the host
reads and device-side schedules, one in the check of a stage row's width, one in early exit exported as one graph; the others are the kind
of slip the suite must keep catching. `mutmut` (docs/testing.md) does the same thing
mechanically and at scale; this list is the hand-picked, readable part.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    path: str  # file of the package, relative to the repository
    old: str  # text that occurs exactly once in it
    new: str
    tests: tuple[str, ...]  # pytest arguments: the test file(s) meant to catch it, by file name (found under tests/), and options


BUGS = [
    Bug("entropy criterion's sign flipped", "timm_exits/runtime/criteria.py",
        "return (probs * probs.clamp_min(1e-12).log()).sum(-1)", "return -(probs * probs.clamp_min(1e-12).log()).sum(-1)",
        ("test_inference.py",)),
    Bug("margin criterion returns the top probability alone", "timm_exits/runtime/criteria.py",
        "return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)", "return top[:, 0]", ("test_inference.py",)),
    Bug("fallback model hands each exit the next stage's feature", "timm_exits/model/steps.py",
        "return feats[0], (*feats[1:], final)", "return feats[-1], (*feats[1:], final)", ("test_bad_input.py", "test_inference.py")),
    Bug("MSD's teacher probabilities not detached", "timm_exits/losses/hints.py",
        "teachers = torch.stack([soft(z, T) for z in logits])",
        "teachers = torch.stack([F.softmax(z.float() / T, dim=-1) for z in logits])",
        ("test_losses.py",)),
    Bug("MATE's exits not detached inside its teachers", "timm_exits/losses/teachers.py",
        "stacked = torch.stack([z.detach().float() for z in logits])", "stacked = torch.stack([z.float() for z in logits])",
        ("test_losses.py",)),
    Bug("gradient checkpointing never applied", "timm_exits/model/multi_exit.py",
        "checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()",
        "checkpointed = False and self.grad_checkpointing and self.training and torch.is_grad_enabled()",
        ("test_training.py", "test_model.py", "-k", "checkpointing")),
    # the kind of slip the suite caught already, kept here so that it keeps catching it
    Bug("carried batch size not updated after samples leave", "timm_exits/runtime/rows.py",
        "return int(rows.numel())", "return value", ("test_inference.py",)),
    Bug("anytime ensemble divides by one exit too many", "timm_exits/runtime/early_exit.py",
        "z = (total / (k + 1)).to(z.dtype)", "z = (total / (k + 2)).to(z.dtype)", ("test_inference.py",)),
    Bug("budget search keeps thresholds that overspend", "timm_exits/calibration/thresholds.py",
        "if run(thresholds).flops <= budget:", "if run(thresholds).flops >= budget:", ("test_inference.py",)),
    Bug("calibrated entropy thresholds returned on the confidence scale", "timm_exits/calibration/thresholds.py",
        'user = [-t for t in conf_thresholds] if criterion == "entropy" else list(conf_thresholds)', "user = list(conf_thresholds)",
        ("test_inference.py",)),
    # (EED's logit ensemble without .detach() is no bug: the gradient through the mean of a sum of squared
    # deviations from that mean is zero, and the KL teacher is detached by soft(); its feature target is not so)
    Bug("EED's feature target not detached", "timm_exits/losses/distillation.py",
        "target_f = torch.stack(f).float().mean(0).detach()", "target_f = torch.stack(f).float().mean(0)", ("test_losses.py",)),
    Bug("BYOT's deepest exit CE weighted (1 - a)", "timm_exits/losses/hints.py", "        ce_weight[-1] = 1.0\n", "", ("test_losses.py",)),
    Bug("Phuong's temperature grows on unsure teachers", "timm_exits/losses/distillation.py",
        "grow = (teacher_maxprob.detach() > self.maxprob)", "grow = (teacher_maxprob.detach() < self.maxprob)", ("test_losses.py",)),
    Bug("KD scaled by T instead of T^2", "timm_exits/losses/base.py",
        "return kl * temperature**2 if t_squared else kl\n\n\ndef kd_matrix",
        "return kl * temperature if t_squared else kl\n\n\ndef kd_matrix",
        ("test_losses.py",)),
    Bug("unlabeled samples counted in the CE mean", "timm_exits/losses/base.py",
        "return per_sample.sum() / labeled.sum().clamp_min(1)", "return per_sample.sum() / len(target)", ("test_losses.py",)),
    Bug("ensemble weights not normalised", "timm_exits/ensemble.py",
        "w = torch.full((n,), 1.0 / n) if weights is None else weights / weights.sum()",
        "w = torch.full((n,), 1.0 / n) if weights is None else weights",
        ("test_ensemble.py",)),
    Bug("tokens laid on the grid without the transpose", "timm_exits/heads/builtin.py",
        "return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)",
        "return tokens.reshape(x.shape[0], x.shape[2], side, side)",
        ("test_heads.py",)),
    Bug("token mean pool includes the class and register tokens", "timm_exits/heads/builtin.py",
        "x = x[:, self.layout.num_prefix_tokens :].mean(1)", "x = x.mean(1)", ("test_heads.py",)),
    Bug("attention FLOPs drop the value matmul", "timm_exits/cost/handles.py",
        "return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])", "return math.prod(q[:-1]) * k[-2] * q[-1]", ("test_flops.py",)),
    Bug("pooling FLOPs ignore the window", "timm_exits/cost/handles.py",
        "return math.prod(_shape(outputs[0])) * math.prod(_ints(inputs[1]))", "return math.prod(_shape(outputs[0]))", ("test_flops.py",)),
    # the runtime faults that moving every call onto the model's one loop fixed, each put back one at a time
    Bug("a failed FLOPs count leaves fvcore's hooks behind", "timm_exits/cost/flops.py",
        "for hook_id in [h for h in m._forward_hooks if h not in post]:", "for hook_id in []:", ("test_runtime.py",)),
    Bug("calls that change modes do not take turns (FLOPs counts of two threads overlap)", "timm_exits/fx/modes.py",
        "    with _MODES:\n", "    with contextlib.nullcontext():\n", ("test_runtime.py", "-k", "threads")),
    Bug("collect_exit_logits leaves the model in eval mode", "timm_exits/calibration/cached.py",
        "    with evaluating(model):\n        for batch in Progress(progress)(loader,",
        "    model.eval()\n    if True:\n        for batch in Progress(progress)(loader,",
        ("test_runtime.py",)),
    Bug("the steps keep a head the user replaced", "timm_exits/model/multi_exit.py",
        "any(a is not b for a, b in zip(built[0], parts))", "built[0][0] is not parts[0]", ("test_runtime.py",)),
    Bug("early exit keeps what it learned after a head was replaced", "timm_exits/runtime/rows.py",
        "if learned is None or learned.steps is not steps:", "if learned is None:", ("test_runtime.py",)),
    # the corrupted-digits evidence: a task that leaks, or grades nothing, or a speedup predicted without the heads
    Bug("images split instead of scans (a test digit's variants seen in training)", "timm_exits/data/digits.py",
        ".subset(part[source] == p) for p in range(3)]",
        ".subset(_split_by_scan(labels[source], fractions, torch.Generator().manual_seed(seed)) == p) for p in range(3)]",
        ("test_data.py",)),
    Bug("every corruption at the same severity", "timm_exits/data/digits.py",
        "out[rows] = _APPLY[name](x[rows], severity[rows].to(x.dtype), g)",
        "out[rows] = _APPLY[name](x[rows], torch.full((len(rows),), 3.0), g)",
        ("test_data.py",)),
    Bug("the time-predicted speedup leaves out the heads", "timm_exits/cost/profile.py",
        "steps = [s + h for s, h in zip(self.segment_seconds, self.head_seconds)]", "steps = list(self.segment_seconds)",
        ("test_profile.py",)),
    # timm-native saving: a model that saves, loads and resets like a timm model
    Bug("reset_classifier forgets the exit heads", "timm_exits/model/multi_exit.py",
        "        for h in self.exits:\n            h.reset_classifier(num_classes)\n", "", ("test_timm_native.py",)),
    Bug("from_pretrained drops the saved eval_output", "timm_exits/deploy/hub.py",
        'eval_output=exits["eval_output"],', 'eval_output="all",', ("test_timm_native.py",)),
    Bug("export-backbone keeps the 'backbone.' prefix", "timm_exits/deploy/checkpoints.py",
        'backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}',
        'backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}', ("test_timm_native.py",)),
    # inference beyond max-prob thresholds: temperatures, patience, Learn-then-Test, Zero Time Waste's ensemble and cascade
    Bug("early exit reads confidences before the temperatures", "timm_exits/runtime/early_exit.py",
        "        if temperatures is not None:\n            z = z / temperatures[k]\n", "", ("test_temperature.py",)),
    Bug("the patience streak never restarts when the prediction changes", "timm_exits/runtime/criteria.py",
        "return torch.where(predicted == previous, streak + 1, 1)", "return streak + 1", ("test_patience.py",)),
    Bug("Learn-then-Test keeps testing past the first failure", "timm_exits/calibration/risk.py",
        "        if hoeffding_bentkus_p(risk, n, eps) > delta:\n            break\n        accepted = t",
        "        if hoeffding_bentkus_p(risk, n, eps) <= delta:\n            accepted = t", ("test_risk.py",)),
    Bug("the geometric ensemble forgets the rows of samples that left", "timm_exits/runtime/early_exit.py",
        "            history = [h[staying] for h in history]\n", "            history = history\n", ("test_ztw.py",)),
    Bug("a cascaded head lets its loss flow into the previous exit", "timm_exits/heads/cascade.py",
        "previous = self.norm(previous.detach() if self.detach else previous)", "previous = self.norm(previous)", ("test_cascade.py",)),
    Bug("a cascaded head starts as a layer of the feature's width alone", "timm_exits/heads/cascade.py",
        "bound = 1.0 / math.sqrt(fc.in_features + self.previous.in_features)",
        "bound = 1.0 / math.sqrt(fc.in_features)", ("test_cascade.py",)),
    # performance: compiled parts, the stream, one host read per exit, losses that compute on the device
    Bug("compiled parts get a graph per batch size", "timm_exits/runtime/compiled.py",
        "self.compiled = torch.compile(module, **compile_kwargs)",
        "self.compiled = torch.compile(module, **{**compile_kwargs, 'dynamic': False})", ("test_compiled.py",)),
    Bug("FLOPs counted through the compiled parts", "timm_exits/cost/flops.py",
        "steps = [step.uncompiled() for step in model.steps()] if", "steps = [step for step in model.steps()] if", ("test_compiled.py",)),
    Bug("the stream's queue hands out the rows it keeps", "timm_exits/runtime/stream.py",
        "parts.append(take_rows(carried, self.kind, rows[:wanted]))",
        "parts.append(take_rows(carried, self.kind, rows[-wanted:]))", ("test_stream.py",)),
    Bug("one sample that should leave stays when some but not all leave", "timm_exits/runtime/rows.py",
        "    return order[:count], order[count:]\n", "    return order[: count - 1], order[count - 1 :]\n", ("test_inference.py",)),
    Bug("early exit reads the device twice per exit", "timm_exits/runtime/rows.py",
        "    if count == passed.numel():\n", "    passed.nonzero()\n    if count == passed.numel():\n", ("test_inference.py",)),
    Bug("the SDN ramp reads the epoch one late", "timm_exits/losses/ce.py",
        "e = self.epoch.to(device) + 1", "e = self.epoch.to(device)", ("test_losses.py",)),
    Bug("the adaptive temperature grows whatever the teacher's confidence", "timm_exits/losses/distillation.py",
        "grow = (teacher_maxprob.detach() > self.maxprob)", "grow = (teacher_maxprob.detach() > -1.0)", ("test_losses.py",)),
    # the stage-width check: a stage row whose module outputs another width than feature_info's
    Bug("a stage row is cut at a width other than its table's", "timm_exits/fx/stages.py",
        "elif (found := read_feature(shapes[node], chans, model, input_hw)[1]) != chans:",
        "elif (found := read_feature(shapes[node], chans, model, input_hw)[1]) < 0:", ("test_misuse.py",)),
    Bug("the one-graph export lets a later exit overwrite a sample that already left", "timm_exits/deploy/early_exit_graph.py",
        "stay = still.nonzero().squeeze(1)", "stay = torch.ones_like(still).nonzero().squeeze(1)",
        ("test_early_exit_graph.py", "-m", "not slow")),
    Bug("the one-graph export runs every later step on the whole batch (right answers, no time saved)",
        "timm_exits/deploy/early_exit_graph.py", "if example_input is not None and _torch_at_least(GATHER_TORCH):",
        "if False:", ("test_early_exit_graph.py", "-m", "not slow")),
]


def problems(bug: Bug, root: Path) -> list[str]:
    """What keeps `bug` from being planted and run in the tree at `root`: its text not found exactly once, a test file not found once."""
    found = []
    path = root / bug.path
    count = path.read_text().count(bug.old) if path.is_file() else 0
    if count != 1:
        where = "" if path.is_file() else " (no such file)"
        found.append(f"the text to change occurs {count} times in {bug.path}{where}: the code moved; update BUGS")
    for arg in bug.tests:
        if arg.endswith(".py") and len(test_files(arg, root)) != 1:
            found.append(f"{arg} names {len(test_files(arg, root))} files under tests/, not one")
    return found


def test_files(name: str, root: Path) -> list[Path]:
    return sorted((root / "tests").rglob(name))


def pytest_args(bug: Bug, root: Path) -> list[str]:
    """The bug's pytest arguments, each test file's name replaced by its path under `root`."""
    return [str(test_files(arg, root)[0].relative_to(root)) if arg.endswith(".py") else arg for arg in bug.tests]


def plant(bug: Bug, into: Path) -> None:
    if found := problems(bug, into):
        raise SystemExit(f"{bug.name}: " + "; ".join(found))
    path = into / bug.path
    path.write_text(path.read_text().replace(bug.old, bug.new))


def run(bug: Bug) -> tuple[str, float, str]:
    """Plant `bug` in a scratch copy and run its tests there; returns ("caught" | "SURVIVED" | "BROKEN", seconds, pytest's last line).

    Caught means a test failed on an assertion; a run that could not even collect its tests is
    "BROKEN" (the planted text no longer makes sense), not a catch.
    """
    with tempfile.TemporaryDirectory(prefix="planted-") as scratch:
        copy = Path(scratch)
        for name in ("timm_exits", "tests", "benchmarks", "examples", "tools"):
            shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", copy)
        plant(bug, copy)
        env = {**os.environ, "PYTHONPATH": str(copy)}  # the copy shadows the installed package
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args(bug, copy)],
                              cwd=copy, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        last = lines[-1] if lines else done.stderr.strip()[-200:]
        status = "SURVIVED" if done.returncode == 0 else "caught" if done.returncode == 1 and " failed" in last else "BROKEN"
        return status, time.perf_counter() - start, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only the bugs whose name contains one of these words")
    parser.add_argument("--check", action="store_true", help="only check that every bug's text and test files are found, running no test")
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.only or any(w in b.name for w in args.only)]
    if args.check:
        unfound = {bug.name: found for bug in bugs if (found := problems(bug, ROOT))}
        for name, found in unfound.items():
            print(f"{name}: " + "; ".join(found))
        print(f"{len(bugs) - len(unfound)} of {len(bugs)} planted bugs found in place")
        return 1 if unfound else 0
    survivors = []
    for bug in bugs:
        status, seconds, last = run(bug)
        print(f"{status:8s}  {seconds:5.1f}s  {bug.name}  ({last})", flush=True)
        if status != "caught":
            survivors.append(bug.name)
    print(f"\n{len(bugs) - len(survivors)} of {len(bugs)} planted bugs caught" + (f"; survivors: {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
