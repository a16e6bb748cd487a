"""The README's quick starts run as written, and the README stays a front page."""

import pytest

from tests._readme import README, quick_starts


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; keep it a front page"
    commands = [ln for ln in lines if ln.startswith("make ")]
    assert commands[:2] and commands[0].startswith("make demo") and commands[1].startswith("make test")


def test_readme_has_both_quick_starts_of_at_most_15_lines():
    qs = quick_starts()
    assert sorted(qs) == ["Quick start: JAX", "Quick start: PyTorch (selective-optimizers 0.4 API)"]
    for title, code in qs.items():
        assert len(code.strip().splitlines()) <= 15, title


@pytest.mark.parametrize("title", sorted(quick_starts()))
def test_readme_quick_start_runs(title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the torch quick start writes summary.pt into the cwd
    code = quick_starts()[title]
    exec(compile(code, f"README.md: {title}", "exec"), {"__name__": "__readme__"})
    if "torch" in title.lower():
        assert (tmp_path / "summary.pt").stat().st_size > 0


def test_readme_links_to_files_that_exist():
    import re

    root = README.parent
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if "://" not in t]
    assert local, "the README should link to the docs"
    missing = [t for t in local if not (root / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
