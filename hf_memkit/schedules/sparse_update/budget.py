"""The cheap contribution measurement of ``budget`` mode.

For a few training batches, one forward/backward with every candidate weight and bias/norm trainable gives each
candidate's gradient; the first-order loss decrease of a gradient step ``-η·g`` on a set of parameters is
``η·‖g‖²``, so the squared gradient norm of a set is its expected gain, additive over channels and layers. Each
gradient is reduced (to per-input-channel sums of squares for weights) and freed the moment it is accumulated,
so the measurement holds one weight gradient at a time; its activations are those of one full fine-tuning
micro-batch.

The paper instead fine-tunes every candidate (bias depth k, layer i at ratio r) and measures the accuracy gain,
then searches the combinations with an evolutionary algorithm. The proxy here costs ``batches`` backward passes
instead of one fine-tuning run per candidate; like the paper, it assumes the gains of different layers add up.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


def calibration_batches(dataloader: Any, count: int, batch_size: int, device: Any) -> list[dict[str, Any]]:
    """The first ``count`` batches of the training data, built from the dataset in order (no sampler, so the
    training run's data order and RNG are untouched)."""
    import torch

    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    batches: list[Any] = []
    if dataset is not None and collate is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        n = len(dataset)
        for b in range(count):
            idx = [(b * batch_size + j) % n for j in range(batch_size)]
            batches.append(collate([dataset[i] for i in idx]))
    else:  # an iterable dataset: take batches from the loader, restoring the RNG it may consume
        with torch.random.fork_rng(devices=[]):
            for batch in dataloader:
                batches.append(batch)
                if len(batches) == count:
                    break
    out = []
    for batch in batches:
        out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()})
    return out


@contextlib.contextmanager
def _only_trainable(model: Any, params: list[Any]) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
            p.grad = None


def measure_contributions(model: Any, batches: list[dict[str, Any]], modules: dict[str, Any],
                          bias_params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Per-input-channel ``Σ G_W[:, j]²`` of each module's weight and ``‖g‖²`` of each bias/norm parameter,
    summed over ``batches``. ``modules`` may be patched (their instance ``forward`` is bypassed meanwhile)."""
    import torch

    channel: dict[str, Any] = {n: None for n in modules}
    scalar: dict[str, float] = {n: 0.0 for n in bias_params}
    hooks = []

    def weight_hook(name):
        def hook(p):
            s = p.grad.detach().float().pow(2).sum(dim=0)
            channel[name] = s if channel[name] is None else channel[name] + s
            p.grad = None
        return hook

    def bias_hook(name):
        def hook(p):
            scalar[name] += float(p.grad.detach().float().pow(2).sum())
            p.grad = None
        return hook

    from ...integrations.patching import suspended

    was_training = model.training
    params = [m.weight for m in modules.values()] + list(bias_params.values())
    try:
        with suspended(modules.values()), _only_trainable(model, params), torch.random.fork_rng(devices=[]):
            for n, m in modules.items():
                hooks.append(m.weight.register_post_accumulate_grad_hook(weight_hook(n)))
            for n, p in bias_params.items():
                hooks.append(p.register_post_accumulate_grad_hook(bias_hook(n)))
            model.eval()  # no dropout: the measurement is deterministic and consumes no RNG
            for batch in batches:
                out = model(**batch)
                loss = out["loss"] if isinstance(out, dict) else out[0]
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for n, m in modules.items():
        if channel[n] is None:
            channel[n] = torch.zeros(m.weight.shape[1])
    return channel, scalar
