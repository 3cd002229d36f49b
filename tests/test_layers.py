"""The code's layers point one way. common.py is the science and imports nothing of the project;
no two project modules import each other, directly or around a cycle, at module level or inside
a function (an import hidden in a function is still a dependency)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))
               + glob.glob(os.path.join(ROOT, "dev", "*.py")))
PROJECT = {os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(ROOT, "*.py"))}


def project_imports(path):
    """The project modules a file imports anywhere in it (import x, from x import y)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return found & PROJECT


def test_common_imports_nothing_of_the_project():
    assert project_imports(os.path.join(ROOT, "common.py")) == set()
    source = open(os.path.join(ROOT, "common.py")).read()
    assert "published" not in source and "make_student" not in source  # no wrapper branch


def test_no_import_cycle():
    graph = {os.path.splitext(os.path.basename(f))[0]: project_imports(f) - {os.path.basename(f)[:-3]}
             for f in FILES if os.path.dirname(f) == ROOT}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(path + [node])
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = "done"
    for module in sorted(graph):
        visit(module, [])


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The check above would be empty if function-level imports went unseen."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    import harness\n    from teacher import load_net\n")
    assert project_imports(str(f)) == {"harness", "teacher"}
