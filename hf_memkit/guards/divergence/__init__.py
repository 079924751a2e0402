"""Divergence guard: non-finite or spiking loss, non-finite or vanished gradients stop the run or skip the step."""
