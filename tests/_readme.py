"""The README's quick starts, as code: the README test and the wheel test both run them."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_starts(readme: Path = README) -> dict[str, str]:
    """``{section title: code}`` for every ``## Quick start...`` section's python block."""
    text = readme.read_text()
    out = {}
    for m in re.finditer(r"^## (Quick start[^\n]*)\n(.*?)(?=^## )", text, re.S | re.M):
        blocks = re.findall(r"^```python\n(.*?)^```", m.group(2), re.S | re.M)
        assert len(blocks) == 1, f"{m.group(1)!r} should hold exactly one python block"
        out[m.group(1)] = blocks[0]
    return out
