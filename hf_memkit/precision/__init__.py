"""Techniques of the ``precision`` slot: how weights are *stored* (the compute stays fp32).

* ``bf16`` — Linear and Embedding weights stored in 16 bits, fp32 compute, updates written back with stochastic
  rounding or Kahan compensation (Zamirai et al., "Revisiting BFloat16 Training"; torchao, optimi)
"""
