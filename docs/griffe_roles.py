"""Griffe extension for `make docs`: Sphinx roles in docstrings become Markdown code spans.

The docstrings use reST roles (``:func:`make_summary```), which Markdown would print as
``:func:make_summary``. This turns each into a code span (`` `make_summary` ``) before
mkdocstrings renders it. Not part of the package; excluded from the site (mkdocs.yml).
"""

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]+)`")


class SphinxRolesToCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
