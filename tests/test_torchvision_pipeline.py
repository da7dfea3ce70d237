"""A torchvision ResNet through every stage: ImageNet weights for another class count, the
policy's observations at ImageNet sizes, the static family of torchvision depths, streamed data
decoded into memory where the env needs it, and the whole study at 64 px (nothing downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.io import encode_jpeg

from agents.evaluation import evaluate_policy_on, policy_flops
from agents.rl import PolicyConfig, build_model, make_skip_task, make_vec_env
from backbone.baselines import static_torchvision_for_flops
from backbone.data import streaming
from backbone.data.datasets import DataConfig, ImageDataset, load_splits, make_synthetic
from backbone.data.streaming import ImageFiles, StreamingLoader, in_memory, materialize, scan_imagefolder
from backbone.errors import ConfigError
from backbone.models.cost import measure_backbone_cost
from backbone.models.torchvision_resnet import build_torchvision_resnet, weights_cache_path
from backbone.models.weights import load_model, save_checkpoint
from envs.block_skip import BlockSkipSeqEnv, SkipTask
from envs.observations import sequential_obs_dim, stem_feature_dim
from experiments.config import load_config
from experiments.pretrain import build_backbone

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("n01", "n02", "n03")


def write_jpeg_tree(root: Path, train: int = 16, val: int = 6) -> Path:
    """An ImageNet-layout tree of synthetic shapes as JPEGs of two sizes, ``train``/``val`` per class."""
    for split, count, seed in (("train", train, 0), ("val", val, 1)):
        data = make_synthetic(len(CLASSES) * count, num_classes=len(CLASSES), image_size=80, seed=seed)
        for i in range(len(data)):
            folder = root / split / CLASSES[int(data.labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (80, 72) if i % 2 else (72, 80)
            jpeg = encode_jpeg(data.images[i][:, :h, :w].contiguous(), quality=90)
            (folder / f"{i:04d}.JPEG").write_bytes(jpeg.numpy().tobytes())
    return root


# ----------------------------------------------------------------------------- weights, sizes, static family
def test_imagenet_weights_for_another_class_count_get_a_fresh_classifier(tmp_path, capsys):
    reference = torchvision.models.resnet18(weights=None)  # 1000 classes, as torchvision publishes it
    torch.save(reference.state_dict(), tmp_path / "resnet18-imagenet.pth")
    cfg = load_config("quickstart", ["model.arch=tv_resnet18", f"model.weights={tmp_path / 'resnet18-imagenet.pth'}"])
    model = build_backbone(cfg, num_classes=4)
    said = capsys.readouterr().out  # the log line says what happened
    assert "predict 1000 classes" in said and "fresh fc = Linear(512, 4)" in said
    assert model.fc.out_features == 4 and model.arch["num_classes"] == 4
    assert model.arch["normalization"][0] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet statistics
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    save_checkpoint(tmp_path / "b.pt", model)  # rebuilt from its arch, the classifier included
    assert load_model(tmp_path / "b.pt").fc.out_features == 4


def test_hub_cached_weights_load_offline_with_a_new_head(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download in tests"))
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    weights_cache_path(enum).parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights_cache_path(enum))
    assert build_torchvision_resnet("resnet18", 10, "IMAGENET1K_V1", new_head=True).fc.out_features == 10
    with pytest.raises(ConfigError, match="1000 classes but num_classes=10"):
        build_torchvision_resnet("resnet18", 10, "IMAGENET1K_V1")


def test_static_family_is_the_closest_torchvision_depth():
    resnet50 = build_torchvision_resnet("resnet50", 10)
    full = measure_backbone_cost(resnet50).full_flops  # 224 px
    assert static_torchvision_for_flops(0.5 * full, resnet50)[0] == "resnet18"  # 0.44 of ResNet-50
    assert static_torchvision_for_flops(0.8 * full, resnet50)[0] == "resnet34"  # 0.90
    small = measure_backbone_cost(resnet50, 64).full_flops  # measured at the data's size
    name, flops = static_torchvision_for_flops(0.5 * small, resnet50, image_size=64)
    assert name == "resnet18" and flops == measure_backbone_cost(build_torchvision_resnet("resnet18", 10), 64).full_flops


def test_policy_observations_and_flops_at_224_px():
    backbone = build_torchvision_resnet("resnet18", 4).eval()
    data = ImageDataset(torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8), torch.arange(4) % 4, list("abcd"))
    with torch.no_grad():
        assert backbone.stem(data.images[:1]).shape[1:] == (64, 56, 56)
    stem = SkipTask(backbone, data, observation="stem", stem_grid=4)
    assert stem.obs_shape == (stem_feature_dim(64, 4),) and torch.isfinite(stem.observation(torch.arange(4))).all()
    cfg = PolicyConfig(observation="pixels", obs_size=112, num_envs=4, n_steps=2, batch_size=8)
    task = make_skip_task(cfg, backbone, data)
    assert task.obs_shape == (3, 112, 112)  # the policy sees a downsampled copy, the backbone the full image
    model = build_model(cfg, make_vec_env(task, cfg), seed=0, device="cpu")
    extra = policy_flops(model, task, "oneshot")
    assert 0 < extra < 0.05 * task.cost.full_flops
    result, backbone_only = (evaluate_policy_on(model, task, extra_flops=e) for e in (extra, 0.0))
    assert result["flops"] == pytest.approx(backbone_only["flops"] + extra)  # the policy's FLOPs are counted
    assert result["flops_ratio"] == pytest.approx(result["flops"] / task.cost.full_flops)


def test_sequential_env_observes_resnet50_activations():
    backbone = build_torchvision_resnet("resnet50", 3).eval()
    assert backbone.feature_dim == 2048
    env = BlockSkipSeqEnv(backbone, make_synthetic(2, num_classes=3, image_size=64))
    obs, _ = env.reset(seed=0)
    assert obs.shape == (sequential_obs_dim(2048, 16),) == (2 * 2048 + 16 + 1,)
    for step in range(16):
        obs, reward, done, _, info = env.step(step % 2)
        assert done == (step == 15)
    assert info["blocks_used"] == 8 and len(info["keep_mask"]) == 16


# ----------------------------------------------------------------------------- streamed data into memory
def test_materialize_decodes_eval_crops_once_and_caps_by_class(tmp_path, capsys):
    files = scan_imagefolder(write_jpeg_tree(tmp_path / "tree"), train=True, image_size=48, num_workers=0)
    dataset = materialize(files)
    streamed = list(StreamingLoader(files, 5, shuffle=False, image_size=48, num_workers=0).epoch_batches(0))
    assert torch.equal(dataset.images, torch.cat([images for images, _ in streamed]))
    assert torch.equal(dataset.labels, files.labels) and dataset.classes == list(CLASSES)
    note = capsys.readouterr().out
    assert "decoding 48 images" in note and "MB uint8" in note  # the memory note
    assert materialize(files) is dataset  # decoded once per process
    capped = in_memory(files, max_images=9, seed=0)
    assert len(capped) == 9 and torch.bincount(capped.labels).tolist() == [3, 3, 3]
    assert in_memory(dataset) is dataset  # in memory already: as it is
    with pytest.raises(ConfigError, match="max_policy_images"):
        DataConfig(max_policy_images=0)


def test_load_splits_reads_streamed_files_at_the_configured_size(tmp_path):
    cfg = DataConfig(name="streamed_imagefolder", root=str(write_jpeg_tree(tmp_path / "tree")), image_size=40,
                     num_workers=0, val_fraction=0.25)
    splits = load_splits(cfg)
    assert all(isinstance(s, ImageFiles) and s.image_size == 40 and s.num_workers == 0
               for s in (splits.train, splits.val, splits.test))
    images, _ = next(iter(streaming.make_loader(splits.val, 4)))
    assert images.shape == (4, 3, 40, 40)


def test_streamed_tree_through_pretrain_policy_and_evaluation(tmp_path, monkeypatch):
    from experiments.common import prepare_output_dir, prepare_run_dir
    from experiments.evaluate import evaluate_run
    from experiments.pretrain import run_pretrain
    from experiments.train_policy import policy_dir, run_train_policy

    streamed = []  # (augment, batches) of every streamed epoch: proof that the stages stream
    epoch_batches = StreamingLoader.epoch_batches

    def spy(self, epoch, start=0):
        batches = list(epoch_batches(self, epoch, start))
        streamed.append((self.augment, len(batches)))
        return iter(batches)

    monkeypatch.setattr(StreamingLoader, "epoch_batches", spy)
    tree = write_jpeg_tree(tmp_path / "tree")
    cfg = load_config(None, [
        "name=streamed", f"output_dir={tmp_path / 'runs'}", "data.name=streamed_imagefolder", f"data.root={tree}",
        "data.image_size=64", "data.num_workers=0", "data.val_fraction=0.4", "data.max_policy_images=12",
        "model.arch=tv_resnet18", "pretrain={epochs: 1, batch_size: 8, lr: 0.05, warmup_epochs: 0, stochastic_depth: 0.2}",
        "policy={num_envs: 8, n_steps: 2, batch_size: 16, timesteps: 32, observation: pixels, obs_size: 32, "
        "action: ladder, eval_every: 16, checkpoint_every: 32}",
        "study={latency_batch: 4, latency_repeats: 1, latency_stream: 2}",
    ])
    run_dir = prepare_run_dir(cfg)
    pretrain = run_pretrain(cfg, run_dir)
    assert (True, 3) in streamed  # one training epoch of 28 images in batches of 8, streamed with augmentation
    assert pretrain["cost"]["full_flops"] == measure_backbone_cost(build_torchvision_resnet("resnet18", 3), 64).full_flops
    prepare_output_dir(policy_dir(run_dir), cfg)
    policy = run_train_policy(cfg)
    ladder = json.loads((run_dir / "ladder.json").read_text())
    assert ladder["images"] <= 12 and len(ladder["masks"]) == 9  # capped policy images, every size k = 0..8
    assert policy["test"]["num_images"] == 18 and policy["policy_flops"] > 0  # the whole streamed test split
    evaluation = evaluate_run(run_dir)
    assert evaluation["num_images"] == 18 and [r["batch"] for r in evaluation["latency"]] == [1, 4]
    assert evaluation["accuracy"] == policy["test"]["accuracy"]  # same images, decoded the same way
    assert (run_dir / "examples.png").stat().st_size > 1000 and "Adaptivity" in (run_dir / "report.md").read_text()


# ----------------------------------------------------------------------------- the whole study
TINY_TV = """
name: tvtiny
data: {train_size: 160, test_size: 48, num_classes: 4, val_fraction: 0.3, image_size: 64, max_policy_images: 32}
model: {arch: tv_resnet18}
pretrain: {epochs: 1, batch_size: 16, lr: 0.05, warmup_epochs: 0, stochastic_depth: 0.2}
policy: {num_envs: 16, n_steps: 4, batch_size: 64, timesteps: 128, observation: stem, action: ladder, eval_every: 64, checkpoint_every: 128}
finetune: {epochs: 1, batch_size: 16, policy_batch_size: 16}
gates: {hidden: 8}
study: {lambdas: [0.1], budgets: [0.6], keep_rates: [0.5], static_epochs: 1, latency_batch: 8, latency_repeats: 1, latency_stream: 2}
"""
METHODS = {"full backbone", "full backbone + fine-tuning", "RL policy", "RL policy + joint fine-tuning", "fixed subset",
           "fixed subset + fine-tuning", "random dropping", "random dropping + fine-tuning", "differentiable gates",
           "static ResNet (depth × width)", "confidence cascade (fixed subsets, then the full backbone)"}


def test_whole_study_on_a_torchvision_resnet_at_64_px(tmp_path):
    (tmp_path / "tv.yaml").write_text(TINY_TV)
    result = subprocess.run([sys.executable, "-m", "experiments.run", "--config", "tv.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tvtiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"pretrain", "policy", "lam0.1", "finetune", "finetune_lam0.1", "compare", "evaluation"} <= set(metrics)
    assert metrics["pretrain"]["arch"]["family"] == "torchvision" and metrics["pretrain"]["num_blocks"] == 8
    full = measure_backbone_cost(build_torchvision_resnet("resnet18", 4), 64).full_flops  # the data's size, not 224
    assert metrics["pretrain"]["cost"]["full_flops"] == metrics["evaluation"]["backbone_flops"] == full
    compare = metrics["compare"]
    assert set(compare["curves"]) == METHODS and compare["fixed_subset_search"]["search"] == "exhaustive"
    assert compare["fixed_subset_search"]["search_images"] <= 32 and len(compare["curves"]["fixed subset"]) == 9
    static = compare["curves"]["static ResNet (depth × width)"][0]
    assert static["knob"]["arch"] == "tv_resnet18" and static["flops_ratio"] == pytest.approx(1.0)
    assert "tv_resnet18/34/50 only" in compare["static_recipe"]["from"] and compare["static_recipe"]["start"] == "scratch"
    report = (run_dir / "report.md").read_text()
    for name in METHODS | {"Winner per budget", "Adaptivity of every policy", "| batch |", "tv_resnet18/34/50 only"}:
        assert name in report, name
    assert load_model(run_dir / "finetune" / "backbone.pt").arch["family"] == "torchvision"
