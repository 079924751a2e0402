"""MIXLORA and LORC as PEFT types: the enum extension against the installed PEFT, the import hook, stepping aside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import hf_memkit
from hf_memkit.integrations import peft_types

ROOT = Path(__file__).resolve().parents[2]


def test_types_are_peft_members_and_registered():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    assert peft_types.ensure_registered() == {"MIXLORA": "registered", "LORC": "registered"}
    for name, prefix in (("MIXLORA", "mixlora_"), ("LORC", "lorc_")):
        member = PeftType[name]
        assert PeftType(name) is member and getattr(PeftType, name) is member and member in list(PeftType)
        assert member == name and isinstance(member, str)
        assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == prefix
        assert PEFT_TYPE_TO_CONFIG_MAPPING[name] is PEFT_TYPE_TO_CONFIG_MAPPING[member]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MIXLORA] is hf_memkit.MixLoraConfig
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORC] is hf_memkit.LorcConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MIXLORA].__name__ == "MixLoraModel"
    # idempotent
    assert peft_types.ensure_registered() == {"MIXLORA": "registered", "LORC": "registered"}
    assert list(PeftType).count(PeftType.MIXLORA) == 1


def test_import_hf_memkit_stays_light_and_registers_when_peft_is_imported():
    code = ("import sys, hf_memkit; print(sorted(m for m in ('torch', 'peft') if m in sys.modules)); "
            "import peft; from peft.utils.peft_types import PeftType; "
            "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as M; "
            "print(PeftType.MIXLORA in M, PeftType.LORC in M)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "True True"]


def test_steps_aside_when_peft_has_the_type(monkeypatch):
    from peft.utils.peft_types import PeftType

    monkeypatch.setattr(peft_types, "STATUS", {})
    monkeypatch.setattr(peft_types, "ADDED_MEMBERS", set())  # as if PEFT itself had defined both members
    status = peft_types.ensure_registered()
    assert status == {"MIXLORA": "peft", "LORC": "peft"}
    with pytest.raises(hf_memkit.IncompatibleModelError, match="ships its own MIXLORA"):
        peft_types.require("MIXLORA")
    assert PeftType.MIXLORA.name == "MIXLORA"  # the enum was left alone
