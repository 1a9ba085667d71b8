"""The controller: placement of roles on the cluster (:mod:`.placement`), the pre-launch plan
and memory estimate (:mod:`.plan`), and the driver loops built on the worker groups."""
