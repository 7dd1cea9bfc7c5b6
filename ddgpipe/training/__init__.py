"""Training runs: the config, the loop, checkpoints, optimizers, metrics and plots."""

from ddgpipe.training.config import TrainConfig, TrainResult
from ddgpipe.training.evaluation import evaluate
from ddgpipe.training.loop import train, train_worker

__all__ = ["TrainConfig", "TrainResult", "train", "train_worker", "evaluate"]
