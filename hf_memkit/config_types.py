"""Constrained field types shared by technique configs (the ``*/config.py`` files)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: the largest rank a low-rank technique accepts: far above any layer width in use, low enough that a typo such
#: as ``r: 1e20`` is an error at load time instead of an allocation failure later
MAX_RANK = 65536

#: an Adam-style decay rate: beta = 1 never forgets (the bias correction then divides by zero)
DecayRate = Annotated[float, Field(ge=0, lt=1)]
#: ``betas: [beta1, beta2]``
Betas = tuple[DecayRate, DecayRate]
#: a rank in a per-module pattern (``rank_pattern: {q_proj: 4}``)
Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
