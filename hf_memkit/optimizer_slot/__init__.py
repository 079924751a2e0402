"""The optimizer slot's shared machinery, below every technique that fills the slot: the
:class:`~hf_memkit.optimizer_slot.technique.OptimizerTechnique` base (the optim/ techniques and the 2:4 sparse
trainers of prune/ build on it), the fp32-state optimizer base and AdamW branch (:mod:`.fp32_adamw`), the narrowed
inner step (:mod:`.narrowed`) and gradient release (:mod:`.release`, an option of the slot, not a technique).
Technique packages import from here, never from each other."""
