"""The pretrain script as a user runs it: exit codes, messages, run directories."""

import json

import pytest
import torch

from backbone.models.weights import load_model
from tiny_study import run as run_module

TINY = """
name: tiny
data: {train_size: 300, test_size: 100, num_classes: 4, val_fraction: 0.2}
model: {arch: resnet8, width: 4}
pretrain: {epochs: 2, batch_size: 32, warmup_epochs: 0, stochastic_depth: 0.2}
"""


def run(*args, cwd):
    return run_module(*args, cwd=cwd, module="experiments.pretrain")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    (work / "tiny.yaml").write_text(TINY)
    result = run("--config", "tiny.yaml", cwd=work)
    assert result.returncode == 0, result.stderr
    return work


def test_run_directory_contents(finished_run):
    run_dir = finished_run / "runs" / "tiny"
    for name in ("config.yaml", "metrics.json", "backbone.pt", "checkpoints/pretrain/last.pt",
                 "checkpoints/pretrain/best.pt"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb" / "pretrain").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())["pretrain"]
    assert len(metrics["history"]) == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert set(metrics["test_accuracy_by_difficulty"]) == {"0", "1", "2", "3"}
    assert metrics["cost"]["full_flops"] > 0 and metrics["num_blocks"] == 3
    model = load_model(run_dir / "backbone.pt")
    assert model.num_blocks == 3 and model.num_classes == 4


def test_existing_run_is_not_overwritten(finished_run):
    backbone = finished_run / "runs" / "tiny" / "backbone.pt"
    before = backbone.read_bytes()
    result = run("--config", "tiny.yaml", cwd=finished_run)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert backbone.read_bytes() == before


def test_resume_of_a_finished_run_skips_it(finished_run):
    result = run("--config", "tiny.yaml", "--resume", cwd=finished_run)
    assert result.returncode == 0, result.stderr
    assert "already finished" in result.stdout


def test_resume_with_another_config_names_the_difference(finished_run):
    result = run("--config", "tiny.yaml", "--resume", "--set", "pretrain.lr=0.3", cwd=finished_run)
    assert result.returncode == 2 and "pretrain.lr" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "pretrain.lrr=1"], "did you mean 'pretrain.lr'"),
        (["--set", "data.name=imagefolder", "--set", "data.root=/nonexistent"], "/nonexistent"),
        (["--set", "data.name=cifar100", "--set", "data.root=nowhere"], "cifar-100-python"),
        (["--set", "device=cuda:7"] if not torch.cuda.is_available() else ["--set", "device=tpu"], "device"),
    ],
)
def test_bad_input_fails_before_touching_the_run_dir(tmp_path, args, message):
    (tmp_path / "tiny.yaml").write_text(TINY)
    result = run("--config", "tiny.yaml", "--set", "name=bad", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "bad").exists()


def test_imported_weights_score_like_the_original(finished_run):
    source = finished_run / "runs" / "tiny" / "backbone.pt"
    result = run("--config", "tiny.yaml", "--set", "name=imported", "--set", f"model.init_checkpoint={source}",
                 "--set", "pretrain.epochs=0", cwd=finished_run)
    assert result.returncode == 0, result.stderr
    original = json.loads((finished_run / "runs" / "tiny" / "metrics.json").read_text())["pretrain"]
    imported = json.loads((finished_run / "runs" / "imported" / "metrics.json").read_text())["pretrain"]
    assert imported["test_accuracy"] == original["test_accuracy"]
    a, b = load_model(source), load_model(finished_run / "runs" / "imported" / "backbone.pt")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_mismatching_checkpoint_is_a_clear_error(finished_run):
    source = finished_run / "runs" / "tiny" / "backbone.pt"
    result = run("--config", "tiny.yaml", "--set", "name=wrong", "--set", f"model.init_checkpoint={source}",
                 "--set", "model.arch=resnet14", "--set", "pretrain.epochs=0", cwd=finished_run)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ResNet-8" in result.stderr and "ResNet-14" in result.stderr
    assert not (finished_run / "runs" / "wrong").exists()
