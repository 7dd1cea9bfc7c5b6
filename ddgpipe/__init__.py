"""ddgpipe: Decoupled Parallel Backpropagation (Huo et al., ICML 2018) for PyTorch."""

__version__ = "0.1.0"
