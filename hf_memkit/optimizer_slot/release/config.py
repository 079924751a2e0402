"""The two settings every optimizer technique of this package takes for gradient release, defined once.

Each optimizer config declares them last, with these factories (pydantic puts a base class's fields first, and
a recipe reads better with ``lr`` first)::

    gradient_release: bool = release_field()
    release_clipping: ReleaseClipping = clipping_field()
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

ReleaseClipping = Literal["per_parameter", "refuse"]

def release_field() -> Any:
    return Field(False, description="step each parameter inside backward and free its gradient at once "
                 "(about one tensor's gradient alive instead of all); see the optimizer's docstring")


def clipping_field() -> Any:
    return Field("per_parameter", description="with gradient_release and max_grad_norm > 0: per_parameter clips "
                 "each gradient to max_grad_norm on its own; refuse stops with an error")
