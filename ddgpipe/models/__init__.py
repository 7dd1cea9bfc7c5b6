"""Models as flat ``nn.Sequential`` stacks of blocks, so DDG can cut them at any block boundary."""

from ddgpipe.models.gpt import GPTConfig, generate, gpt, parameter_count
from ddgpipe.models.mlp import mlp
from ddgpipe.models.registry import MODEL_NAMES, build_model, is_language_model
from ddgpipe.models.resnet import BasicBlock, ShortcutA, cifar_resnet
from ddgpipe.models.resnet1d import resnet1d
from ddgpipe.models.user import is_user_model, load_user_model, model_label

__all__ = ["MODEL_NAMES", "build_model", "is_language_model", "is_user_model", "load_user_model",
           "model_label", "cifar_resnet", "resnet1d", "mlp",
           "gpt", "generate", "GPTConfig", "parameter_count", "BasicBlock", "ShortcutA"]
