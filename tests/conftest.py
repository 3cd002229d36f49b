"""Shared fixtures. Every test runs on CPU; the repository root is importable."""
import os
import sys

import pytest

# Tests use small tensors, and some start two torchrun ranks on a 2-core machine: one intra-op
# thread per process avoids oversubscription (set before torch is imported, inherited by children).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A digits teacher trained for a few iterations: a real checkpoint, in seconds."""
    import teacher
    out = tmp_path_factory.mktemp("teacher")
    teacher.main(["--iters", "20", "--out", str(out), "--log-every", "10", "--sample-steps", "4",
                  "--seed", "0"])
    return str(out / "ckpt.pt")
