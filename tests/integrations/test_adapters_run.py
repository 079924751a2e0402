"""The MixLoRA and LoRC adapters through ``python -m hf_memkit.run`` on the stock run_clm look-alike: the run
finishes and leaves a PEFT adapter of the new type that PeftModel can load."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.integrations.test_launcher import STOCK, explain, run, script_args

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {
    "mixlora": "memkit: 1\nadapter: {mixlora: {num_experts: 4, top_k: 2, r: 4}}\n",
    "lorc": "memkit: 1\nadapter: {lorc: {bits: 4, group_size: 32, rank: 4}}\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_adapter_recipe_through_the_launcher(name, tmp_path, monkeypatch):
    from hf_memkit.data.corpus import topics
    from hf_memkit.data.models import tiny_dir

    (tmp_path / "train.txt").write_text("\n".join(topics().values())[:20_000], encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text(RECIPES[name], encoding="utf-8")
    out = tmp_path / "out"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = run([sys.executable, "-m", "hf_memkit.run", str(STOCK), "--memkit_recipe", str(tmp_path / "recipe.yaml"),
                *script_args(tiny_dir(), tmp_path / "train.txt", out)], cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == name.upper()
    assert (out / "adapter_model.safetensors").is_file()
