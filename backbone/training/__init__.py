"""The one supervised training loop, its evaluation helpers, and clean stops on SIGINT/SIGTERM."""

from backbone.training.interrupt import Interrupted
from backbone.training.loop import NonFiniteLossError, TrainConfig, evaluate, predict, resolve_device, train

__all__ = ["Interrupted", "NonFiniteLossError", "TrainConfig", "evaluate", "predict", "resolve_device", "train"]
