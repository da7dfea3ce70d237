"""Bad input, as a user gives it to the command-line scripts (issue #6, "Reliability").

Every case must end with exit status 2 and exactly one stderr line ``error: ...`` that names the
field or file and what was expected, without a traceback, and must leave every file already
written byte-identical. Most cases run against a copy of a finished tiny run with ``--overwrite``:
a check that came after the overwrite would delete that run, and the damage check would see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from backbone.errors import DyndepthError
from backbone.models.resnet import build_resnet
from backbone.models.weights import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = """
name: tiny
device: cpu
data: {train_size: 300, test_size: 100, num_classes: 4, val_fraction: 0.2}
model: {arch: resnet8, width: 4}
pretrain: {epochs: 1, batch_size: 32, warmup_epochs: 0, stochastic_depth: 0.2}
policy: {num_envs: 16, n_steps: 4, batch_size: 64, timesteps: 64, extractor_width: 4, eval_every: 64, checkpoint_every: 64}
finetune: {epochs: 1, batch_size: 32, policy_batch_size: 32}
study: {latency_batch: 16, latency_repeats: 2}
"""


def run_script(script: str, *args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DYNDEPTH_CACHE": str(cache)},
    )


@pytest.fixture(scope="module")
def existing(tmp_path_factory) -> Path:
    """A finished tiny run (backbone + policy), and ``deep``: the same run with a ResNet-14 backbone."""
    work = tmp_path_factory.mktemp("existing")
    (work / "tiny.yaml").write_text(TINY)
    for script in ("pretrain", "train_policy"):
        result = run_script(script, "--config", str(work / "tiny.yaml"), "--set", f"output_dir={work / 'runs'}", cache=work / "cache")
        assert result.returncode == 0, result.stderr[-3000:]
    deep = work / "runs" / "deep"
    shutil.copytree(work / "runs" / "tiny", deep)
    save_checkpoint(deep / "backbone.pt", build_resnet(14, 4, width=4), stage="pretrain")
    config = yaml.safe_load((deep / "config.yaml").read_text())
    config["name"], config["model"]["arch"] = "deep", "resnet14"
    (deep / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work


# ----------------------------------------------------------------------------- inputs the cases make
def random_bytes(ctx, name: str, prefix: bytes = b"") -> None:
    data = prefix + random.Random(0).randbytes(4096)
    assert data[:1] not in (b"\x80", b"P") or prefix  # not taken for a pickle or a zip by its first byte
    (ctx["inputs"] / name).write_bytes(data)


def truncated(source: Path, target: Path) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def image_tree(ctx, name: str, image: bytes | None) -> None:
    for split in ("train", "test"):
        folder = ctx["inputs"] / name / split / "cat"
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("not an image")
        if image is not None:
            (folder / "0.jpg").write_bytes(image)


def checkpoint_of(ctx, name: str, depth: int, classes: int) -> None:
    save_checkpoint(ctx["inputs"] / name, build_resnet(depth, classes, width=4))


def all_weights_finite(ctx, error: str) -> None:
    for path in (ctx["runs"] / "diverged").rglob("*.pt"):
        weights = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), f"{path} holds NaN/inf"


def kept_checkpoint_exists(ctx, error: str) -> None:
    kept = re.search(r"checkpoint \((.+?)\) is kept", error)
    assert kept and Path(kept.group(1)).is_file(), error
    all_weights_finite(ctx, error)


# ----------------------------------------------------------------------------- a full disk, in process
@contextlib.contextmanager
def full_disk(free: int = 200):
    """No file can grow past ``free`` bytes (RLIMIT_FSIZE): a write fails half-way, as on a full disk,
    whichever Python or C++ code does it."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (free, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


def save_checkpoint_on_full_disk(ctx) -> None:
    model = build_resnet(8, 4, width=4)
    with full_disk():
        save_checkpoint(ctx["tiny"] / "backbone.pt", model)


def write_json_on_full_disk(ctx) -> None:
    from experiments.common import write_json

    with full_disk():
        write_json(ctx["tiny"] / "metrics.json", {"pretrain": {"history": list(range(1000))}})


def save_atomic_on_full_disk(ctx) -> None:
    from stable_baselines3 import PPO

    from agents.callbacks import save_atomic

    model = PPO.load(ctx["tiny"] / "policy" / "policy.zip", device="cpu")
    with full_disk():
        save_atomic(model, ctx["tiny"] / "policy" / "policy.zip")


def in_process(writer: Callable, ctx) -> tuple[int, str]:
    """What ``experiments.common.cli`` makes of the writer's exception: status and stderr."""
    try:
        writer(ctx)
    except DyndepthError as exc:
        return 2, f"error: {exc}\n"
    except Exception:
        return 1, traceback.format_exc()
    return 0, ""


# ----------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    command: list[str] | Callable  # script and arguments ({placeholders} of ctx), or an in-process writer
    expect: tuple[str, ...]  # in the error line: the field or file, and what was expected
    setup: Callable | None = None
    creates: tuple[str, ...] = ()  # folders where new files are allowed (a fresh run the command starts)
    absent: tuple[str, ...] = ()  # paths that must not exist afterwards
    check: Callable | None = None  # a last assertion, given ctx and the error line


PRETRAIN = ["pretrain", "--config", "{config}", "--set", "output_dir={runs}", "--overwrite"]


def stage(script: str, *args: str) -> list[str]:
    return [script, "--config", "{config}", "--set", "output_dir={runs}", *args]


def override(*settings: str, command=PRETRAIN) -> list[str]:
    return [*command, *[arg for s in settings for arg in ("--set", s)]]


def init_checkpoint(name: str) -> list[str]:
    return override(f"model.init_checkpoint={{inputs}}/{name}")


MISMATCH = ("--set", "name=deep", "--set", "model.arch=resnet14")
CASES = [
    # Config: validated before anything is read or written.
    Case("typo_field", override("pretrain.lrr=0.1"), ("unknown config key 'pretrain.lrr'", "did you mean 'pretrain.lr'")),
    Case("typo_section", override("pretrian.epochs=1", command=stage("run", "--overwrite")),
         ("unknown config key 'pretrian'", "did you mean 'pretrain'")),
    Case("wrong_type", override("pretrain.epochs=abc"), ("'pretrain.epochs'", "must be of type int", "'abc'")),
    Case("negative_lambda", override("policy.reward.lam=-1", command=stage("train_policy", "--overwrite")),
         ("policy.reward.lam", "must be >= 0")),
    Case("drop_rate_above_1", override("pretrain.stochastic_depth=1.5"), ("pretrain.stochastic_depth", "must be in [0, 1)")),
    Case("fraction_of_1", override("data.val_fraction=1", command=stage("run", "--overwrite")),
         ("data.val_fraction", "must be in [0, 1)")),
    Case("batch_size_0", override("pretrain.batch_size=0"), ("pretrain.batch_size", "must be >= 1")),
    Case("unknown_left_out_method", override("study.leave_out=[gates,stattic]", command=stage("compare")),
         ("study.leave_out", "full_finetune, random_dropping, gates, static", "stattic")),
    Case("finetune_batch_size_0", override("finetune.batch_size=0", command=stage("finetune", "--overwrite")),
         ("finetune.batch_size", ">= 1")),
    Case("depth_not_6n_plus_2", override("model.arch=resnet21"), ("model.arch 'resnet21'", "must be 6n+2")),
    Case("unknown_arch", override("model.arch=vgg16"), ("model.arch", "unknown architecture 'vgg16'", "'resnet56'")),
    Case("unknown_dataset", override("data.name=imagenet"), ("data.name", "synthetic, cifar10, cifar100, imagefolder", "'imagenet'")),
    Case("unknown_algo", override("policy.algo=xyz", command=stage("train_policy", "--overwrite")),
         ("policy.algo", "ppo, a2c", "'xyz'")),
    Case("negative_gate_lambda", override("gates.lam=-1", command=stage("compare")), ("gates.lam", "must be >= 0")),
    # Data: missing, empty, unreadable, offline CIFAR.
    Case("imagefolder_missing", override("data.name=imagefolder", "data.root={inputs}/nowhere"),
         ("image folder not found", "{inputs}/nowhere/train/<class>/*.jpg")),
    Case("imagefolder_without_images", override("data.name=imagefolder", "data.root={inputs}/empty"),
         ("no .jpg/.jpeg/.png images", "{inputs}/empty/train"), setup=lambda ctx: image_tree(ctx, "empty", None)),
    Case("imagefolder_unreadable_image", override("data.name=imagefolder", "data.root={inputs}/bad"),
         ("cannot decode image", "{inputs}/bad/train/cat/0.jpg"), setup=lambda ctx: image_tree(ctx, "bad", b"not a jpeg")),
    Case("cifar100_offline", override("data.name=cifar100", "data.root={inputs}/cifar"),
         ("cifar100 not found", "{inputs}/cifar/cifar-100-python/", "extract it into {inputs}/cifar/"),
         setup=lambda ctx: (ctx["inputs"] / "cifar").mkdir()),
    # Imported weights (model.init_checkpoint): checked before the run directory is touched.
    Case("checkpoint_random_bytes", init_checkpoint("random.pt"), ("{inputs}/random.pt", "not a PyTorch checkpoint"),
         setup=lambda ctx: random_bytes(ctx, "random.pt")),
    Case("checkpoint_fake_zip", init_checkpoint("fake.pt"), ("{inputs}/fake.pt", "truncated or corrupt"),
         setup=lambda ctx: random_bytes(ctx, "fake.pt", prefix=b"PK\x03\x04")),
    Case("checkpoint_truncated", init_checkpoint("half.pt"), ("{inputs}/half.pt", "truncated or corrupt"),
         setup=lambda ctx: truncated(ctx["tiny"] / "backbone.pt", ctx["inputs"] / "half.pt")),
    Case("checkpoint_other_depth", init_checkpoint("resnet14.pt"), ("{inputs}/resnet14.pt", "(ResNet-14)", "(ResNet-8)"),
         setup=lambda ctx: checkpoint_of(ctx, "resnet14.pt", 14, 4)),
    Case("checkpoint_other_classes", init_checkpoint("classes10.pt"), ("{inputs}/classes10.pt", "10 classes but the model 4"),
         setup=lambda ctx: checkpoint_of(ctx, "classes10.pt", 8, 10)),
    Case("checkpoint_is_yaml", init_checkpoint("tiny.yaml"), ("{inputs}/tiny.yaml", "not a PyTorch checkpoint"),
         setup=lambda ctx: (ctx["inputs"] / "tiny.yaml").write_text(TINY)),
    Case("checkpoint_holds_a_list", init_checkpoint("list.pt"), ("{inputs}/list.pt", "holds a list, not a checkpoint dict"),
         setup=lambda ctx: torch.save([1, 2, 3], ctx["inputs"] / "list.pt")),
    # A run whose saved files are damaged (made in this case's copy of the run, never the fixture).
    Case("evaluate_truncated_backbone", ["evaluate", "--run", "{tiny}"], ("{tiny}/backbone.pt", "truncated or corrupt"),
         setup=lambda ctx: truncated(ctx["tiny"] / "backbone.pt", ctx["tiny"] / "backbone.pt")),
    Case("evaluate_truncated_policy", ["evaluate", "--run", "{tiny}"], ("{tiny}/policy/policy.zip", "truncated, corrupt"),
         setup=lambda ctx: truncated(ctx["tiny"] / "policy" / "policy.zip", ctx["tiny"] / "policy" / "policy.zip")),
    # A policy trained for 3 blocks beside a 6-block backbone.
    Case("evaluate_policy_for_other_depth", ["evaluate", "--run", "{deep}"],
         ("{deep}/policy/policy.zip", "decides 3 blocks", "{deep}/backbone.pt has 6")),
    Case("finetune_policy_for_other_depth", stage("finetune", *MISMATCH),
         ("{deep}/policy/policy.zip", "decides 3 blocks", "has 6"), absent=("{deep}/finetune",)),
    Case("compare_policy_for_other_depth", stage("compare", *MISMATCH),
         ("{deep}/metrics.json", "a backbone with 3 blocks", "has 6"), absent=("{deep}/gates", "{deep}/baselines")),
    # NaN/inf loss: training stops before a checkpoint or backbone holds NaN weights.
    Case("pretrain_loss_diverges", stage("pretrain", "--set", "name=diverged", "--set", "pretrain.lr=1e30"),
         ("non-finite training loss in epoch 1 (noticed at step", "no checkpoint was written yet", "Lower the learning rate"),
         creates=("{runs}/diverged",), absent=("{runs}/diverged/backbone.pt", "{runs}/diverged/metrics.json"),
         check=all_weights_finite),
    Case("pretrain_loss_diverges_between_checkpoints",
         stage("pretrain", "--set", "name=diverged", "--set", "pretrain.lr=1e30", "--set", "pretrain.checkpoint_every_s=1e-6"),
         ("non-finite training loss", "last good checkpoint"),
         creates=("{runs}/diverged",), absent=("{runs}/diverged/backbone.pt",), check=kept_checkpoint_exists),
    Case("policy_loss_diverges", stage("train_policy", "--tag", "big_lr", "--set", "policy.learning_rate=1e30"),
         ("non-finite", "timestep", "policy.learning_rate"), creates=("{tiny}/big_lr", "{tiny}/tb/big_lr"),
         absent=("{tiny}/big_lr/policy.zip",)),
    # A full disk while saving: every writer keeps the previous file and leaves no temp file.
    Case("disk_full_save_checkpoint", save_checkpoint_on_full_disk, ("{tiny}/backbone.pt", "could not be written", "unchanged")),
    Case("disk_full_write_json", write_json_on_full_disk, ("{tiny}/metrics.json", "could not be written", "unchanged")),
    Case("disk_full_save_atomic", save_atomic_on_full_disk, ("{tiny}/policy/policy.zip", "could not be written", "unchanged")),
]


def snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_one_clear_error_and_damages_nothing(case: Case, existing: Path, tmp_path: Path):
    runs, inputs = tmp_path / "runs", tmp_path / "inputs"
    shutil.copytree(existing / "runs", runs)
    inputs.mkdir()
    ctx = {"runs": runs, "tiny": runs / "tiny", "deep": runs / "deep", "inputs": inputs, "config": existing / "tiny.yaml"}
    if case.setup:
        case.setup(ctx)
    before = snapshot(runs, inputs)

    if callable(case.command):
        returncode, stderr = in_process(case.command, ctx)
    else:
        script, *args = case.command
        result = run_script(script, *[a.format(**ctx) for a in args], cache=tmp_path / "cache")
        returncode, stderr = result.returncode, result.stderr

    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in re.split(r"[\r\n]+", stderr) if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for text in case.expect:
        assert text.format(**ctx) in errors[0], f"{text.format(**ctx)!r} not in {errors[0]!r}"

    after = snapshot(runs, inputs)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"damaged or deleted: {changed}"
    allowed = tuple(c.format(**ctx) + os.sep for c in case.creates)
    new = [p for p in after.keys() - before.keys() if not p.startswith(allowed)]
    assert not new, f"unexpected new files: {new}"
    for path in case.absent:
        assert not Path(path.format(**ctx)).exists(), path.format(**ctx)
    if case.check:
        case.check(ctx, errors[0])
