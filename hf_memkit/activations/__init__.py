"""Techniques of the ``activations`` slot: what autograd keeps between forward and backward.

* ``mesa`` — saved tensors stored in 8 bits with running per-group ranges (Pan et al., Mesa)
* ``wta_crs`` — Linear weight gradients from k sampled token rows (Liu et al., WTA-CRS)
* ``offload`` — saved tensors moved to host RAM or disk, optionally token-wise with recompute (MEMO, torchtune)
"""
