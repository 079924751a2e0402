"""Activation offload (torchtune-style) and MEMO's token-wise variant. See :class:`.config.OffloadConfig`."""
