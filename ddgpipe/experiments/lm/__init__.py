"""``ddgpipe experiment lm``: DDG on a GPT, plan -> run -> summary -> report (see :mod:`.plan`)."""

from ddgpipe.experiments.lm.plan import LMPlan, lm_plan
from ddgpipe.experiments.lm.run import run_lm

__all__ = ["LMPlan", "lm_plan", "run_lm"]
