import os
import sys

project = "dask-secure-cloud"
author = "dask-secure-cloud developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_numpy_docstring = True
html_theme = "alabaster"
exclude_patterns = ["_build"]
nitpicky = False

sys.path.insert(0, os.path.dirname(__file__))
from reference import write_references  # noqa: E402


def setup(app):
    # The configuration reference comes from the schema, the CLI reference from click:
    # neither can fall behind the code.
    app.connect("builder-inited", lambda app: write_references(app.srcdir))
