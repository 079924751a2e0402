"""``activations: [{mesa: {...}}]`` — 8-bit saved activations. The module swaps live in :mod:`.patch`, the autograd
Functions in :mod:`.functions`, the running ranges in :mod:`.quantizer`; the running ranges are the technique's
checkpoint state (so a resumed run quantizes exactly as the uninterrupted one)."""

from __future__ import annotations

from typing import Any, ClassVar

from ...errors import CheckpointError
from ...technique import PatchHandle, Technique
from .config import MesaConfig
from ...integrations.versions import TRANSFORMERS

KEY = "activations.mesa"


class MesaTechnique(Technique):
    name: ClassVar[str] = "mesa"
    slot: ClassVar[str] = "activations"
    verified_with: ClassVar[dict[str, str]] = {"transformers": TRANSFORMERS}
    config_cls = MesaConfig
    summary: ClassVar[str] = ("Mesa: tensors saved for backward kept in 8 bits (running per-group ranges, "
                              "stochastic rounding); forward exact")
    reference: ClassVar[str] = "Pan et al. 2021; ziplab/Mesa"
    patches: ClassVar[dict[str, str]] = {
        "linear.kernel": "every nn.Linear (the input saved in 8 bits while its weight trains)",
        "norm.forward": "RMSNorm and LayerNorm layers",
        "mlp.forward": "gated MLP blocks and activations",
        "attention.forward": "eager attention",
    }
    composes: ClassVar[dict[str, str]] = {
        "sparse_update": "Mesa leaves the Linears sparse update owns: their forward saves only the selected input "
                         "channels already",
    }
    conflicts: ClassVar[dict[str, str]] = {
        "wta_crs": "both replace what Linear layers save for backward; use one of them",
    }

    def __init__(self, config: MesaConfig | None = None):
        super().__init__(config)
        self._patcher = None
        self._pending: dict[str, Any] = {}

    # 2 ----------------------------------------------------------------------------------------------------------
    def estimate(self, mem: Any) -> None:
        from .estimate import mesa_activation_delta

        delta, note = mesa_activation_delta(mem, self.config)
        mem.add("activations", delta, self.name, note)

    # 3 ----------------------------------------------------------------------------------------------------------
    def patch_model(self, model: Any) -> PatchHandle:
        from .patch import MesaPatcher

        cfg = self.config
        patcher = MesaPatcher(cfg.groups, cfg.ema_decay, cfg.impl, set(cfg.cover), cfg.range == "cover")
        patcher.apply(model)
        self._patcher = patcher
        if self._pending:
            self._load(self._pending)
            self._pending = {}

        def undo():
            patcher.remove()
            self._patcher = None
            return model

        return PatchHandle(model, undo)

    def describe(self, model: Any, optimizer: Any = None) -> str:
        from collections import Counter

        kinds = Counter(self.covered.values())
        what = "; ".join(f"{n} x {k}" for k, n in kinds.most_common())
        return (f"{len(self.covered)} modules keep their saved activations in 8 bits ({what or 'none'}), "
                f"{self.config.groups} groups per range")

    @property
    def covered(self) -> dict[str, str]:
        return dict(self._patcher.covered) if self._patcher else {}

    # 7 ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": 1}
        if self._patcher is not None:
            for name, tr in sorted(self._patcher.trackers.items()):
                for k, v in tr.state().items():
                    out[f"{name}/{k}"] = v
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ...state_schema import StateReader

        r = StateReader(state, self.name)
        if r.get("format") != 1:
            raise r.error("format", state["format"], "is not a Mesa state format this version reads (1)")
        per: dict[str, dict[str, Any]] = {}
        for key in state:
            if key == "format":
                continue
            name, sep, field = key.rpartition("/")
            if not sep or field not in ("alpha", "beta"):
                raise r.error(key, state[key], "is a key the Mesa state never has (<module>/alpha or /beta)")
            # a running range: one fp32 value per quantization group, the width (alpha) never negative
            v = r.tensor(key, ndim=1, floating=True, finite=True)
            if field == "alpha" and bool((v < 0).any()):
                raise r.error(key, v, "holds a negative range width")
            per.setdefault(name, {})[field] = v
        for name, fields in per.items():
            if set(fields) != {"alpha", "beta"}:
                raise r.missing(f"{name}/{'beta' if 'alpha' in fields else 'alpha'}")
            if fields["alpha"].shape != fields["beta"].shape:
                raise r.error(f"{name}/beta", fields["beta"], f"does not match {name}/alpha "
                              f"{tuple(fields['alpha'].shape)}")
        if self._patcher is None:
            self._pending = dict(state)
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        per: dict[str, dict[str, Any]] = {}
        for key, value in state.items():
            if "/" in key:
                name, field = key.rsplit("/", 1)
                per.setdefault(name, {})[field] = value
        unknown = sorted(set(per) - set(self._patcher.trackers))
        if unknown:
            raise CheckpointError(f"{KEY}: the checkpoint has running ranges of {unknown[:3]} which this model "
                                  "does not have; resume with the model and recipe the checkpoint was written with")
        for name, fields in per.items():
            tr = self._patcher.trackers[name]
            tr.load(fields, _device_of(self._patcher, name))


def _device_of(patcher: Any, name: str) -> Any:
    for m in patcher.patched:
        w = getattr(m, "weight", None)
        if w is not None:
            return w.device
    return None
