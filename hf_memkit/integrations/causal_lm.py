"""One generic path from any ``*ForCausalLM`` to its loss inputs: the final hidden states of the base model and
the classifier (``lm_head`` weight and bias), plus the small table of families whose logits are transformed after
``lm_head``. Used by fused losses (``loss.cce``) that never materialise the logits.

How the path works: :class:`CausalLMLossPatch` replaces ``forward`` *on the model instance* (not the class).
With ``labels`` (and optionally ``shift_labels``) it runs the base model (``getattr(model,
model.base_model_prefix)``) to get the final hidden states, and hands them with the classifier to the loss
function; without labels (generation, plain inference) it calls the original forward untouched. Replacing
``forward`` keeps DDP and PEFT wrappers in the call chain (they wrap ``model(...)``), so gradient
synchronisation and adapter hooks still run; ``remove()`` restores the instance exactly. Not supported: FSDP and
DeepSpeed ZeRO-3, which gather lm_head's sharded weight only inside ``lm_head.forward``.

What this module must know about transformers and PEFT internals lives here and nowhere else:
``base_model_prefix``, ``get_output_embeddings``, PEFT's ``LoraLayer`` (``lora_A``/``lora_B``/``scaling``/
``lora_dropout``), ``ModulesToSaveWrapper``, the output dataclass, and how ``Trainer.prediction_step`` tells
whether it will keep the logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import IncompatibleModelError


@dataclass(frozen=True)
class LogitTransform:
    """What a family does to ``lm_head``'s output: logits · scale, then softcap · tanh(logits / softcap)."""

    softcap: float | None = None
    scale: float = 1.0


def _softcap(cfg: Any) -> LogitTransform:
    cap = getattr(cfg, "final_logit_softcapping", None)
    return LogitTransform(softcap=float(cap) if cap else None)


def _times(attr: str) -> Callable[[Any], LogitTransform]:
    return lambda cfg: LogitTransform(scale=float(getattr(cfg, attr)))


def _divided_by(attr: str) -> Callable[[Any], LogitTransform]:
    return lambda cfg: LogitTransform(scale=1.0 / float(getattr(cfg, attr)))


#: model_type -> the transform its *ForCausalLM applies after lm_head (read from the modeling code of
#: transformers 5). Every other family must apply none: see LOGIT_TRANSFORM_ATTRS and CausalLMLossPatch.probe.
FAMILIES: dict[str, Callable[[Any], LogitTransform]] = {
    "gemma2": _softcap,                    # logits = cap * tanh(logits / cap), cap = final_logit_softcapping
    "gemma3_text": _softcap,
    "cohere": _times("logit_scale"),       # logits = logits * logit_scale
    "cohere2": _times("logit_scale"),
    "granite": _divided_by("logits_scaling"),  # logits = logits / logits_scaling
    "granitemoe": _divided_by("logits_scaling"),
    "granitemoeshared": _divided_by("logits_scaling"),
    "granitemoehybrid": _divided_by("logits_scaling"),
}

#: config attributes that signal a transform of the logits after lm_head. A family outside FAMILIES that sets one
#: to a non-identity value is refused: the fused loss would silently compute a different loss.
LOGIT_TRANSFORM_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                         "logit_softcapping", "output_multiplier_scale", "mup_width_multiplier")


def logit_transform(config: Any, key: str = "loss") -> LogitTransform:
    """The family's transform, or :class:`IncompatibleModelError` for a model this generic path cannot serve."""
    model_type = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise IncompatibleModelError(
            f"{key}: {model_type} is an encoder-decoder model; the fused loss serves decoder-only *ForCausalLM "
            "models. Remove the loss slot from the recipe for this model"
        )
    loss_type = getattr(config, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        raise IncompatibleModelError(
            f"{key}: the model's config sets loss_type={loss_type!r}; the fused loss computes the plain causal-LM "
            "cross-entropy only. Remove the loss slot from the recipe, or unset config.loss_type"
        )
    if model_type in FAMILIES:
        return FAMILIES[model_type](config)
    odd = {a: getattr(config, a) for a in LOGIT_TRANSFORM_ATTRS if getattr(config, a, None) not in (None, 1, 1.0)}
    if odd:
        found = ", ".join(f"{a}={v!r}" for a, v in odd.items())
        raise IncompatibleModelError(
            f"{key}: model type {model_type!r} transforms its logits after lm_head ({found}) in a way hf_memkit "
            "does not know, so the fused loss would differ from the model's own. Remove the loss slot from the "
            "recipe for this model, or add the family to hf_memkit.integrations.causal_lm.FAMILIES"
        )
    return LogitTransform()


# ---------------------------------------------------------------------------------------------------------------
# finding the parts


def _peft_loaded() -> bool:
    return "peft" in sys.modules


def unwrap(model: Any, key: str = "loss") -> tuple[Any, Any]:
    """(the *ForCausalLM module, the PeftModel around it or None)."""
    peft_model = None
    if _peft_loaded():
        from peft import PeftModel

        if isinstance(model, PeftModel):
            cfg = model.peft_config.get(model.active_adapter)
            if cfg is not None and getattr(cfg, "is_prompt_learning", False):
                raise IncompatibleModelError(
                    f"{key}: the model carries a prompt-learning PEFT adapter ({type(cfg).__name__}), which "
                    "prepends virtual tokens inside PeftModel.forward; the fused loss cannot line the labels up. "
                    "Use LoRA-style adapters, or remove the loss slot from the recipe"
                )
            peft_model, model = model, model.get_base_model()
    return model, peft_model


def base_and_head(causal_lm: Any, key: str = "loss") -> tuple[Any, Any]:
    """The base model that returns the final hidden states, and the output embedding (``lm_head``)."""
    name = type(causal_lm).__name__
    get_head = getattr(causal_lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise IncompatibleModelError(
            f"{key}: {name} has no output embedding (get_output_embeddings() is None), so there is no lm_head to "
            "fuse with the loss. The fused loss serves *ForCausalLM models; remove the loss slot for this model"
        )
    prefix = getattr(causal_lm, "base_model_prefix", "")
    base = getattr(causal_lm, prefix, None) if prefix else None
    if base is None or base is causal_lm or not callable(base):
        raise IncompatibleModelError(
            f"{key}: {name} has no base model under base_model_prefix={prefix!r}, so its final hidden states cannot "
            "be computed apart from lm_head. Remove the loss slot for this model"
        )
    return base, head


def _resolve_wrappers(head: Any, key: str) -> Any:
    """PEFT's modules_to_save wrapper around lm_head: the copy that is active now."""
    if not _peft_loaded():
        return head
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        active = [a for a in head.active_adapters if a in head.modules_to_save]
        if head.disable_adapters or not active:
            return head.original_module
        return head.modules_to_save[active[0]]
    if isinstance(head, AuxiliaryTrainingWrapper):
        raise IncompatibleModelError(
            f"{key}: lm_head is wrapped by PEFT's {type(head).__name__} (e.g. trainable_token_indices), which the "
            "fused loss does not support. Train lm_head with LoRA or modules_to_save, or remove the loss slot"
        )
    return head


def classifier_parts(head: Any, hidden: Any, key: str = "loss"):
    """(e, c, bias) such that ``head(hidden) == e @ c.T + bias``.

    A plain ``nn.Linear`` gives (hidden, weight, bias). A PEFT LoRA layer adds its branch exactly, dropout
    included: ``W x + s·B(A(drop(x)))`` = ``[x, s·A(drop(x))] @ [W, B]ᵀ`` — the low-rank activations are
    appended to the hidden states and B to the classifier, so the loss sees one linear layer and autograd routes
    the gradients to A and B.
    """
    import torch
    from torch import nn

    head = _resolve_wrappers(head, key)
    if _peft_loaded():
        from peft.tuners.lora import LoraLayer

        if isinstance(head, LoraLayer):
            base = head.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise IncompatibleModelError(
                    f"{key}: lm_head's LoRA wraps a {type(base).__name__}, not an nn.Linear (a quantized head?); "
                    "the fused loss needs the dense weight. Leave lm_head unquantized, or remove the loss slot"
                )
            weight, bias = base.weight, base.bias
            if head.disable_adapters or head.merged:
                return hidden, weight, bias
            es, cs = [hidden], [weight]
            for name in head.active_adapters:
                if name not in head.lora_A:
                    continue
                if name in getattr(head, "lora_variant", {}):
                    raise IncompatibleModelError(
                        f"{key}: lm_head carries a LoRA variant ({type(head.lora_variant[name]).__name__}, e.g. "
                        "DoRA) that the fused loss does not support. Drop lm_head from target_modules or use plain "
                        "LoRA there"
                    )
                lora_a, lora_b, s = head.lora_A[name], head.lora_B[name], head.scaling[name]
                u = lora_a(head.lora_dropout[name](hidden.to(lora_a.weight.dtype))) * s
                es.append(u.to(hidden.dtype))
                cs.append(lora_b.weight.to(weight.dtype))
                if lora_b.bias is not None:
                    extra = lora_b.bias.to(weight.dtype) * s
                    bias = extra if bias is None else bias + extra
            return torch.cat(es, dim=-1), torch.cat(cs, dim=1), bias
    if isinstance(head, nn.Linear):
        return hidden, head.weight, head.bias
    raise IncompatibleModelError(
        f"{key}: the output embedding is a {type(head).__name__}, not an nn.Linear (or a PEFT LoRA layer over one); "
        "the fused loss needs its weight. Remove the loss slot for this model"
    )


def prediction_loss_only_of_caller(max_depth: int = 8) -> bool | None:
    """``prediction_loss_only`` of the ``Trainer.prediction_step`` this call runs under (None outside one).

    The Trainer gives a loss hook no other way to learn whether it will keep the logits: ``Trainer.evaluate``
    passes True when no ``compute_metrics`` is set, ``predict`` and metric evaluation pass False."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code.co_name == "prediction_step" and "prediction_loss_only" in frame.f_locals:
            value = frame.f_locals["prediction_loss_only"]
            return bool(value) if value is not None else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# the patch




def _loss_patch_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    return vars(self)["_memkit_loss_patch"]._forward(*args, **kwargs)


class CausalLMLossPatch:
    """Replaces ``forward`` on one *ForCausalLM instance (found inside a PeftModel if needed) so that a call with
    labels computes ``loss_fn(e, c, targets, bias=..., softcap=..., shift=..., num_items_in_batch=...,
    ignore_index=...)`` from the final hidden states. Logits are returned only when :meth:`request_logits` asks
    for them, or — outside such a request — when the model is in eval mode (what a direct caller expects)."""

    def __init__(self, model: Any, loss_fn: Callable[..., Any], key: str = "loss"):
        self.key = key
        self.model = model
        self.causal_lm, self.peft_model = unwrap(model, key)
        self.transform = logit_transform(getattr(self.causal_lm, "config", None), key)
        self.base, self.head = base_and_head(self.causal_lm, key)
        self.loss_fn = loss_fn
        self._request: bool | None = None
        lm = self.causal_lm
        if getattr(lm, "_memkit_loss_patch", None) is not None:
            raise IncompatibleModelError(
                f"{key}: this model's forward is already replaced by a fused loss; apply one loss technique once"
            )
        from .patching import Patches, base_forward

        self._patches = Patches(key.split(".")[-1], lm)
        # the patching layer binds _loss_patch_forward to lm and keeps this object on it: a deep copy of the
        # model gets a copy of the patch that computes with the copy's base and head
        self._patches.forward(lm, _loss_patch_forward)
        self._patches.set_attr(lm, "_memkit_loss_patch", self)
        self._original = base_forward(lm)  # the class forward, or an instance-level wrapper that was there
        self._signature = inspect.signature(self._original)

    # lifecycle ------------------------------------------------------------------------------------------------
    def remove(self) -> None:
        self._patches.remove()

    @contextlib.contextmanager
    def request_logits(self, want: bool | None):
        previous, self._request = self._request, want
        try:
            yield
        finally:
            self._request = previous

    # the forward ----------------------------------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        if not args and kwargs.get("labels") is None:
            return self._original(**kwargs)
        bound = self._signature.bind_partial(*args, **kwargs)
        kw: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            param = self._signature.parameters[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(value)
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                return self._original(*args, **kwargs)  # an exotic signature: leave it alone
            else:
                kw[name] = value
        labels, shift_labels = kw.pop("labels", None), kw.pop("shift_labels", None)
        if labels is None:  # as the models do: no labels, no loss (shift_labels only replace the shifted labels)
            return self._original(*args, **kwargs)
        num_items = kw.pop("num_items_in_batch", None)
        ignore_index = kw.pop("ignore_index", -100)
        return_dict = kw.pop("return_dict", None)
        kw.pop("logits_to_keep", None)
        out = self.base(**kw)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        loss = self.loss_from_hidden(hidden, labels, shift_labels, num_items, ignore_index)
        logits = self.logits(hidden) if self._wants_logits() else None
        result = self._output(loss, logits, out)
        return result.to_tuple() if return_dict is False else result

    def _wants_logits(self) -> bool:
        if self._request is not None:
            return self._request
        return not self.causal_lm.training

    def parts(self, hidden: Any):
        """(e, c, bias) with the family's logit scale folded in (the softcap stays for the loss)."""
        e, c, bias = classifier_parts(self.head, hidden, self.key)
        scale = self.transform.scale
        if scale != 1.0:
            e = e * scale
            bias = bias * scale if bias is not None else None
        return e, c, bias

    def loss_from_hidden(self, hidden, labels, shift_labels, num_items_in_batch, ignore_index=-100):
        e, c, bias = self.parts(hidden)
        if shift_labels is not None:
            targets, shift = shift_labels, 0
        else:
            targets, shift = labels, 1
        return self.loss_fn(e, c, targets.to(e.device), bias=bias, softcap=self.transform.softcap, shift=shift,
                            num_items_in_batch=num_items_in_batch, ignore_index=ignore_index)

    def logits(self, hidden: Any):
        """The model's own logits (through lm_head itself, adapters included, then the family's transform)."""
        import torch

        logits = self.head(hidden)
        t = self.transform
        if t.scale != 1.0:
            logits = logits * t.scale
        if t.softcap is not None:
            logits = torch.tanh(logits / t.softcap) * t.softcap
        return logits

    def _output(self, loss: Any, logits: Any, base_out: Any):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        extra = {f.name: getattr(base_out, f.name, None) for f in dataclasses.fields(CausalLMOutputWithPast)
                 if f.name not in ("loss", "logits")}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **extra)

    # the check ------------------------------------------------------------------------------------------------
    def probe(self, rtol: float | None = None) -> float | None:
        """Run the original forward and the generic path on a few tokens and compare the logits; a mismatch means
        the family changes its logits in a way the table does not know, and raises IncompatibleModelError.
        Returns the relative difference, or None when the weights are not materialised (meta device, sharded)."""
        import torch

        weight = self.classifier_weight()
        if weight.is_meta or weight.numel() == 0:
            return None
        vocab, device = weight.shape[0], weight.device
        ids = (torch.arange(1, 5, device=device) % vocab)[None, :]
        flags = {m: m.training for m in self.causal_lm.modules()}
        try:
            self.causal_lm.eval()
            with torch.no_grad():
                ref = self._original(input_ids=ids, use_cache=False)
                ref = ref.logits if hasattr(ref, "logits") else ref[0]
                hidden = self.base(input_ids=ids, use_cache=False)
                hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
                e, c, bias = self.parts(hidden)
                ours = e @ c.t()
                if bias is not None:
                    ours = ours + bias
                if self.transform.softcap is not None:
                    cap = self.transform.softcap
                    ours = torch.tanh(ours / cap) * cap
        finally:
            for m, flag in flags.items():
                m.training = flag
        ref, ours = ref.float(), ours.float()
        tol = rtol if rtol is not None else (1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2)
        diff = float((ours - ref).abs().max() / (ref.abs().max() + 1e-6))
        if ours.shape != ref.shape or not diff <= tol:
            raise IncompatibleModelError(
                f"{self.key}: {type(self.causal_lm).__name__} (model type "
                f"{getattr(self.causal_lm.config, 'model_type', '?')!r}) computes logits that differ from "
                f"lm_head(final hidden states) with the known transform by {diff:.2e} (relative); it transforms its "
                "logits in a way hf_memkit does not know, and the fused loss would be wrong. Remove the loss slot "
                "from the recipe for this model, or add the family to hf_memkit.integrations.causal_lm.FAMILIES"
            )
        return diff

    def classifier_weight(self) -> Any:
        """lm_head's (base) weight, (V, D)."""
        head = _resolve_wrappers(self.head, self.key)
        base = head.get_base_layer() if hasattr(head, "get_base_layer") else head
        return base.weight
