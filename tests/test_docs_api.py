"""The documentation site builds strict, and its API reference renders every public name."""

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.side  # builds the site with mkdocs (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ("optax_selective", "optax_selective.methods", "torch_bridge",
                  "selective_optimizers.wrap", "selective_optimizers.load_store")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.fail("mkdocs is missing: install the `docs` extra (make does)")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_every_public_name_is_rendered_in_the_api_reference(site):
    html = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    ids = set(re.findall(r'id="([\w.]+)"', html))
    missing = []
    for mod in PUBLIC_MODULES:
        for name in importlib.import_module(mod).__all__:
            if name.startswith("__"):
                continue
            # a re-export may be rendered under its own module's path
            if f"{mod}.{name}" not in ids and not any(i.endswith(f".{name}") for i in ids):
                missing.append(f"{mod}.{name}")
    assert not missing, f"not rendered by docs/api/*.md: {missing}"


def test_docstring_examples_render_as_code(site):
    """``>>>`` lines sit in code blocks: not Markdown text (block quotes, outputs read as links)."""
    for page in sorted((site / "api").rglob("*.html")):
        html = page.read_text()
        text = re.sub(r"<pre\b.*?</pre>|<code\b.*?</code>", "", html, flags=re.S)
        assert "&gt;&gt;&gt;" not in text and "<blockquote>" not in text, page


def test_site_has_every_nav_page(site):
    assert (site / "index.html").exists()
    for page in ("concepts", "methods/id3", "guides/flax", "benchmarks/quality", "DESIGN"):
        assert (site / page / "index.html").exists(), page
    shutil.rmtree(site)
