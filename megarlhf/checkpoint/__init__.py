"""Checkpoints: model weights (reshardable), full training states, HF conversion; all atomic.

* :mod:`megarlhf.checkpoint.atomic` - the temp-dir + fsync + rename protocol every writer uses.
* :mod:`megarlhf.checkpoint.model` - save/load a model's weights as a megatron distributed
  checkpoint (any TP/PP/VPP/DP layout in, any layout out) with a metadata file written last.
* :mod:`megarlhf.checkpoint.convert` - HF safetensors <-> megarlhf checkpoints
  (``megarlhf convert``) and the HF export of a trained role, through the resharder.
* :mod:`megarlhf.checkpoint.role_state` - one role's full training state (weights, optimizer,
  scheduler, RNG per rank), run on the role's workers.
* :mod:`megarlhf.checkpoint.training` - the training checkpoint protocol on the driver:
  ``step_N/`` directories, the ``COMPLETE`` marker, the ``latest`` pointer, pruning, resume.
"""
