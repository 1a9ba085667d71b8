"""Checkpoints: model weights as megatron distributed checkpoints (reshardable on load), atomic.

* :mod:`megarlhf.checkpoint.model` - save/load a model's weights (any TP/PP/VPP/DP layout in,
  any layout out) with a metadata file that is written last.
* :mod:`megarlhf.checkpoint.atomic` - the temp-dir + fsync + rename protocol every writer uses.
"""
