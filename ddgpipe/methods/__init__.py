"""Training methods with one interface: ``step(x, y, loss_fn) -> loss``, ``drain()``, ``model``.

* :class:`Backprop` — plain backpropagation, the reference every method is compared with.
* :class:`DDG` — Decoupled Parallel Backpropagation (Huo et al., ICML 2018).
* :class:`~ddgpipe.methods.dni.DNI` — decoupled neural interfaces with synthetic gradients
  (Jaderberg et al. 2017).
"""

from ddgpipe.methods.bp import Backprop
from ddgpipe.methods.ddg import DDG
from ddgpipe.methods.dni import DNI
from ddgpipe.methods.pipeline import PipelineMethod

Method = Backprop | PipelineMethod
"""What the training loop drives: backprop, or a pipeline of stages (DDG, DNI)."""

__all__ = ["Backprop", "DDG", "DNI", "PipelineMethod", "Method"]
