"""Data-parallel training under torchrun (gloo, 2 CPU processes, tiny data).

What can match between 2 processes and 1: everything but the BatchNorm batch statistics, which
are per rank (``backbone.training.distributed``). So the 2-vs-1 comparison trains a model without
BatchNorm, with masks drawn for the global batch (each rank keeps its rows), blocks that one
rank's rows all skip and a block the whole batch skips: the weights agree to float tolerance
(sums in another order). The real ResNet (BatchNorm, stochastic depth) runs through the
pretrain CLI: stopped by SIGTERM on one rank, SIGKILLed, and resumed, it ends bit-identical to
an uninterrupted 2-process run.

Run as a script (``torchrun ... tests/test_distributed.py OUT``) this file is the worker of the
2-vs-1 comparison.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backbone.data.batching import BatchLoader  # noqa: E402
from backbone.data.datasets import make_synthetic  # noqa: E402
from backbone.errors import ConfigError  # noqa: E402
from backbone.models.resnet import SkippableResNet  # noqa: E402
from backbone.models.weights import load_checkpoint, load_model  # noqa: E402
from backbone.training import distributed  # noqa: E402
from backbone.training.loop import TrainConfig, stochastic_depth_sampler, train  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


# ----------------------------------------------------------------------------- a model without BatchNorm
class PlainBlock(nn.Module):
    downsamples = False

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return F.relu(x + 0.5 * self.conv(x))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PlainNet(SkippableResNet):
    """Stem, 4 skippable residual blocks, head: per-row computations only (no BatchNorm)."""

    def __init__(self, channels: int = 8, num_blocks: int = 4, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.layers = nn.ModuleList(PlainBlock(channels) for _ in range(num_blocks))
        self.fc = nn.Linear(channels, num_classes)
        self._blocks = tuple(self.layers)
        self.arch = {"num_classes": num_classes, "kind": "plain"}

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv1(x.float() / 255))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def global_masks(rank: int, world_size: int):
    """Masks drawn for the global batch; block 1 is skipped by the first half of the batch (all of
    rank 0's rows with 2 processes), block 2 by every row."""

    def sample(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        rows = images.shape[0]
        keep = torch.rand(rows * world_size, 4, generator=gen) < 0.7
        keep[: rows * world_size // 2, 1] = False
        keep[:, 2] = False
        return keep[rank * rows : (rank + 1) * rows]

    return sample


CFG = TrainConfig(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0, eval_batch_size=32, augment=True,
                  weight_decay=5e-4, checkpoint_every_s=0)


def tiny_run(checkpoint_dir: Path) -> tuple[nn.Module, dict, dict]:
    """The training stage both sides run: (model, its initial state, train's result)."""
    ctx = distributed.current()
    train_set, val_set = make_synthetic(192, num_classes=4, seed=3), make_synthetic(50, num_classes=4, seed=4)
    torch.manual_seed(11 + ctx.rank)  # different initial weights per rank: train() must start all from rank 0's
    model = PlainNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, train_set, val_set, CFG, checkpoint_dir=checkpoint_dir,
                   mask_sampler=global_masks(ctx.rank, ctx.world_size), seed=5)
    return model, initial, result


def worker(out: Path) -> None:
    ctx = distributed.init_distributed("cpu")
    torch.set_num_threads(1)
    model, initial, result = tiny_run(out / "checkpoints")
    torch.save({"state": model.state_dict(), "initial": initial, "history": result["history"]}, out / f"rank{ctx.rank}.pt")
    distributed.shutdown()


# ----------------------------------------------------------------------------- 2 processes against 1
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    result = subprocess.run([*TORCHRUN, __file__, str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.manual_seed(11)
    single, initial, reference = tiny_run(tmp_path / "single")

    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # ranks stay in step exactly
        # Same global batches, masks and mean gradients; only the order of float sums differs
        # (measured: at most 1.5e-7 after 12 steps).
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(ranks[0]["initial"]["fc.weight"], initial["fc.weight"])  # rank 0 was seeded like `single`
    for name in ("layers.2.conv.weight", "layers.2.conv.bias"):  # no row of any batch ran block 2: no update at all
        assert torch.equal(ranks[0]["state"][name], initial[name]), name
    assert not torch.equal(ranks[0]["state"]["layers.1.conv.weight"], initial["layers.1.conv.weight"])
    for got, expected in zip(ranks[0]["history"], reference["history"]):
        assert got["train_accuracy"] == expected["train_accuracy"]
        assert got["val_accuracy"] == pytest.approx(expected["val_accuracy"], rel=1e-6)  # float64 vs float32 mean
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 2


def test_rank_shards_of_batches_and_masks_are_the_one_process_batch():
    data = make_synthetic(70, num_classes=4, seed=1)
    whole = list(BatchLoader(data, 12, augment=True, seed=3).epoch_batches(1))
    for world in (2, 4):
        shards = [list(BatchLoader(data, 12, augment=True, seed=3, rank=r, world_size=world).epoch_batches(1))
                  for r in range(world)]
        for i, (images, labels) in enumerate(whole):
            assert torch.equal(torch.cat([s[i][0] for s in shards]), images)
            assert torch.equal(torch.cat([s[i][1] for s in shards]), labels)
    one = stochastic_depth_sampler(5, 0.5)(torch.zeros(8, 3, 1, 1), None, torch.Generator().manual_seed(2))
    two = [stochastic_depth_sampler(5, 0.5, rank=r, world_size=2)(torch.zeros(4, 3, 1, 1), None,
                                                                   torch.Generator().manual_seed(2)) for r in (0, 1)]
    assert torch.equal(torch.cat(two), one)
    with pytest.raises(ValueError, match="split evenly"):
        BatchLoader(data, 12, rank=0, world_size=5)


# ----------------------------------------------------------------------------- the pretrain CLI under torchrun
PRETRAIN = """
name: ddp
data: {train_size: 640, test_size: 64, num_classes: 4, val_fraction: 0.2}
model: {arch: resnet8, width: 4}
pretrain: {epochs: 3, batch_size: 32, warmup_epochs: 0, stochastic_depth: 0.3, augment: true, checkpoint_every_s: 0.1}
"""


def torchrun_pretrain(work: Path, *args: str) -> subprocess.Popen:
    log = open(work / "torchrun.log", "a")
    return subprocess.Popen([*TORCHRUN, "-m", "experiments.pretrain", "--config", "cfg.yaml", *args], cwd=work,
                            env=ENV, stdout=log, stderr=subprocess.STDOUT)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def wait_for_checkpoint(launcher: subprocess.Popen, last: Path, after: int) -> None:
    while launcher.poll() is None and (not last.exists() or last.stat().st_mtime_ns == after):
        time.sleep(0.02)


def test_pretrain_stopped_and_killed_on_one_rank_resumes_bit_identical(tmp_path):
    reference, work = tmp_path / "reference", tmp_path / "work"
    for d in (reference, work):
        d.mkdir()
        (d / "cfg.yaml").write_text(PRETRAIN)
    assert torchrun_pretrain(reference).wait(timeout=180) == 0, (reference / "torchrun.log").read_text()[-3000:]
    log = (reference / "torchrun.log").read_text()
    assert "torchrun world size 2" in log and log.count("pretrain: test accuracy") == 1  # rank 0 alone reports
    run = reference / "runs" / "ddp"
    assert len(list((run / "tb" / "pretrain").glob("events.*"))) == 1  # and alone writes TensorBoard
    assert len(json.loads((run / "metrics.json").read_text())["pretrain"]["history"]) == 3

    last = work / "runs" / "ddp" / "checkpoints" / "pretrain" / "last.pt"
    # SIGTERM to rank 1 only: rank 0 learns it through the per-step flags, both stop at one step.
    launcher = torchrun_pretrain(work)
    wait_for_checkpoint(launcher, last, 0)
    os.kill(worker_pid(launcher, 1), signal.SIGTERM)
    assert launcher.wait(timeout=60) != 0
    log = (work / "torchrun.log").read_text()
    assert "interrupted: SIGTERM: stopped at epoch" in log and "rerun with --resume" in log, log[-3000:]
    stopped = load_checkpoint(last)
    assert stopped["epoch"] < 3

    # SIGKILL of rank 1 in the resumed run: the job dies; the last checkpoint is kept.
    launcher = torchrun_pretrain(work, "--resume")
    wait_for_checkpoint(launcher, last, last.stat().st_mtime_ns)
    os.kill(worker_pid(launcher, 1), signal.SIGKILL)
    assert launcher.wait(timeout=60) != 0
    killed = load_checkpoint(last)
    assert (killed["epoch"], killed["batch"]) > (stopped["epoch"], stopped["batch"])

    assert torchrun_pretrain(work, "--resume").wait(timeout=180) == 0, (work / "torchrun.log").read_text()[-3000:]
    expected, got = load_model(run / "backbone.pt"), load_model(work / "runs" / "ddp" / "backbone.pt")
    for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name
    a, b = (json.loads((d / "metrics.json").read_text())["pretrain"] for d in (run, work / "runs" / "ddp"))
    assert a["test_accuracy"] == b["test_accuracy"]
    assert [r["val_accuracy"] for r in a["history"]] == [r["val_accuracy"] for r in b["history"]]
    # A resumed epoch sums its loss in another order (the saved part is all ranks' sum).
    assert [r["train_loss"] for r in a["history"]] == pytest.approx([r["train_loss"] for r in b["history"]], rel=1e-6)


LEAVE_AND_COUNT_THREADS = """
import os, sys
from backbone.training import distributed
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
distributed.init_distributed("cpu")
import torch._dynamo  # what a torch.compiler.disable'd function's first call (the stem's) imports
distributed.all_reduce_flags([1])
distributed.shutdown()
open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w").write(f"{before} {threads()}")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_leaving_the_process_group_ends_its_worker_threads(tmp_path):
    # Imported after the group exists, torch.distributed.nn kept it alive in default arguments: its
    # gloo threads outlived main and 1 in ~30 runs died with SIGABRT while the interpreter exited.
    (tmp_path / "leave.py").write_text(LEAVE_AND_COUNT_THREADS)
    done = subprocess.run([*TORCHRUN, str(tmp_path / "leave.py"), str(tmp_path)], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        before, after = (tmp_path / f"rank{rank}").read_text().split()
        assert after == before, f"rank {rank}: {before} threads before joining, {after} after leaving"


def test_torchrun_forwarding_the_terminals_ctrl_c_is_one_stop_request(monkeypatch):
    import backbone.training.interrupt as interrupt

    monkeypatch.setenv("RANK", "1")
    try:
        with interrupt.deferred_stop():
            interrupt._handle(signal.SIGINT, None)  # from the terminal
            interrupt._handle(signal.SIGINT, None)  # the same Ctrl-C, forwarded by torchrun
            assert interrupt.stop_requested() == "SIGINT"
            monkeypatch.setattr(interrupt, "_requested_at", time.monotonic() - interrupt.FORWARD_WINDOW_S)
            with pytest.raises(KeyboardInterrupt):  # a real second request still stops at once
                interrupt._handle(signal.SIGINT, None)
    finally:
        interrupt.clear_stop()


# ----------------------------------------------------------------------------- bad launches
def pretrain_as_rank(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    (work / "cfg.yaml").write_text(PRETRAIN)
    return subprocess.run([sys.executable, "-m", "experiments.pretrain", "--config", "cfg.yaml", *args], cwd=work,
                          env={**ENV, "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", **env},
                          capture_output=True, text=True, timeout=120)


def test_a_batch_the_ranks_cannot_share_is_refused(tmp_path):
    result = pretrain_as_rank(tmp_path, {"RANK": "0", "WORLD_SIZE": "3", "MASTER_PORT": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pretrain.batch_size 32 (the global batch) is not divisible by the 3 processes" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_rank_that_cannot_reach_the_others_is_refused(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = pretrain_as_rank(tmp_path, {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": str(port),
                                         "DYNDEPTH_DIST_TIMEOUT_S": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"rank 1 of 2 could not join the other ranks at 127.0.0.1:{port} within 1 s" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_more_processes_than_gpus_is_refused(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.LaunchError, match=r"started 2 processes .* has 1 CUDA device\(s\)"):
        distributed.init_distributed("cuda")
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        distributed.init_distributed("cuda:1")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))


# ----------------------------------------------------------------------------- the other supervised stages
STUDY = """
name: stages
data: {train_size: 400, test_size: 120, num_classes: 4, val_fraction: 0.3}
model: {arch: resnet8, width: 4}
pretrain: {epochs: 2, batch_size: 32, warmup_epochs: 0, stochastic_depth: 0.2}
policy: {num_envs: 16, n_steps: 4, batch_size: 64, timesteps: 256, observation: stem, action: ladder, eval_every: 128, checkpoint_every: 128}
finetune: {epochs: 1, batch_size: 32, policy_batch_size: 32, backbone_masks: greedy, refit_heads: 64}
study: {lambdas: [], budgets: [0.6], keep_rates: [0.5], static_epochs: 1}
"""


def stage(work: Path, module: str, processes: int) -> subprocess.CompletedProcess:
    launcher = [*TORCHRUN[:-1], f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", module, "--config", "cfg.yaml"], cwd=work, env=ENV, capture_output=True,
                          text=True, timeout=400)


def test_joint_finetuning_and_the_comparison_run_data_parallel(tmp_path):
    """Joint fine-tuning and every baseline of the comparison (fixed subsets, random dropping and
    the full network fine-tuned, the gates, the static networks) under torchrun, each with its
    classifier refitted afterwards (per rung for the pair): one global batch, rank 0 writes, the
    ranks end with the same weights (the stages check it themselves),
    and the results stay close to one process's (the per-rank BatchNorm batch statistics make
    them differ: tolerance 0.15 top-1 on 120 test images)."""
    runs = {}
    for processes in (1, 2):
        work = tmp_path / f"p{processes}"
        work.mkdir()
        (work / "cfg.yaml").write_text(STUDY)
        for module in ("experiments.pretrain", "experiments.train_policy"):  # one process: the same backbone and policy
            done = stage(work, module, 1)
            assert done.returncode == 0, done.stderr[-3000:]
        for module in ("experiments.finetune", "experiments.compare"):
            done = stage(work, module, processes)
            assert done.returncode == 0, done.stderr[-3000:]
            assert "error" not in done.stderr.lower(), done.stderr[-3000:]
        runs[processes] = json.loads((work / "runs" / "stages" / "metrics.json").read_text())
        tb = work / "runs" / "stages" / "tb"
        assert len(list((tb / "finetune").glob("events.*"))) == 1  # rank 0 alone logs
    one, two = runs[1], runs[2]
    assert one["pretrain"]["test_accuracy"] == two["pretrain"]["test_accuracy"]  # same starting point
    assert abs(one["finetune"]["test"]["accuracy"] - two["finetune"]["test"]["accuracy"]) <= 0.15
    assert two["finetune"]["refit_heads"] == 64 and two["finetune"]["refit_time_s"] > 0
    assert set(one["compare"]["curves"]) == set(two["compare"]["curves"])
    for name, points in one["compare"]["curves"].items():
        for a, b in zip(points, two["compare"]["curves"][name]):
            assert abs(a["accuracy"] - b["accuracy"]) <= 0.15, name
