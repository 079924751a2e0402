"""Weight quantization passes for the ``compress:`` slot: RTN, GPTQ, LoRC and EfficientQAT (Block-AP, E2E-QP).

Layout: :mod:`.grid` (the uniform grid: fitting scales and zero points, codes, dequantization),
:mod:`.linear` (how a quantized ``nn.Linear`` carries its codes in memory), :mod:`.calibration` and
:mod:`.layerwise` (calibration text and the block-by-block driver), :mod:`.pipeline` (one pass:
:func:`~hf_memkit.quant.pipeline.quantize_model_`), :mod:`.base` (how a recipe's compress list runs in a
Trainer), one folder per technique (``config.py`` + ``technique.py`` + the algorithm), :mod:`.evaluate`
(corpus perplexity), :mod:`.threads` and :mod:`.oneshot` (``memkit compress``). Checkpoint formats live in
:mod:`hf_memkit.export.compressed_tensors` and :mod:`hf_memkit.export.lorc_adapter`.
Importing a config or technique module does not import torch; the algorithm modules load when a pass runs.
"""
