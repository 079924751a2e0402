"""Schedule techniques (``schedule:`` slot, a list): they decide *what* trains and *when*, on top of whatever
optimizer and loss the recipe chooses.

* ``lisa`` — every K steps, γ decoder layers train (sampled without replacement); optimizer state of
  deactivated layers is dropped, so memory stays flat as layers rotate.
* ``sparse_update`` — biases/norms of the last k layers plus a fraction of the input channels of chosen Linear
  weights (by L2 norm), optionally as fake-quantized int8 weights trained with Quantization-Aware Scaling.

Shared helpers: :mod:`.layers` (finding the decoder layers and the always-trained parts of a model),
:mod:`.optimizer_state` (dropping per-parameter optimizer state); what autograd saves when the bottom of the
network needs no gradient is part of memory accounting (:mod:`hf_memkit.memory.frozen_prefix`).
"""
