"""Offload's estimate: ``activations`` (what stays on the device) keeps only the saved tensors below
``min_bytes`` (and, token-wise, each decoder layer's input); the rest moves to ``activations_offloaded`` (host RAM
or disk). With ``token_fraction`` α < 1, α of the layer tensors is stored and one layer's set is recomputed in
backward (``activations_recompute``, transient). Under gradient checkpointing the checkpointed layer inputs are
what moves. Note: the memory profiler's meter counts checkpoint inputs wherever they live."""

from __future__ import annotations

from typing import Any

from ..saved_layout import dims, head_tensors, layer_tensors, saved_tensors


def offload_estimate(mem: Any, cfg: Any) -> None:
    config = mem.model.config
    # the cross-entropy's saved log-probabilities leave the device too; other logits terms (a distillation's
    # teacher and student log-probabilities, held by the loss code outside autograd's saved tensors) stay
    loss_terms = [t for t in mem.terms if t.category == "logits" and t.source == "model"]
    logits = sum(t.bytes for t in loss_terms)
    if logits >= cfg.min_bytes:
        mem.add("logits", -logits, "offload", "the cross-entropy's saved log-probabilities leave the device")
        mem.add("activations_offloaded", logits, "offload", "the loss's saved log-probabilities")
    d, T, k = mem.dtype_bytes, mem.batch_size * mem.seq_len, dims(config)
    small = lambda b: b < cfg.min_bytes  # noqa: E731
    if mem.gradient_checkpointing:
        items = head_tensors(mem, config)
        inputs = d * k["h"] * T
        moved = sum(s.bytes for s in items if not small(s.bytes)) + (0 if small(inputs) else inputs * k["layers"])
    elif cfg.token_fraction < 1:
        moved = 0
        for i in range(k["layers"]):
            for s in layer_tensors(mem, config, i):
                if not small(s.bytes):
                    moved += round(s.bytes * cfg.token_fraction) if s.token_rows else s.bytes
        moved += sum(s.bytes for s in head_tensors(mem, config) if not small(s.bytes))
        layers_saved = sum(s.bytes for s in layer_tensors(mem, config, 0) if not small(s.bytes))
        held = d * k["h"] * T * k["layers"]  # each layer's input stays on the device for the recompute
        mem.add("activations", held, "offload", "decoder-layer inputs kept for the token-wise recompute")
        mem.add("activations_recompute", layers_saved, "offload", "one layer recomputed in backward (transient)")
        moved_all = sum(s.bytes for s in saved_tensors(mem, config) if not small(s.bytes))
        mem.add("activations", -moved_all, "offload", "saved tensors >= min_bytes leave the device")
        mem.add("activations_offloaded", moved, "offload", f"α={cfg.token_fraction} of the token rows stored")
        return
    else:
        return  # everything saved moves: offload_finish, once every technique's activation terms are in
    mem.add("activations", -moved, "offload", "saved tensors >= min_bytes leave the device")
    mem.add("activations_offloaded", moved, "offload", "host RAM (to: cpu) or disk (to: disk)")


def offload_finish(mem: Any, cfg: Any) -> None:
    """Whole-tensor offload without checkpointing: every saved tensor of ``min_bytes`` or more leaves the device,
    whichever technique shaped it (an adapter's inputs, Mesa's 8-bit copies, WTA-CRS's sampled rows), so the
    moved bytes are the activations the other techniques' terms add up to, less the small tensors that stay."""
    if mem.gradient_checkpointing or cfg.token_fraction < 1:
        return
    total = sum(t.bytes for t in mem.terms if t.category == "activations")
    kept = sum(s.bytes for s in saved_tensors(mem, mem.model.config) if s.bytes < cfg.min_bytes)
    moved = max(0, total - kept)
    mem.add("activations", -moved, "offload", "saved tensors >= min_bytes leave the device")
    mem.add("activations_offloaded", moved, "offload", "host RAM (to: cpu) or disk (to: disk)")
