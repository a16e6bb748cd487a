"""Code blocks of the docs marked ``<!-- runnable -->`` run as written."""

import os
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("optax_selective", "torch_bridge", "selective_optimizers", "examples")


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(BLOCKS[name], f"docs/{name}", "exec"), {"__name__": "__docs__"})
    # The docs show warning-free code: no warning raised at the block's own lines (what the
    # library warns a user about points there) nor from this project's packages.
    ours = [w for w in caught if w.filename.startswith("docs/") or any(
        f"{os.sep}{pkg}{os.sep}" in w.filename and w.filename.startswith(str(ROOT))
        for pkg in PACKAGES)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in ours]
