from pathlib import Path

from hf_memkit.docs import BEGIN, END, render, technique_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_technique_table_in_readme_is_current():
    text = README.read_text(encoding="utf-8")
    assert render(text) == text, "README technique table is stale: run `make readme`"
    assert BEGIN in text and END in text


def test_table_lists_every_builtin_technique():
    from hf_memkit import registry

    table = technique_table()
    for e in registry.entries():
        if e.origin == "builtin":
            assert f"`{e.name}`" in table


def test_readme_quickstart_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
