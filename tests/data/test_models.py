

def test_the_16bit_copy_of_smollm2_is_built_in_a_child_and_loads_without_conversion(tmp_path, monkeypatch):
    """Stand-in: the tiny model plays SmolLM2's fp32 folder. The 16-bit folder is written once (by a child
    process, so the fp32 pages never count towards this process's peak) and holds the rounded weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_memkit.data import models

    monkeypatch.setattr(models, "smollm2_dir", models.tiny_dir)
    monkeypatch.setenv("HF_MEMKIT_CACHE", str(tmp_path))
    model, _ = models.load_model_and_tokenizer("smollm2", dtype="bfloat16")
    folder = tmp_path / "smollm2-135m-instruct-bfloat16"
    assert (folder / "config.json").is_file() and not list(tmp_path.glob("*.tmp-*"))
    reference = AutoModelForCausalLM.from_pretrained(models.tiny_dir())
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, q.to(torch.bfloat16)), name
    again, _ = models.load_model_and_tokenizer("smollm2", dtype="bfloat16")  # reused, not rebuilt
    assert next(again.parameters()).dtype == torch.bfloat16
