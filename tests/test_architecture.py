"""The package's shape: no import cycles (lazy imports included), short functions, private API in one place."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyrovae"
#: longest function body allowed, in lines of code (docstring excluded)
MAX_FUNCTION_LINES = 80


def _modules():
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree) -> set:
    """pyrovae modules imported anywhere in the file, at the top or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyrovae."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pyrovae."))
    return out


def _cycle(graph):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycles_lazy_imports_included():
    modules = _modules()
    graph = {name: {m for m in _imports(tree) if m in modules and m != name} for name, tree in modules.items()}
    graph.pop("__init__")
    graph.pop("__main__", None)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_arviz_is_imported_by_diagnostics_alone():
    for name, tree in _modules().items():
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if any(m.split(".")[0] == "arviz" for m in names):
            assert name == "diagnostics", f"{name}.py imports ArviZ"


def _function_lengths():
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    body = body[1:]
                if body:
                    yield f"{path.name}:{node.name}", body[-1].end_lineno - body[0].lineno + 1


def test_functions_are_short():
    long = {name: n for name, n in _function_lengths() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines of code: {long}"


PRIVATE = ("_get_traces", "_compute_log_r", "make_fx", "proxy_tensor", "$$$")


@pytest.mark.parametrize("path", sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "_compat.py"))
def test_private_pyro_and_torch_api_lives_in_compat(path):
    text = (PACKAGE / path).read_text()
    for word in PRIVATE:
        code = [line for line in text.splitlines() if word in line and not line.strip().startswith(("#", "``", "*"))
                and "_compat." + word not in line]
        assert not [c for c in code if "\"" not in c and "'" not in c and "`" not in c], (path, word, code)
