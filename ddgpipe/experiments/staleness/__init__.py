"""``ddgpipe experiment staleness``: plan -> run -> summary -> report (see :mod:`.plan`)."""

from ddgpipe.experiments.staleness.plan import StalenessPlan, staleness_plan
from ddgpipe.experiments.staleness.run import run_staleness

__all__ = ["StalenessPlan", "staleness_plan", "run_staleness"]
