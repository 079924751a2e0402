"""A compress technique's pass, run by name through the registry: the plan's lifecycle, ``memkit compress`` and the
LoRC adapter reach the quantizers and pruners here, never by importing their packages (each technique class
implements :meth:`~hf_memkit.compress.technique.CompressTechnique.run_pass`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import IncompatibleModelError
from .capabilities import technique_class


@dataclass
class PassReport:
    """What one quantization pass did (the ``pass`` entry of compress_report.json)."""

    quantizer: str
    spec: dict[str, Any]
    lorc: dict[str, Any] | None = None
    calibration: str = "none"
    seconds: float = 0.0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"quantizer": self.quantizer, "spec": self.spec, "lorc": self.lorc, "calibration": self.calibration,
                "seconds": round(self.seconds, 2), "layers": self.layers, "blocks": self.blocks}


def _class(name: str) -> Any:
    from .. import registry

    cls = technique_class(name)
    if cls is None:
        raise IncompatibleModelError(
            f"unknown compress technique {name!r}; use one of {', '.join(registry.names('compress'))}")
    return cls


def config_for(name: str, **fields: Any) -> Any:
    """The config of compress technique ``name`` built from ``fields`` (its defaults where a field is missing)."""
    return _class(name).config_cls(**fields)


def run_pass(name: str, model: Any, config: Any = None, *, calibration: Any = None, lorc: Any = None,
             key: str | None = None) -> Any:
    """Run ``name``'s pass on ``model`` in place (``config``: its config, defaults when None; ``lorc``: a LoRC
    compensator config, quantizers only) and return its report."""
    cls = _class(name)
    config = config if config is not None else cls.config_cls()
    return cls.run_pass(model, config, calibration=calibration, lorc=lorc, key=key or f"compress.{name}")


def check_pass(name: str, model: Any, config: Any = None, key: str | None = None) -> dict[str, Any]:
    """The Linear layers ``name``'s pass would change, checked before any weight moves (raises
    IncompatibleModelError naming the first problem)."""
    cls = _class(name)
    config = config if config is not None else cls.config_cls()
    return cls.check_targets(model, config, key or f"compress.{name}")
