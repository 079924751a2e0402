"""The layer sampler: γ of N indices, uniformly without replacement, from its own ``torch.Generator`` (so the
draws depend neither on the Trainer's RNG nor on data order, and its state can be checkpointed exactly)."""

from __future__ import annotations

from typing import Any


class LayerSampler:
    def __init__(self, num_layers: int, active: int):
        self.num_layers = num_layers
        self.active = min(active, num_layers)
        self._generator: Any = None

    @property
    def started(self) -> bool:
        return self._generator is not None

    def seed(self, seed: int) -> None:
        import torch

        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed))

    def draw(self) -> list[int]:
        import torch

        if self._generator is None:
            raise RuntimeError("LayerSampler.draw() before seed() or set_state()")
        perm = torch.randperm(self.num_layers, generator=self._generator)
        return sorted(int(i) for i in perm[: self.active])

    def get_state(self) -> Any:
        """The generator state as a uint8 tensor (empty before the sampler is seeded)."""
        import torch

        return self._generator.get_state() if self._generator is not None else torch.empty(0, dtype=torch.uint8)

    def set_state(self, state: Any) -> None:
        import torch

        if state is None or state.numel() == 0:
            self._generator = None
            return
        self._generator = torch.Generator(device="cpu")
        self._generator.set_state(state.to(torch.uint8).contiguous())
