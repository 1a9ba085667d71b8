"""Planning a job before anything starts (pure: no Ray, no processes, no weights).

* :mod:`~megarlhf.planning.placement` - which GPUs (or CPU slots) each role runs on: pools by
  ``cluster.placement``, TP groups kept inside nodes.
* :mod:`~megarlhf.planning.plan` - the per-GPU memory estimate of every role and phase
  (``megarlhf plan``).
* :mod:`~megarlhf.planning.checks` - :func:`validate`, the full pre-launch check: the config's
  own rules, the rules that need the models' architectures, and the placement rules.
"""

from megarlhf.planning.checks import validate
from megarlhf.planning.placement import PlacementError, PlacementPlan, plan_placement

__all__ = ["PlacementError", "PlacementPlan", "plan_placement", "validate"]
