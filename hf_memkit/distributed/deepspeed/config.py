from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ...technique import TechniqueConfig

PRESETS = ("zero2", "zero3", "zero3_offload", "zero3_nvme")


class DeepSpeedConfig(TechniqueConfig):
    """``distributed: {deepspeed: {preset: zero3_offload, host_memory_gb: 64}}`` — DeepSpeed ZeRO through the
    Trainer's own ``deepspeed`` argument: the preset (a JSON file in ``configs/``) or your ``config`` file, with
    ``overrides`` merged in, becomes ``TrainingArguments.deepspeed``. The Trainer builds the engine; nothing here
    replaces it.

    ```yaml
    distributed: {deepspeed: {preset: zero2}}
    distributed: {deepspeed: {preset: zero3_offload, host_memory_gb: 32}}     # buffers sized to 32 GB per rank
    distributed: {deepspeed: {config: my_ds.json, overrides: {zero_optimization: {overlap_comm: true}}}}
    ```
    Launch with ``memkit run --nproc-per-node N script.py --memkit_recipe r.yaml ...`` (torchrun; gloo ranks on a
    CPU-only machine). Reference: Rajbhandari et al. 2020 (ZeRO), Ren et al. 2021 (ZeRO-Offload), Rajbhandari et
    al. 2021 (ZeRO-Infinity); MemAscend (host-memory budgets). Plain PyTorch equivalent:
    ``TrainingArguments(..., deepspeed="configs/zero2.json")``.

    ``host_memory_gb`` sizes the offload buffers (reduce/prefetch buckets, live-parameter limit, sub-group,
    NVMe swap buffers) to a per-rank host-RAM budget instead of DeepSpeed's defaults
    (:data:`hf_memkit.memory.host.DEEPSPEED_DEFAULTS`); the partitions themselves must fit, or the recipe is
    refused with the number it needs.

    Not for: techniques that need whole parameters or gradients (see the README's compatibility table; the
    recipe is refused); a single process (use no ``distributed`` slot); ``train_batch_size`` in your own config
    (the Trainer computes it before the ranks are known on CPU; leave it out, DeepSpeed derives it).
    """

    preset: Literal["zero2", "zero3", "zero3_offload", "zero3_nvme"] = Field(
        "zero2", description="configs/<preset>.json to start from (ignored when `config` is given)")
    config: str | None = Field(None, description="path to your own DeepSpeed JSON config (instead of the preset)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the config, nested keys "
                                      "by nested mappings (e.g. {zero_optimization: {overlap_comm: true}})")
    host_memory_gb: float | None = Field(None, gt=0, description="host RAM per rank (GiB) the offload buffers "
                                         "are sized to; null = DeepSpeed's defaults")
    nvme_path: str | None = Field(None, description="folder for zero3_nvme swap files (default: the preset's "
                                  "/tmp/memkit_nvme)")

    @field_validator("config")
    @classmethod
    def _json(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".json"):
            raise ValueError(f"config={v!r} is not a .json file; give the path of a DeepSpeed JSON config")
        return v
