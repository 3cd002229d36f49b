"""Whatever a run needs at its end is checked before its first iteration: the FID network beyond
digits, a published teacher's dependencies, room in --out. Each failure is one line that names
the fix, and no checkpoint is written (a run must not learn this after days of training)."""
import os
import shutil

import pytest

import dmd2_ddil
import evaluate as E
import harness as H
import lcm_ddil
import pd_ddil
from test_data import write_cifar10

SCRIPTS = [pd_ddil, lcm_ddil, dmd2_ddil]
TINY = ["--batch-size", "4", "--eval-samples", "4", "--shift-samples", "4", "--ref-samples", "0",
        "--iters", "1"]


def refused(mod, argv):
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("mod", SCRIPTS, ids=lambda m: m.__name__)
def test_a_missing_fid_network_stops_before_training(tmp_path, mod, monkeypatch):
    """cifar10: the Inception weights cannot be loaded (here: a wrong --inception-weights)."""
    write_cifar10(tmp_path / "data")
    called = []
    monkeypatch.setattr(E, "inception_extractor", lambda device="cpu", weights="", batch=250: (
        called.append(weights), H.fail("could not load the Inception FID weights; pass "
                                       "--inception-weights PATH"))[1])
    out = tmp_path / "run"
    msg = refused(mod, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out",
                        str(out), "--inception-weights", "/nowhere.pth", *TINY])
    assert "--inception-weights" in msg and called == ["/nowhere.pth"]  # the flag reaches it
    assert not (out / "ckpt.pt").exists()


def test_digits_needs_no_fid_network(monkeypatch):
    monkeypatch.setattr(E, "inception_extractor", lambda *a, **k: pytest.fail("not needed"))
    E.check_feature_extractor("digits")


@pytest.mark.parametrize("mod", SCRIPTS, ids=lambda m: m.__name__)
def test_a_published_teachers_missing_dependency_stops_before_training(tmp_path, mod):
    msg = refused(mod, ["--teacher", "edm-pkl:/data/edm.pkl", "--out", str(tmp_path / "r"), *TINY])
    assert "--edm-repo" in msg and not (tmp_path / "r" / "ckpt.pt").exists()


@pytest.mark.parametrize("mod", SCRIPTS, ids=lambda m: m.__name__)
def test_too_little_room_in_out_stops_before_training(tmp_path, mod, monkeypatch, tiny_teacher):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    msg = refused(mod, ["--teacher", tiny_teacher, "--out", str(tmp_path / "r"), *TINY])
    assert "GiB free" in msg and "pick another --out" in msg
    assert not os.path.exists(tmp_path / "r" / "ckpt.pt")


def test_a_missing_large_teacher_is_an_error_not_a_silent_run(tmp_path, monkeypatch):
    """Beyond digits, no default teacher: one line with both commands, no multi-day run."""
    import teacher
    monkeypatch.chdir(tmp_path)  # no runs/teacher-cifar10 here
    monkeypatch.setattr(teacher, "main", lambda argv: pytest.fail("trained a cifar10 teacher"))
    with pytest.raises(SystemExit) as e:
        teacher.load_teacher("", "cifar10", data_dir="/data/c10")
    msg = str(e.value)
    assert "teacher.py --dataset cifar10" in msg and "--data-dir /data/c10" in msg
    assert "--teacher diffusers:" in msg and "\n" not in msg


def test_a_teacher_trained_on_demand_gets_the_data_and_device_flags(tmp_path, monkeypatch):
    import teacher
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(teacher, "main", lambda argv: (seen.append(argv), H.fail("stop"))[1])
    with pytest.raises(SystemExit):
        teacher.load_teacher("", "mnist", device="cpu", data_dir="/data/m")
    argv = seen[0]
    assert argv[argv.index("--data-dir") + 1] == "/data/m" and argv[argv.index("--device") + 1] == "cpu"


def test_under_torchrun_a_teacher_trained_on_demand_gets_each_ranks_gpu(tmp_path, monkeypatch):
    """Passing rank 1's resolved cuda:1 would put every rank of the teacher's run on one GPU:
    the device type goes through, and init_dist gives each rank its own."""
    import torch

    import teacher
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    seen = []
    monkeypatch.setattr(teacher, "main", lambda argv: (seen.append(argv), H.fail("stop"))[1])
    with pytest.raises(SystemExit):
        teacher.load_teacher("", "mnist", device=torch.device("cuda:1"))
    assert seen[0][seen[0].index("--device") + 1] == "cuda"
