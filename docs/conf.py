"""Sphinx configuration: MyST for the Markdown pages, autodoc + napoleon for the API reference.

Build: ``python -m sphinx -W -b html docs docs/_build`` (CI does, warnings as errors).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import x2go_sftp  # noqa: E402

project = "x2go-sftp"
author = "x2go-sftp developers"
copyright = "2026, x2go-sftp developers"
release = x2go_sftp.__version__
version = release

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False

html_theme = "alabaster"
html_title = f"x2go-sftp {release}"
