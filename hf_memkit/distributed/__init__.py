"""``distributed:`` slot: DeepSpeed ZeRO and FSDP presets that fill the Trainer's own arguments, and CO2
(asynchronous outer steps on top of torch.distributed). Imports nothing heavy."""
