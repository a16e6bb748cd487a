"""Griffe extensions for `make docs`: docstrings written for Sphinx and doctest, read as Markdown.

- `SphinxRolesToCode`: the docstrings use reST roles (``:func:`make_summary```), which
  Markdown would print as ``:func:make_summary``. Each becomes a code span
  (`` `make_summary` ``) before mkdocstrings renders it.
- `ExampleSections`: the docstrings head their doctests ``Example:`` (optax's spelling).
  Griffe's Google parser knows only ``Examples:`` as the examples section and renders any
  other heading as an admonition of Markdown text, where ``>>>`` lines become block quotes
  and outputs such as ``[[True], [False]]`` read as links. Renaming the heading makes the
  doctests render as Python console blocks.

Not part of the package; excluded from the site (mkdocs.yml).
"""

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")
EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class SphinxRolesToCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
