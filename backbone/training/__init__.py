"""The one supervised training loop, its recipe and evaluation helpers, clean stops on SIGINT/SIGTERM,
and data-parallel training under torchrun (``backbone.training.distributed``)."""

from backbone.training.interrupt import Interrupted
from backbone.training.loop import NonFiniteLossError, TrainConfig, evaluate, predict, resolve_device, train

__all__ = ["Interrupted", "NonFiniteLossError", "TrainConfig", "evaluate", "predict", "resolve_device", "train"]
