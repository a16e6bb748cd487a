"""Code blocks of the docs marked ``<!-- runnable -->`` run as written."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def runnable_blocks() -> list[tuple[str, str]]:
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for i, m in enumerate(re.finditer(r"^<!-- runnable -->\n```python\n(.*?)^```", text,
                                          re.S | re.M)):
            out.append((f"{page.relative_to(DOCS)}#{i}", m.group(1)))
    return out


BLOCKS = dict(runnable_blocks())


def test_the_guides_have_runnable_blocks():
    assert {"guides/flax.md#0", "guides/flax.md#1"} <= set(BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_docs_block_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    exec(compile(BLOCKS[name], f"docs/{name}", "exec"), {"__name__": "__docs__"})
