"""compressed-tensors ``pack-quantized`` checkpoints: the one place hf_memkit touches compressed-tensors.

A quantized Linear ``name`` is stored as ``name.weight_packed`` (int32 ``[out, ceil(in·bits/32)]``, the signed
codes ``q − 2^(bits−1)`` packed densely by ``compressed_tensors``' own ``pack_to_int32``), ``name.weight_scale``
(``[out, groups]``, model dtype), ``name.weight_zero_point`` (asymmetric only: signed zero points packed along the
output dimension) and ``name.weight_shape``. ``config.json`` gets ``quantization_config`` with one config group
per distinct grid. The codes are packed as they are (never re-derived from the float weight) and every layer is
decompressed again with compressed-tensors' own decompressor and compared bit for bit before anything is written.

Known issue worked around (compressed-tensors 0.20.0 + transformers 5.24): on load, transformers builds the
compressed modules on the meta device, where ``PackedQuantizationCompressor.compress`` returns before packing
asymmetric zero points, so the model expects ``[out, groups]`` zero points and the checkpoint's packed ones fail
with a size mismatch. Checkpoints with asymmetric groups therefore set ``"dequantize": true`` in their
``quantization_config``, which makes transformers decompress each tensor while loading (a path that handles
packed zero points); symmetric checkpoints load through the default path. That decompress-on-load path applies
one scheme to every dense layer, so an asymmetric checkpoint must have a single grid: a model whose layers end
up with different grids (layers narrower than ``group_size`` fall back to per-channel) is refused with the fix
(symmetric, or a group size no wider than the narrowest layer) before any work, by :func:`check_loadable`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

from ..atomic import write_json
from ..errors import IncompatibleModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..compress.grid import QuantizedWeight, QuantSpec

logger = logging.getLogger("hf_memkit")

CT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
#: the module tensors a quantized layer has in memory and not in the checkpoint
_MEMORY_ONLY = ("weight", "weight_codes", "weight_scale", "weight_zero_point")


def _ct():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise IncompatibleModelError(
            "export format compressed-tensors needs the compressed-tensors package: pip install compressed-tensors"
        ) from exc
    return pack_to_int32, unpack_from_int32


def _signed(codes: "torch.Tensor", bits: int) -> "torch.Tensor":
    import torch

    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def pack_codes(codes: "torch.Tensor", bits: int, packed_dim: int = 1) -> "torch.Tensor":
    """Unsigned codes (uint8, ``[0, 2^bits − 1]``) -> compressed-tensors' packed int32 layout."""
    pack_to_int32, _ = _ct()
    return pack_to_int32(_signed(codes, bits).contiguous(), bits, packed_dim=packed_dim)


def unpack_codes(packed: "torch.Tensor", bits: int, shape: tuple[int, int], packed_dim: int = 1) -> "torch.Tensor":
    """The inverse of :func:`pack_codes` (unsigned uint8 codes)."""
    import torch

    _, unpack_from_int32 = _ct()
    if packed_dim == 0:
        # unpack along dim 1 of the transpose ourselves: compressed-tensors' own transpose of a one-word-high
        # tensor keeps a stride its 4-bit fast path cannot view as bytes
        t = packed.t().clone(memory_format=torch.contiguous_format)
        signed = unpack_from_int32(t, bits, torch.Size(shape[::-1]), packed_dim=1).t()
    else:
        signed = unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=packed_dim)
    return (signed.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def module_tensors(qw: "QuantizedWeight") -> dict[str, "torch.Tensor"]:
    """The checkpoint tensors of one quantized Linear (local names)."""
    import torch

    bits = qw.spec.bits
    out = {
        "weight_packed": pack_codes(qw.codes, bits),
        "weight_scale": qw.scale.detach().contiguous(),
        "weight_shape": torch.tensor(list(qw.codes.shape), dtype=torch.int64),
    }
    if not qw.spec.symmetric:
        out["weight_zero_point"] = pack_codes(qw.zero, bits, packed_dim=0)
    elif not bool((qw.zero == (1 << (bits - 1))).all()):
        raise IncompatibleModelError("a symmetric grid must have its zero point at 2^(bits-1); the codes are corrupt")
    return {k: v.cpu().contiguous() for k, v in out.items()}


def weights_args(spec: "QuantSpec") -> dict[str, Any]:
    args: dict[str, Any] = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "dynamic": False}
    if spec.group_size is None:
        args.update(strategy="channel", group_size=None)
    else:
        args.update(strategy="group", group_size=spec.group_size)
    return args


def _scheme(spec: "QuantSpec", targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=targets, weights=QuantizationArgs(**weights_args(spec)),
                              format="pack-quantized")


def check_loadable(specs: set["QuantSpec"], key: str) -> None:
    """Refuse grids that plain transformers 5.x + compressed-tensors 0.20 cannot load (see the module docstring)."""
    if len(specs) > 1 and any(not s.symmetric for s in specs):
        raise IncompatibleModelError(
            f"{key}: the quantized layers would get {len(specs)} different grids "
            f"({', '.join(sorted(s.describe() for s in specs))}: layers narrower than group_size are quantized per "
            "channel), and an asymmetric compressed-tensors checkpoint with several grids does not load in "
            "transformers (its decompress-on-load path applies one scheme to every layer). Use symmetric: true, or "
            "a group_size no larger than the narrowest quantized layer's input width, or export format: safetensors"
        )


def quantization_config(groups: dict["QuantSpec", list[str]], unquantized_linears: list[str]) -> dict[str, Any]:
    """``config.json["quantization_config"]``: one config group per grid. With a single grid it targets
    ``Linear`` and ignores the full-precision Linear layers (the form vLLM and llm-compressor write); with several,
    each group lists its layers by exact-name regex."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    single = len(groups) == 1
    config_groups = {}
    for i, (spec, names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].describe())):
        targets = ["Linear"] if single else [f"re:^{n.replace('.', '[.]')}$" for n in names]
        config_groups[f"group_{i}"] = _scheme(spec, targets)
    qc = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                            ignore=sorted(unquantized_linears) if single else [])
    data = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
            **qc.model_dump(mode="json", exclude={"quant_method"})}
    if any(not spec.symmetric for spec in groups):
        data["dequantize"] = True  # see the module docstring: asymmetric zero points need the decompress-on-load path
    return data


def verify_module(tensors: dict[str, "torch.Tensor"], qw: "QuantizedWeight") -> None:
    """Decompress with compressed-tensors itself and require the exact weight hf_memkit computes in memory."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    state = dict(tensors)
    got = PackedQuantizationCompressor.decompress(state, _scheme(qw.spec, ["Linear"]))["weight"]
    want = qw.dequantize().cpu()
    if got.dtype != want.dtype or not torch.equal(got, want):
        raise IncompatibleModelError(
            "compressed-tensors decompresses this layer to different values than hf_memkit computes "
            f"(max |diff| {float((got.float() - want.float()).abs().max()):.3g}); the installed compressed-tensors "
            "changed its format: pin compressed-tensors==0.20.*"
        )


def checkpoint_state_dict(model: Any, quantized: list[tuple[str, Any, "QuantizedWeight"]], *,
                          verify: bool = True) -> tuple[dict[str, "torch.Tensor"], dict["QuantSpec", list[str]]]:
    """The model's state dict with each quantized Linear's tensors replaced by the packed ones."""
    state = model.state_dict()
    groups: dict[Any, list[str]] = {}
    for name, _module, qw in quantized:
        for local in _MEMORY_ONLY:
            state.pop(f"{name}.{local}", None)
        tensors = module_tensors(qw)
        if verify:
            verify_module(tensors, qw)
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        groups.setdefault(qw.spec, []).append(name)
    return state, groups


def write_checkpoint(model: Any, out_dir: str, *, verify: bool = True) -> dict[str, Any]:
    """Write ``model`` (with hf_memkit-quantized Linear layers) as a compressed-tensors ``pack-quantized``
    folder that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads. Returns what was written."""
    import torch

    from ..compress.linear import quantized_modules

    quantized = quantized_modules(model)
    if not quantized:
        raise IncompatibleModelError(
            "export format compressed-tensors needs a quantized model, and no layer is quantized; add a quantizer "
            "to the recipe (compress: [{rtn: {}}], gptq, block_ap or e2e_qp), or export with format: safetensors"
        )
    names = {n for n, _, _ in quantized}
    unquantized = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in names]
    check_loadable({qw.spec for _n, _m, qw in quantized}, "export")
    state, groups = checkpoint_state_dict(model, quantized, verify=verify)
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    qconfig = quantization_config(groups, unquantized)
    path = os.path.join(out_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"] = qconfig
    write_json(path, config, indent=2, sort_keys=True)  # atomic: never a 0-byte or half-edited config.json
    logger.info("hf_memkit: wrote a compressed-tensors pack-quantized checkpoint (%d layers, %s) to %s",
                len(quantized), ", ".join(s.describe() for s in groups), out_dir)
    return {"quantized_layers": sorted(names), "groups": {s.describe(): len(v) for s, v in groups.items()},
            "quantization_config": qconfig}


def quantized_bytes_on_disk(folder: str, prefixes: list[str]) -> int:
    """Bytes the tensors of the given modules take inside the folder's safetensors files."""
    from safetensors import safe_open

    total = 0
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(folder, fname), framework="pt") as f:
            for key in f.keys():
                module, _, local = key.rpartition(".")
                if module in prefixes and local in CT_TENSORS:
                    sl = f.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * _dtype_bytes(sl.get_dtype())
    return total


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1}.get(dtype, 4)
