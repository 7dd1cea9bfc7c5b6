"""ddgpipe: Decoupled Parallel Backpropagation (Huo et al., ICML 2018) for PyTorch."""

from ddgpipe.core.timeline import Timeline
from ddgpipe.errors import NonFiniteLossError, UsageError
from ddgpipe.methods import DDG, Backprop
from ddgpipe.runtime.allocator import tune_allocator

__version__ = "0.1.0"

__all__ = ["DDG", "Backprop", "Timeline", "UsageError", "NonFiniteLossError", "tune_allocator",
           "__version__"]
