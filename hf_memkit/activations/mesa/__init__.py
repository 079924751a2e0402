"""Mesa: 8-bit saved activations. See :class:`.config.MesaConfig`."""
