"""``schedule: [{sparse_update: {...}}]`` — sparse layer/channel updates (Lin et al., "On-Device Training Under
256KB Memory", 2022), optionally on fake-quantized int8 weights with Quantization-Aware Scaling."""
