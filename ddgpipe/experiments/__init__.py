"""``ddgpipe experiment NAME``: grids of training runs that check a claim, with a report.

* ``paper`` (:mod:`~ddgpipe.experiments.paper`): the DDG paper's claims — backprop, DDG and
  DNI at K = 2, 3, 4 under constant-step SGD, diminishing-step SGD and momentum SGD.
* ``staleness`` (:mod:`~ddgpipe.experiments.staleness`): the staleness compensations of
  :mod:`ddgpipe.core.compensation` against plain DDG and backprop with momentum SGD, at backprop's
  own hyperparameters, on two benchmarks.

Both are built on :mod:`~ddgpipe.experiments.common`: independent runs spread over worker
processes (one torch thread each, the reference executor), resumable run by run, and every
number of a report read back from the runs' own files.
"""

from __future__ import annotations

__all__ = ["common", "paper", "staleness"]
