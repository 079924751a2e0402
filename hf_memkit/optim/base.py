"""Kept so that ``from hf_memkit.optim.base import OptimizerTechnique`` (third-party optimizer techniques) keeps
working; the class lives in :mod:`hf_memkit.optimizer_slot.technique`."""

from ..optimizer_slot.technique import OptimizerTechnique

__all__ = ["OptimizerTechnique"]
