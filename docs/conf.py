"""Sphinx configuration: MyST pages, API pages generated from ``__all__``.

Sphinx with MyST, as optax and Flax do: autodoc reads the Google-style
docstrings (napoleon) that the package already has, and its cross-references
check every link. Built offline with warnings as errors:
``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "multirate_optax"
author = "the multirate_optax authors"
copyright = "2026, the multirate_optax authors"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "generated_pages",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
# Attributes as fields of their class: autodoc documents the members once.
napoleon_use_ivar = True
html_theme = "furo"
html_title = "multirate_optax"
