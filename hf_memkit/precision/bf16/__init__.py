"""16-bit weight storage with fp32 compute. See :class:`.config.Bf16Config`."""
