import math
import os

import pytest
import torch

from backbone import build_resnet
from backbone.data.datasets import ImageDataset, make_synthetic
from backbone.errors import ConfigError
from backbone.training.loop import (
    TrainConfig,
    build_optimizer,
    build_scheduler,
    evaluate,
    stochastic_depth_sampler,
    train,
)
from backbone.training.interrupt import Interrupted, clear_stop, request_stop
from backbone.models.weights import load_checkpoint


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(256, num_classes=4, seed=3), make_synthetic(64, num_classes=4, seed=4)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0, eval_batch_size=64)
    base.update(kw)
    return TrainConfig(**base)


def test_a_few_epochs_reduce_the_loss():
    # Classes that differ in colour: learnable in a few dozen steps, so the loop must learn them.
    labels = torch.arange(128) % 4
    colours = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]], dtype=torch.uint8)
    noise = torch.randint(0, 40, (128, 3, 32, 32), dtype=torch.uint8)
    images = colours[labels][:, :, None, None] + noise
    train_set = ImageDataset(images, labels, ["r", "g", "b", "y"])
    val_set = train_set.subset(range(32))
    model = build_resnet(8, num_classes=4, width=8)
    before = evaluate(model, train_set)["loss"]
    result = train(model, train_set, val_set, _cfg(epochs=6, batch_size=16, augment=False))
    after = evaluate(model, train_set)["loss"]
    assert after < 0.5 * before
    assert [r["epoch"] for r in result["history"]] == list(range(1, 7))
    assert all("val_accuracy" in r for r in result["history"])


class _KillDuringEpoch:
    """A TensorBoard stand-in that interrupts training while epoch ``kill_epoch`` is being logged."""

    def __init__(self, steps_per_epoch: int, kill_epoch: int):
        self.kill_step = steps_per_epoch * kill_epoch

    def add_scalar(self, tag, value, step):
        if step >= self.kill_step:
            raise KeyboardInterrupt

    def flush(self):
        pass


def test_resume_after_interrupt_gives_the_same_weights(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    cfg = _cfg(epochs=3, stochastic_depth=0.3)
    torch.manual_seed(1)
    straight = build_resnet(8, num_classes=4, width=4)
    train(straight, train_set, val_set, cfg, checkpoint_dir=tmp_path / "a", seed=5)

    torch.manual_seed(1)
    interrupted = build_resnet(8, num_classes=4, width=4)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, train_set, val_set, cfg, checkpoint_dir=tmp_path / "b", seed=5,
              writer=_KillDuringEpoch(256 // 32, kill_epoch=2))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = build_resnet(8, num_classes=4, width=4)  # fresh weights: all state comes from the checkpoint
    train(resumed, train_set, val_set, cfg, checkpoint_dir=tmp_path / "b", seed=5, resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert (tmp_path / "b" / "best.pt").exists()


def _scores(history):  # what must not change on resume (wall-clock fields do)
    return [{k: r[k] for k in ("epoch", "train_loss", "train_accuracy", "val_accuracy", "lr")} for r in history]


@pytest.mark.parametrize("stop_after", [3, 8, 13])  # steps: mid-epoch 1, its last step, mid-epoch 2
def test_stop_request_saves_mid_epoch_and_resume_is_exact(tiny_data, tmp_path, stop_after):
    train_set, val_set = tiny_data  # 8 steps per epoch
    cfg = _cfg(epochs=3, stochastic_depth=0.3)
    torch.manual_seed(1)
    straight = build_resnet(8, num_classes=4, width=4)
    reference = train(straight, train_set, val_set, cfg, checkpoint_dir=tmp_path / "a", seed=5)

    steps = []

    def stop_like_ctrl_c(*_):  # what the SIGINT handler does, at a chosen step
        steps.append(1)
        if len(steps) == stop_after:
            request_stop("SIGINT")

    torch.manual_seed(1)
    interrupted = build_resnet(8, num_classes=4, width=4)
    try:
        with pytest.raises(Interrupted, match=f"batch {(stop_after - 1) % 8 + 1}/8.*--resume"):
            train(interrupted, train_set, val_set, cfg, checkpoint_dir=tmp_path / "b", seed=5,
                  after_step=stop_like_ctrl_c)
    finally:
        clear_stop()
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["batch"]) == ((stop_after - 1) // 8, (stop_after - 1) % 8 + 1)
    torch.manual_seed(123)  # a different global RNG: the checkpoint must restore it
    resumed = build_resnet(8, num_classes=4, width=4)
    result = train(resumed, train_set, val_set, cfg, checkpoint_dir=tmp_path / "b", seed=5, resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert _scores(result["history"]) == _scores(reference["history"])


@pytest.mark.parametrize("width,channels_last,expected", [(8, None, torch.contiguous_format), (16, None, torch.channels_last),
                                                         (8, True, torch.channels_last), (16, False, torch.contiguous_format)])
def test_narrow_models_train_in_nchw_and_come_back_channels_last(tiny_data, width, channels_last, expected):
    # channels_last: null picks the layout by the narrowest convolution (NHWC is slower below 16
    # channels on CPUs); inference stays in the layout the model was built in.
    from backbone.models.masked import memory_format_of

    model = build_resnet(8, num_classes=4, width=width)
    seen = []
    train(model, tiny_data[0], None, _cfg(epochs=1, channels_last=channels_last),
          after_step=lambda *_: seen.append(memory_format_of(model.blocks[0].conv1.weight)))
    assert seen and set(seen) == {expected}
    assert memory_format_of(model.blocks[0].conv1.weight) == torch.channels_last


def test_timed_checkpoints_inside_an_epoch(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    seen = []

    def record_checkpoint(*_):
        path = tmp_path / "last.pt"
        if path.exists():
            state = load_checkpoint(path)
            seen.append((state["epoch"], state["batch"]))

    # checkpoint_every_s tiny: a checkpoint after every step, each one a resumable position.
    train(build_resnet(8, num_classes=4, width=4), train_set, val_set, _cfg(epochs=1, checkpoint_every_s=1e-9),
          checkpoint_dir=tmp_path, after_step=record_checkpoint)
    assert seen == [(0, b) for b in range(1, 8)]
    final = load_checkpoint(tmp_path / "last.pt")
    assert (final["epoch"], final["batch"]) == (1, 0)


def test_stochastic_depth_drop_rates_grow_linearly():
    sample = stochastic_depth_sampler(4, drop_last=0.4, schedule="linear")
    gen = torch.Generator().manual_seed(0)
    mask = sample(torch.zeros(20000, 3, 1, 1), torch.zeros(20000), gen)
    keep = mask.float().mean(0)
    torch.testing.assert_close(keep, torch.tensor([0.9, 0.8, 0.7, 0.6]), atol=0.015, rtol=0)
    uniform = stochastic_depth_sampler(3, 0.25, "uniform")(torch.zeros(20000, 3, 1, 1), None, gen)
    torch.testing.assert_close(uniform.float().mean(0), torch.full((3,), 0.75), atol=0.015, rtol=0)


def test_stochastic_depth_training_runs_masked_forward(tiny_data, monkeypatch):
    train_set, _ = tiny_data
    model = build_resnet(8, num_classes=4, width=4)
    masks = []
    original = type(model).forward

    def spy(self, x, keep_mask=None):
        masks.append(keep_mask)
        return original(self, x, keep_mask)

    monkeypatch.setattr(type(model), "forward", spy)
    train(model, train_set, None, _cfg(epochs=1, stochastic_depth=0.5))
    used = [m for m in masks if m is not None]
    assert len(used) == 256 // 32 and 0.5 < torch.cat(used).float().mean() < 0.95


@pytest.mark.parametrize("schedule", ["cosine", "multistep"])
def test_learning_rate_schedules(schedule):
    cfg = _cfg(epochs=4, schedule=schedule, milestones=[0.5, 0.75], warmup_epochs=1, lr=1.0)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0)  # warm-up then peak
    if schedule == "cosine":
        assert lrs[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
        assert lrs[-1] < 0.01
    else:
        assert lrs[19] == 1.0 and lrs[20] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)


def test_no_weight_decay_on_batchnorm_and_bias():
    model = build_resnet(8, width=4)
    groups = build_optimizer(model, _cfg(weight_decay=0.1)).param_groups
    assert all(p.dim() > 1 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(schedule="linear"), "schedule"),
        (dict(stochastic_depth=1.0), "stochastic_depth"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(epochs=-1), "epochs"),
    ],
)
def test_bad_train_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**bad)


def test_nan_loss_stops_and_keeps_checkpoint(tiny_data, tmp_path, monkeypatch):
    import backbone.training.loop as train_module

    train_set, _ = tiny_data
    model = build_resnet(8, num_classes=4, width=4)
    train(model, train_set, None, _cfg(epochs=1), checkpoint_dir=tmp_path)
    good = load_checkpoint(tmp_path / "last.pt")
    cross_entropy = train_module.F.cross_entropy
    monkeypatch.setattr(train_module.F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * float("nan"))
    with pytest.raises(train_module.NonFiniteLossError, match="epoch 2"):
        train(model, train_set, None, _cfg(epochs=2), checkpoint_dir=tmp_path, resume=True)
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == 1
    torch.testing.assert_close(kept["model"]["fc.weight"], good["model"]["fc.weight"])


# ----------------------------------------------------------------------------- GPU paths, checked on the CPU
def test_compile_with_stochastic_depth_compiles_the_blocks_that_run(tiny_data, monkeypatch):
    from backbone.models.masked import call_block

    compiled = []

    def fake_compile(fn, **kwargs):  # records what would be compiled; runs it eagerly
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    train_set, _ = tiny_data
    model = build_resnet(8, num_classes=4, width=4)
    train(model, train_set, None, _cfg(epochs=1, stochastic_depth=0.5, compile=True))
    assert compiled == [call_block]  # the masked forward's unit, not the unmasked whole model
    assert model._call_block is call_block  # and eager again afterwards
    compiled.clear()
    train(model, train_set, None, _cfg(epochs=1, compile=True))
    assert compiled == [model]  # no masks: the whole forward
    train(model, train_set, None, _cfg(epochs=1, stochastic_depth=0.5, compile=True))
    assert compiled == [model, call_block]


def test_fp16_autocast_scales_the_loss_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    # Where bf16 is not native, amp is fp16 with a GradScaler: simulated here with CPU fp16 autocast.
    import backbone.training.recipe as recipe

    monkeypatch.setattr(recipe, "amp_dtype", lambda device, enabled=True: torch.float16 if enabled else None)
    train_set = tiny_data[0].subset(range(64))
    cfg = _cfg(epochs=2, batch_size=16, stochastic_depth=0.3)
    torch.manual_seed(1)
    straight = build_resnet(8, num_classes=4, width=4)
    reference = train(straight, train_set, None, cfg, checkpoint_dir=tmp_path / "a", seed=5)
    scaler_state = load_checkpoint(tmp_path / "a" / "last.pt")["grad_scaler"]
    assert scaler_state["scale"] > 1 and math.isfinite(reference["history"][-1]["train_loss"])

    def stop_at_step_3(*_, steps=[]):
        steps.append(1)
        if len(steps) == 3:
            request_stop("SIGINT")

    torch.manual_seed(1)
    try:
        with pytest.raises(Interrupted):
            train(build_resnet(8, num_classes=4, width=4), train_set, None, cfg, checkpoint_dir=tmp_path / "b", seed=5,
                  after_step=stop_at_step_3)
    finally:
        clear_stop()
    resumed = build_resnet(8, num_classes=4, width=4)
    train(resumed, train_set, None, cfg, checkpoint_dir=tmp_path / "b", seed=5, resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_deterministic_mode_is_switched_on_by_the_environment(tiny_data, monkeypatch):
    monkeypatch.setenv("DYNDEPTH_DETERMINISTIC", "1")
    try:
        train(build_resnet(8, num_classes=4, width=4), tiny_data[0].subset(range(64)), None, _cfg(epochs=1))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda_is_exact_with_deterministic_kernels(tiny_data, tmp_path):
    """What CUDA guarantees: with deterministic kernels (``use_deterministic_training``) a stopped and
    resumed run equals the uninterrupted one bit for bit on the same GPU and software; a kernel
    without a deterministic version warns, and the guarantee is then a tolerance of 1e-3."""
    import warnings

    from backbone.training.recipe import use_deterministic_training

    train_set, val_set = tiny_data
    cfg = _cfg(epochs=2, stochastic_depth=0.3)
    use_deterministic_training()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(1)
            straight = build_resnet(8, num_classes=4, width=4).cuda()
            train(straight, train_set, val_set, cfg, checkpoint_dir=tmp_path / "a", seed=5)

            def stop_at_step_11(*_, steps=[]):
                steps.append(1)
                if len(steps) == 11:
                    request_stop("SIGINT")

            torch.manual_seed(1)
            try:
                with pytest.raises(Interrupted):
                    train(build_resnet(8, num_classes=4, width=4).cuda(), train_set, val_set, cfg,
                          checkpoint_dir=tmp_path / "b", seed=5, after_step=stop_at_step_11)
            finally:
                clear_stop()
            resumed = build_resnet(8, num_classes=4, width=4).cuda()
            train(resumed, train_set, val_set, cfg, checkpoint_dir=tmp_path / "b", seed=5, resume=True)
    finally:
        torch.use_deterministic_algorithms(False)
    tolerance = 1e-3 if any("deterministic" in str(w.message) for w in caught) else 0.0
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance)


def test_batchnorm_recalibration_averages_a_paths_statistics_and_leaves_the_model_alone():
    from backbone.training.evaluation import recalibrate_batchnorm

    torch.manual_seed(0)
    model = build_resnet("resnet8", num_classes=4, width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    path = torch.tensor([True, False, True])
    net = recalibrate_batchnorm(model, images, path, batch_size=16)  # three batches of 16
    assert not net.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # The stem's statistics: the average over the batches of each batch's mean and (unbiased)
    # variance of its convolution, every batch weighing the same (not a momentum average).
    with torch.no_grad():
        x = torch.addcmul(model.input_shift, images.float(), model.input_scale_uint8)
        conv = model.conv1(x).split(16)
    torch.testing.assert_close(net.bn1.running_mean, torch.stack([c.mean((0, 2, 3)) for c in conv]).mean(0),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.bn1.running_var, torch.stack([c.var((0, 2, 3)) for c in conv]).mean(0),
                               rtol=1e-4, atol=1e-5)
    # The skipped block's BatchNorms never saw an image: reset, unlike the kept ones.
    assert torch.equal(net.blocks[1].bn1.running_mean, torch.zeros(4 * 2))
    assert not torch.equal(net.blocks[2].bn1.running_mean, model.blocks[2].bn1.running_mean)
    with torch.no_grad():
        assert net(images[:4], path.expand(4, -1)).shape == (4, 4)
