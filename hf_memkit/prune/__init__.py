"""Pruning and sparsity: N:M masks (:mod:`.masks`), the compressed-tensors ``sparse-24-bitmask`` codec
(:mod:`.sparse24`), one-shot 2:4 passes (``magnitude_24``, ``wanda_24``), 2:4 sparse training (``ast``, ``cast``:
optimizer-slot techniques, :mod:`.sparse_training`) and structured pruning (``comp``, ``l1_structured``).

The ``compress:`` techniques share the quantization plan of :mod:`hf_memkit.compress.plan` (they run in ``finalize``
or in ``memkit compress``, before any quantizer of the same list). Model surgery that edits a transformers
config (dropping decoder layers, shrinking the MLP) lives in :mod:`hf_memkit.integrations.structured`; the
checkpoint writer in :mod:`hf_memkit.export.sparse`.
"""
