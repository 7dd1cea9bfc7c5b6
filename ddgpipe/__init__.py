"""ddgpipe: Decoupled Parallel Backpropagation (Huo et al., ICML 2018) for PyTorch."""

from ddgpipe.allocator import tune_allocator
from ddgpipe.errors import NonFiniteLossError, UsageError
from ddgpipe.methods import DDG, Backprop
from ddgpipe.timeline import Timeline

__version__ = "0.1.0"

__all__ = ["DDG", "Backprop", "Timeline", "UsageError", "NonFiniteLossError", "tune_allocator",
           "__version__"]
