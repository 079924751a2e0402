"""End to end: AST/CAST training runs end in an exact 2:4 export that plain transformers loads; `memkit compress`
runs the pruning recipes."""
import json

import pytest
import torch

from hf_memkit import MemkitTrainer
from hf_memkit.prune.masks import nm_counts
from tests.conftest import make_args
from tests.prune.test_structured_and_export import _fresh_logits, _ours


@pytest.mark.parametrize("name,cfg", [("ast", {"slorb": True, "slorb_k": 16}), ("cast", {})])
def test_sparse_training_exports_exact_24(name, cfg, tiny_model, tiny_dataset, tmp_path):
    recipe = {"optimizer": {name: {"mask_interval": 1, **cfg}}, "export": {"format": "compressed-tensors"}}
    trainer = MemkitTrainer(model=tiny_model, args=make_args(tmp_path, max_steps=3, learning_rate=1e-3),
                            train_dataset=tiny_dataset, recipe=recipe)
    trainer.train()
    model = trainer.model
    for n, m in model.named_modules():
        if type(m) is torch.nn.Linear and n != "lm_head":
            assert (nm_counts(m.memkit_sparsity_mask) == 2).all() and (nm_counts(m.weight) <= 2).all(), n
    out = tmp_path / "export"
    assert json.load(open(out / "config.json"))["quantization_config"]["sparsity_config"]["sparsity_structure"] == "2:4"
    logits, _ = _fresh_logits(out, tmp_path)
    if name == "ast":  # the SLoRB branch is the PEFT adapter beside the base
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base_logits = logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "lorc_adapter")
        torch.testing.assert_close(_ours(peft), _ours(model), atol=1e-5, rtol=0)
        assert not torch.allclose(base_logits, _ours(model))
    else:
        torch.testing.assert_close(logits, _ours(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pruner", ["wanda_24", "comp"])
def test_memkit_compress_runs_pruning(pruner, tmp_path):
    import yaml

    from hf_memkit.cli import main

    cfg = {"num_samples": 4, "seq_len": 32} | ({"ratio": 0.6} if pruner == "comp" else {})
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"memkit": 1, "compress": [{pruner: cfg}]}))
    rc = main(["compress", "tiny", "--recipe", str(r), "-o", str(tmp_path / "out")])
    assert rc in (0, None)
    saved = json.load(open(tmp_path / "out" / "config.json"))
    if pruner == "comp":
        assert saved["num_hidden_layers"] == 1 and "quantization_config" not in saved
    else:
        assert saved["quantization_config"]["sparsity_config"]["sparsity_structure"] == "2:4"
    _fresh_logits(tmp_path / "out", tmp_path)
