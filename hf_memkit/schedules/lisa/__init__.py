"""``schedule: [{lisa: {...}}]`` — Layerwise Importance Sampled AdamW with optimizer-state dropping."""
