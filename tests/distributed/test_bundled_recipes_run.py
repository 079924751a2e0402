"""The bundled distributed recipes run as shipped on 2 CPU ranks through ``memkit run`` (2 steps each)."""

from __future__ import annotations

import math

import pytest

from hf_memkit.data.recipes import recipes_dir
from tests.distributed.launch import launch, losses

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["zero2", "zero3_offload", "fsdp", "co2"])
def test_bundled_recipe_runs_on_two_ranks(name, tmp_path):
    out = tmp_path / "out"
    recipe = (recipes_dir() / f"{name}.yaml").read_text(encoding="utf-8")
    launch(tmp_path, out, recipe, steps=2)
    got = losses(out)
    assert len(got) == 2 and all(math.isfinite(x) for x in got), got
