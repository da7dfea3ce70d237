"""Knowledge distillation from the model a run starts from (``TrainConfig.distill``)."""

import copy

import pytest
import torch

from backbone import build_resnet
from backbone.data.datasets import ImageDataset, make_synthetic
from backbone.training.interrupt import Interrupted, clear_stop, request_stop
from backbone.training.loop import TrainConfig, distillation_loss, train


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(256, num_classes=4, seed=3), make_synthetic(64, num_classes=4, seed=4)


def _cfg(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0, eval_batch_size=64), **kw})


def _kl_to(teacher, student, images) -> float:
    with torch.no_grad():
        return distillation_loss(student(images), teacher(images), 1.0).item()


def test_distillation_keeps_a_fine_tuned_model_near_its_start(tiny_data):
    # Labels the model cannot know (shuffled): cross-entropy alone drags the model away from what
    # it predicted at the start; the distillation term pulls it back towards those predictions.
    train_set, _ = tiny_data
    shuffled = ImageDataset(train_set.images, train_set.labels[torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))],
                            train_set.classes)
    torch.manual_seed(2)
    start = build_resnet(8, num_classes=4, width=4)
    train(start, train_set, None, _cfg(epochs=2))  # a trained model to fine-tune
    start.eval()
    moved = {}
    for weight in (0.0, 5.0):
        model = copy.deepcopy(start)
        train(model, shuffled, None, _cfg(epochs=3, lr=0.05, distill=weight, distill_temperature=2.0, augment=False), seed=1)
        moved[weight] = _kl_to(start, model.eval(), train_set.images)
    assert moved[5.0] < 0.3 * moved[0.0], moved


def test_distillation_resumes_from_the_teacher_of_the_first_start(tiny_data, tmp_path):
    # The teacher is the model the run started from, also after a resume loads later weights.
    train_set, val_set = tiny_data
    cfg = _cfg(epochs=2, stochastic_depth=0.3, distill=1.0)
    torch.manual_seed(1)
    start = build_resnet(8, num_classes=4, width=4)
    straight = copy.deepcopy(start)
    train(straight, train_set, val_set, cfg, checkpoint_dir=tmp_path / "a", seed=5)
    steps = []

    def stop_after_5(*_):
        steps.append(1)
        if len(steps) == 5:
            request_stop("SIGINT")

    interrupted = copy.deepcopy(start)
    try:
        with pytest.raises(Interrupted):
            train(interrupted, train_set, val_set, cfg, checkpoint_dir=tmp_path / "b", seed=5, after_step=stop_after_5)
    finally:
        clear_stop()
    resumed = copy.deepcopy(start)  # the caller builds the run's starting model again, as the stages do
    train(resumed, train_set, val_set, cfg, checkpoint_dir=tmp_path / "b", seed=5, resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
