"""One owner per run directory: a second process is refused naming the owner, a dead owner's
lock is taken over, and torchrun ranks other than 0 never take it."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from backbone.errors import ConfigError
from experiments.common import LOCK_FILE, lock_run_dir, prepare_run_dir, release_run_dir
from experiments.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = """
name: tiny
data: {train_size: 120, test_size: 40, num_classes: 4, val_fraction: 0.2}
model: {arch: resnet8, width: 4}
pretrain: {epochs: 1, batch_size: 32, warmup_epochs: 0}
"""
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def pretrain(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", "--config", "tiny.yaml", "--set", f"output_dir={work / 'runs'}", *args],
        cwd=work, capture_output=True, text=True, env=ENV, timeout=300,
    )


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def work(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    return tmp_path


def test_second_process_is_refused_with_the_owner_named_and_nothing_written(work):
    cfg = load_config(str(work / "tiny.yaml"), [f"output_dir={work / 'runs'}"])
    run_dir = prepare_run_dir(cfg)  # this test process owns the run now
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"work of the owner")
    try:
        prepare_run_dir(cfg, resume=True)  # the owner itself may prepare again
        before = snapshot(run_dir)
        for args in (["--resume"], ["--overwrite"], []):
            result = pretrain(work, *args)
            assert result.returncode == 2, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            assert "in use by" in lines[0] and f"pid {os.getpid()}" in lines[0] and socket.gethostname() in lines[0]
            assert "since" in lines[0] and "pytest" in lines[0]  # the owner's command
            assert snapshot(run_dir) == before, args
    finally:
        release_run_dir(run_dir)
    assert not (run_dir / LOCK_FILE).exists()  # an owner removes its lock file when it is done
    # Released: the next process owns it, and a normal --resume run works through the lock.
    result = pretrain(work, "--resume")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "backbone.pt").exists() and not (run_dir / LOCK_FILE).exists()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from experiments.common import lock_run_dir; "
         "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(300)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid} "):
            lock_run_dir(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead owner's note is still there
    lock_run_dir(run_dir)  # ... but its lock died with it
    try:
        owner = json.loads((run_dir / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and "pytest" in owner["command"]
    finally:
        release_run_dir(run_dir)


def test_only_rank_0_of_a_torchrun_job_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    lock_run_dir(tmp_path / "run")
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_script_that_is_not_distributed_is_refused_under_torchrun(work):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train_policy", "--config", "tiny.yaml"], cwd=work, capture_output=True,
        text=True, env={**ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, timeout=120,
    )
    assert result.returncode == 2 and "does not run under torchrun" in result.stderr, result.stderr
    assert not (work / "runs").exists()


def test_the_owner_removes_temporary_files_a_killed_writer_left(tmp_path):
    cfg = load_config("quickstart", [f"output_dir={tmp_path}", "name=stale"])
    run_dir = prepare_run_dir(cfg)
    release_run_dir(run_dir)
    (run_dir / "policy").mkdir()
    stale = [run_dir / ".metrics.json.0123abcd.tmp", run_dir / "policy" / ".last.zip.deadbeef.tmp"]
    kept = [run_dir / ".notes.tmp", run_dir / "metrics.json"]  # not write_atomically's names
    for path in stale + kept:
        path.write_text("x")
    with pytest.raises(ConfigError):
        prepare_run_dir(cfg)  # without --resume nothing in the directory is touched
    release_run_dir(run_dir)
    assert all(p.exists() for p in stale + kept)
    prepare_run_dir(cfg, resume=True)
    release_run_dir(run_dir)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
