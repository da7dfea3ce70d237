"""Kill running stages at random moments (SIGKILL), or ask them to stop (SIGTERM): ``--resume``
must finish the run with nothing lost, and a resumed pretraining must end bit-identical to one
that was never interrupted (CPU, fixed seed)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backbone.models.weights import load_checkpoint
from test_pipeline import TINY as TINY_STUDY

ROOT = Path(__file__).resolve().parents[1]
# Long enough (about 3 s of training) that kills land inside training; checkpoint_every_s makes
# checkpoints mid-epoch too, so kill points fall on both kinds of resume position.
PRETRAIN = """
name: pre
data: {train_size: 800, test_size: 100, num_classes: 4, val_fraction: 0.2}
model: {arch: resnet8, width: 8}
pretrain: {epochs: 6, batch_size: 16, warmup_epochs: 0, stochastic_depth: 0.2, checkpoint_every_s: 0.2}
"""
# The tiny study of test_pipeline, with checkpoints often enough that kills land between them.
PIPELINE = TINY_STUDY.replace("stochastic_depth: 0.2}", "stochastic_depth: 0.2, checkpoint_every_s: 0.2}").replace(
    "checkpoint_every: 128}", "checkpoint_every: 64}")
assert PIPELINE.count("checkpoint_every_s: 0.2") == 1 and "checkpoint_every: 64}" in PIPELINE


def start(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    log = open(cwd / f"{module}.log", "a")
    return subprocess.Popen(
        [sys.executable, "-m", module, "--config", "cfg.yaml", *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "DYNDEPTH_CACHE": str(cwd / "cache")},
    )


def finish(module: str, *args: str, cwd: Path) -> None:
    proc = start(module, *args, cwd=cwd)
    assert proc.wait(timeout=600) == 0, (cwd / f"{module}.log").read_text()[-3000:]


def mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def scores(value):
    """``value`` without its wall-clock figures (timings, images per second), at any depth."""
    if isinstance(value, dict):
        return {k: scores(v) for k, v in value.items()
                if k != "latency" and not any(t in k for t in ("time", "_s", "per_s"))}
    if isinstance(value, list):
        return [scores(v) for v in value]
    return value


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    (work / "cfg.yaml").write_text(PRETRAIN)
    finish("experiments.pretrain", cwd=work)
    return work / "runs" / "pre"


def newest_write(directory: Path) -> int:
    """When work was last saved under ``directory`` (checkpoints, models, metrics; not the
    config.yaml and TensorBoard files every start writes)."""
    saved = [p for p in directory.rglob("*") if p.suffix in (".pt", ".zip") or p.name in ("metrics.json", "progress.json")]
    return max((p.stat().st_mtime_ns for p in saved if p.exists()), default=0)


def kill_after_progress(module: str, cwd: Path, watch: Path, delay: float, resume: bool) -> bool:
    """Start ``module``, wait until it writes something new under ``watch`` (so every attempt gets
    past its restart), then SIGKILL it ``delay`` seconds later. False if it finished first."""
    before = newest_write(watch) if watch.exists() else 0
    proc = start(module, *(["--resume"] if resume else []), cwd=cwd)
    while proc.poll() is None and (not watch.exists() or newest_write(watch) == before):
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait()
    return True


def test_sigkill_at_random_points_then_resume_is_exact(reference, tmp_path):
    (tmp_path / "cfg.yaml").write_text(PRETRAIN)
    run_dir = tmp_path / "runs" / "pre"
    last = run_dir / "checkpoints" / "pretrain" / "last.pt"
    rng = random.Random(7)
    positions = []
    for attempt in range(6):
        if not kill_after_progress("experiments.pretrain", tmp_path, last.parent.parent, rng.uniform(0.0, 0.6), attempt > 0):
            break
        if last.exists():
            state = load_checkpoint(last)
            positions.append((state["epoch"], state["batch"]))
    assert len(positions) >= 3, f"too few kills landed during training: {positions}"
    assert positions == sorted(positions), positions
    finish("experiments.pretrain", "--resume", cwd=tmp_path)

    for (name, a), b in zip(weights(reference / "backbone.pt").items(), weights(run_dir / "backbone.pt").values()):
        assert torch.equal(a, b), name
    expected = json.loads((reference / "metrics.json").read_text())["pretrain"]
    got = json.loads((run_dir / "metrics.json").read_text())["pretrain"]
    assert scores(got) == scores(expected)
    print(f"kill points (epoch, batch of the checkpoint found): {positions}")


def test_sigterm_saves_a_checkpoint_and_exits_130(reference, tmp_path):
    (tmp_path / "cfg.yaml").write_text(PRETRAIN)
    last = tmp_path / "runs" / "pre" / "checkpoints" / "pretrain" / "last.pt"
    proc = start("experiments.pretrain", cwd=tmp_path)
    while not last.exists() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    log = (tmp_path / "experiments.pretrain.log").read_text()
    assert "interrupted: SIGTERM: stopped at epoch" in log and "rerun with --resume" in log
    assert "Traceback" not in log
    stopped = load_checkpoint(last)
    assert stopped["batch"] > 0  # saved in the middle of an epoch, where the signal came
    finish("experiments.pretrain", "--resume", cwd=tmp_path)
    for (name, a), b in zip(weights(reference / "backbone.pt").items(), weights(tmp_path / "runs/pre/backbone.pt").values()):
        assert torch.equal(a, b), name


def test_pipeline_killed_in_several_stages_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "cfg.yaml").write_text(PIPELINE)
    finish("experiments.run", cwd=reference)
    tmp_path = tmp_path / "killed"
    tmp_path.mkdir()
    (tmp_path / "cfg.yaml").write_text(PIPELINE)
    run_dir = tmp_path / "runs" / "tiny"
    rng = random.Random(3)
    killed_in = []
    for attempt in range(6):
        if not kill_after_progress("experiments.run", tmp_path, run_dir, rng.uniform(0.0, 1.5), attempt > 0):
            break
        metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        killed_in.append(sorted(metrics))
    assert len(killed_in) >= 3, killed_in
    assert len({tuple(k) for k in killed_in}) >= 2, f"all kills hit the same stage: {killed_in}"
    finish("experiments.run", "--resume", cwd=tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"pretrain", "policy", "lam0.2", "finetune", "compare", "evaluation"} <= set(metrics)
    assert (run_dir / "report.md").exists() and (run_dir / "policy" / "policy.zip").exists()
    assert not list(run_dir.rglob("*.tmp*")), "a temporary file was left behind"
    # Every stage, the PPO policies included, ends as if it had never been interrupted.
    expected = json.loads((reference / "runs" / "tiny" / "metrics.json").read_text())
    for stage in expected:
        assert scores(metrics[stage]) == scores(expected[stage]), f"{stage} (stages finished at the kills: {killed_in})"
    print(f"stages finished at each kill: {killed_in}")
