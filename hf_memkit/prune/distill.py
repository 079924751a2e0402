"""Logit distillation from a frozen dense teacher (AST: ``a_task·CE + a_kl·T²·KL``; CAST Eq. 13: ``η·KL +
(1−η)·CE``): ``KL(softmax(z_t/T) ‖ softmax(z_s/T))`` summed over the vocabulary, averaged over the tokens that
count (``attention_mask`` when given), times ``T²`` so the gradient scale does not shrink with T."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if attention_mask is not None:
        m = attention_mask.to(per_token.dtype)
        kl = (per_token * m).sum() / m.sum().clamp_min(1)
    else:
        kl = per_token.mean()
    return kl * temperature**2
