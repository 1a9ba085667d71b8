"""The driver: the run skeleton every trainer shares (:mod:`.run`), the training and evaluation
loops (:mod:`.sft`, :mod:`.rm`, :mod:`.rl`, :mod:`.async_rl` around the pure
:mod:`.async_schedule`, :mod:`.bon`, :mod:`.rm_data`) and their driver-side plumbing: the
job's roles on the cluster (:mod:`.cluster`), the run's session (:mod:`.session`), sampling
parameters and seeds (:mod:`.sampling`), rollouts into training batches (:mod:`.experience`),
greedy evaluation (:mod:`.evaluate`). See docs/architecture.md for the map."""
