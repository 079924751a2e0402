from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ...technique import TechniqueConfig


class OffloadConfig(TechniqueConfig):
    """``activations: [{offload: {}}]`` — tensors saved for backward leave the device during the forward and come
    back in backward: to host RAM (CUDA tensors; pinned buffers, copies on a side stream) or to files on disk (any
    device — on a CPU-only machine ``to: disk`` is what frees RAM). Gradients are bit-identical.

    ```yaml
    activations: [{offload: {to: disk, min_bytes: 1024}}]
    activations: [{offload: {to: cpu, token_fraction: 0.5}}]   # MEMO token-wise: half the tokens stored
    training_args: {gradient_checkpointing: true}              # optional: offload only the checkpoint inputs
    ```
    References: torchtune ``OffloadActivations`` and ``torch.autograd.graph.save_on_cpu`` (the plain PyTorch
    equivalent: ``with save_on_cpu(pin_memory=True): loss = model(**batch).loss``); MEMO (Zhao et al. 2024,
    arXiv 2407.12117) for the token-wise variant: with ``token_fraction`` α < 1 each decoder layer stores only the
    first α of the token rows of what it saves and, in backward, recomputes the layer once from its input (kept
    on the device) to rebuild the rest — see :mod:`hf_memkit.activations.offload.hooks` for exactly what is
    recomputed (the whole layer: this implementation does not restrict the recompute to the missing rows).
    With gradient checkpointing, the checkpointed layers save only their inputs, and those are what is offloaded.

    Not for: ``to: cpu`` on a CPU-only model (nothing would move — refused); slow disks (every saved tensor is
    written and read once per step); ``token_fraction`` < 1 together with gradient checkpointing (both recompute
    the layer — refused). Host RAM (or disk) must hold one step's saved activations.
    """

    to: Literal["auto", "cpu", "disk"] = Field(
        "auto", description="where saved tensors go: cpu = pinned host RAM (CUDA models), disk = files (any "
        "device), auto = cpu on CUDA, disk otherwise")
    token_fraction: float = Field(
        1.0, description="α in (0, 1]: fraction of each decoder layer's token rows stored; the rest is "
        "recomputed from the layer input in backward (1 = plain offload, no recompute)")
    min_bytes: int = Field(1024, ge=0, description="tensors smaller than this stay where they are")
    dir: str | None = Field(None, description="folder for to: disk (a fresh temporary folder inside it is used "
                            "and removed); null = the system temp folder")
    pin_memory: bool = Field(True, description="to: cpu uses pinned host buffers (asynchronous copies)")
    release_host_memory: bool = Field(
        True, description="to: disk on a CPU model: fix glibc's mmap threshold at 1 MiB so that memory freed after "
        "offloading goes back to the OS (process-wide, for the process lifetime; see offload/allocator.py); "
        "false leaves malloc as it is")

    @field_validator("token_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not (0 < v <= 1):
            raise ValueError(f"token_fraction={v} is outside (0, 1]: it is the fraction of token rows stored "
                             "(1 = offload everything, no recompute)")
        return v
