"""What leaves a run: the exported checkpoint (safetensors, compressed-tensors, 2:4 sparse), the LoRC adapter
folder, the model card and manifest, the Hub upload. Technique-neutral: the technique packages call it, it reads
their per-module marks (quantized grids, 2:4 masks, LoRC factors) but patches nothing."""
