"""The runnable blocks (marked ``<!-- runnable -->``) of the torch migration and
torch.compile guides run as written."""

import os
import re
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

GUIDES = Path(__file__).resolve().parents[1] / "docs" / "guides"
PAGES = ("migration.md", "torch-compile.md")


def blocks(page):
    text = (GUIDES / page).read_text()
    return re.findall(r"^<!-- runnable -->\n```python\n(.*?)^```", text, re.S | re.M)


@pytest.mark.parametrize("page", PAGES)
def test_guide_blocks_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # blocks that save files write them here
    code = blocks(page)
    assert code, f"{page} has no runnable block"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the guides pass weight_decay explicitly
        for i, block in enumerate(code):
            exec(compile(block, f"docs/guides/{page}#{i}", "exec"), {"__name__": "__docs__"})
    if page == "migration.md":  # the lines its comment says 0.4 printed
        assert capsys.readouterr().out.splitlines() == [
            "Budget allocated: 40, budget used: 40",
            "Verification successful: Non-chosen parameters have not changed.",
        ]
