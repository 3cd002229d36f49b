"""Print docs/flags.md, every script's flags from its Config dataclass (help, default, choices):

    python dev/flags.py > docs/flags.md

tests/test_flags.py checks that the committed docs/flags.md is this output.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCRIPTS = ("teacher", "pd_ddil", "lcm_ddil", "dmd2_ddil", "evaluate")  # in the document's order


def flags_markdown():
    """docs/flags.md's text, exactly (it ends with a newline)."""
    import importlib

    import harness as H
    return H.flags_markdown({f"{name}.py": importlib.import_module(name).Config
                             for name in SCRIPTS})


if __name__ == "__main__":
    sys.stdout.write(flags_markdown())
