"""Sphinx configuration: the API reference from the docstrings, the Markdown pages through MyST.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (the tests run it with warnings as errors).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pyrovae"
author = "the pyrovae developers"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_mock_imports = []
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]
# Links to the projects pyrovae builds on, when their inventories are reachable; offline
# builds (CI has no internet) resolve them as plain text, which is not an error.
intersphinx_mapping = {}
suppress_warnings = ["myst.xref_missing", "misc.highlighting_failure"]
html_theme = "alabaster"
html_static_path = []
