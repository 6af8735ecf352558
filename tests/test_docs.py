"""The documentation site builds with warnings as errors, and every public name has a reference entry."""

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import pyrovae
import pyrovae.diagnostics

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    # Looked up, not imported: a "sphinx" in sys.modules makes scipy.stats import sphinx.ext on its import.
    for name in ("sphinx", "myst_parser"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} comes with the dev extra")
    out = tmp_path_factory.mktemp("html")
    # In a process of its own: the suite turns Python warnings into errors, Sphinx's -W its own.
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"python -m sphinx -W -b html docs docs/_build/html failed:\n{done.stderr[-3000:]}"
    return out


def _inventory(out: Path) -> set:
    from sphinx.util.inventory import InventoryFile

    with open(out / "objects.inv", "rb") as f:
        data = InventoryFile.load(f, "", lambda base, uri: uri)
    entries = getattr(data, "data", data)
    return {name for role in entries.values() for name in role}


def _documented(module, name, documented: set) -> bool:
    obj = getattr(module, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{obj.__module__}.{obj.__qualname__}" in documented
    # a constant is documented in the module that defines it
    return any(entry.startswith("pyrovae.") and entry.endswith(f".{name}") for entry in documented)


@pytest.mark.parametrize("module", [pyrovae, pyrovae.diagnostics], ids=lambda m: m.__name__)
def test_every_public_name_has_a_reference_entry(built, module):
    documented = _inventory(built)
    missing = sorted(n for n in module.__all__ if not _documented(module, n, documented))
    assert not missing, f"no API entry for {missing}"


def test_the_guides_and_tutorials_are_pages(built):
    for page in ("getting-started", "theory", "iwae", "marginal-likelihood", "workflow", "architecture", "tutorials"):
        assert (built / f"{page}.html").exists(), page
