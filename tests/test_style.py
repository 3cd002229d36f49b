"""Line length of the shared science, the teacher and the three methods: at most 100 characters,
so a reader can put a method file next to common.py on one screen."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("common.py", "pd_ddil.py", "lcm_ddil.py", "dmd2_ddil.py", "teacher.py")
MAX_LINE = 100


def long_lines(path, limit=MAX_LINE):
    """'file:line (n chars)' for every line of path longer than limit characters."""
    with open(path, encoding="utf-8") as f:
        return [f"{os.path.relpath(path, ROOT)}:{i} ({len(line)} chars)"
                for i, line in enumerate(f.read().splitlines(), 1) if len(line) > limit]


def test_lines_within_100_characters():
    over = [hit for name in FILES for hit in long_lines(os.path.join(ROOT, name))]
    assert not over, (f"{len(over)} line(s) over {MAX_LINE} characters (wrap at argument "
                      f"boundaries, split comments at word boundaries):\n" + "\n".join(over))


def test_long_lines_are_named(tmp_path):
    """The check names file and line of a long line, and passes a line of exactly the limit."""
    path = tmp_path / "f.py"
    path.write_text("x = 1\n" + "#" * MAX_LINE + "\n" + "y" * (MAX_LINE + 1) + "\n")
    hits = long_lines(str(path))
    assert len(hits) == 1 and hits[0].endswith("f.py:3 (101 chars)"), hits


def test_the_readme_snippet_is_lcm_ddils_code():
    """README's DDIL statement is copied from lcm_ddil.py's loop: each of its lines (less a
    trailing comment) occurs there, so the snippet cannot drift from the code."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    code = open(os.path.join(ROOT, "lcm_ddil.py")).read()
    lines = [ln.split("  # ")[0].strip() for ln in snippet.splitlines() if ln.strip()]
    assert len(lines) >= 9 and "def student_source(n):" in lines
    assert [ln for ln in lines if ln not in code] == []
