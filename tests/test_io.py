"""Writes that fail stop cleanly: checkpoints (never a NaN state, never half a file), json, PNG
grids and the log on a full disk or without permission; bad --out and mixing priors."""
import errno
import json
import os

import pytest
import torch

import common as C
import harness as H


def one_line(e):
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


def disk_full(after=b"partial"):
    """A torch.save that writes some bytes, then finds the disk full."""
    def save(obj, f, *a, **k):
        f.write(after)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def state(step, net=None):
    net = net or torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"net": net.state_dict(), "opt": opt.state_dict(), "step": step}


# ---- checkpoints on a full disk / without permission ------------------------------------------

def test_checkpoint_disk_full_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "run" / "ckpt.pt")
    H.save_checkpoint(path, state(1))
    before = open(path, "rb").read()
    monkeypatch.setattr(torch, "save", disk_full())
    with pytest.raises(SystemExit) as e:
        H.save_checkpoint(path, state(2))
    msg = one_line(e)
    assert "No space left on device" in msg and path in msg and "free space" in msg and "--out" in msg
    assert "previous checkpoint is kept" in msg
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"] and open(path, "rb").read() == before
    monkeypatch.undo()
    assert H.load_checkpoint(path)["step"] == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_checkpoint_real_enospc_from_torch_save(tmp_path):
    """The real torch.save against a device that is always full (the temporary name pointed at
    /dev/full): torch.save given a path would raise a RuntimeError without an errno here."""
    path = str(tmp_path / "ckpt.pt")
    os.symlink("/dev/full", f"{path}.tmp{os.getpid()}")
    with pytest.raises(SystemExit) as e:
        H.save_checkpoint(path, state(3))
    assert "No space left on device" in one_line(e) and os.listdir(tmp_path) == []


def test_checkpoint_permission_denied_on_replace(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    H.save_checkpoint(path, state(1))
    before = open(path, "rb").read()

    def denied(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(SystemExit) as e:
        H.save_checkpoint(path, state(2))
    assert "Permission denied" in one_line(e)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and open(path, "rb").read() == before


def test_checkpoint_out_is_a_file(tmp_path):
    (tmp_path / "out").write_text("a file where the run folder should be")
    with pytest.raises(SystemExit) as e:
        H.save_checkpoint(str(tmp_path / "out" / "ckpt.pt"), state(1))
    assert "--out" in one_line(e)


# ---- checkpoints of a diverged state ------------------------------------------------------------

def test_nonfinite_optimiser_state_is_not_written(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    s = state(5)
    s["opt"]["state"][1]["exp_avg_sq"][0] = float("nan")
    with pytest.raises(SystemExit) as e:
        H.save_checkpoint(path, s)
    msg = one_line(e)
    assert "opt.state.1.exp_avg_sq" in msg and "step 5" in msg and "no checkpoint was written yet" in msg
    assert "lower --lr" in msg and "fresh --out" in msg and os.listdir(tmp_path) == []

    good = state(3)
    H.save_checkpoint(path, good)
    before = open(path, "rb").read()
    s["net"]["weight"][0, 0] = float("-inf")  # the first offending key, in state order
    with pytest.raises(SystemExit) as e:
        H.save_checkpoint(path, s)
    msg = one_line(e)
    assert "net.weight" in msg and f"the last checkpoint is {path} (step 3)" in msg
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_nonfinite_buffer_rows_are_caught_and_unwritten_rows_ignored(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    buf = C.MixingBuffer(8)
    buf.push(torch.randn(3, 2), torch.tensor(0.5))
    buf.x[5:] = float("nan")  # never pushed: new_empty may hold any bits, so they do not count
    H.save_checkpoint(path, {"buffers": {"teacher": buf.state_dict()}, "step": 1})
    buf.x[1, 0] = float("inf")
    with pytest.raises(SystemExit) as e:
        H.save_checkpoint(path, {"buffers": {"teacher": buf.state_dict()}, "lists": [torch.ones(2)], "step": 2})
    assert "buffers.teacher.x" in one_line(e) and "(step 1)" in str(e.value)
    assert H.nonfinite_key({"a": [torch.ones(2), (torch.zeros(1), torch.tensor([1.0, float("nan")]))]}) == "a.1.1"
    assert H.nonfinite_key({"i": torch.arange(3), "h": torch.ones(2, dtype=torch.bfloat16), "s": "x"}) is None
    assert H.nonfinite_key({"h": torch.tensor([float("inf")], dtype=torch.float16)}) == "h"
    # finite values whose sum overflows float32 are finite
    assert H.nonfinite_key({"big": torch.full((4,), 3e38)}) is None


def test_last_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    assert H.last_checkpoint(path) == "no checkpoint was written yet"
    H.save_checkpoint(path, state(200))
    with monkeypatch.context() as m:  # the step this process wrote is remembered, not read back
        m.setattr(torch, "load", None)
        assert H.last_checkpoint(path) == f"the last checkpoint is {path} (step 200)"
    monkeypatch.setattr(H, "_SAVED_STEPS", {})  # another process: read back from the file
    assert H.last_checkpoint(path) == f"the last checkpoint is {path} (step 200)"
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "unreadable" in H.last_checkpoint(str(tmp_path / "junk.pt"))


# ---- json, images, log ------------------------------------------------------------------------

def test_write_json_and_save_grid_disk_full(tmp_path, monkeypatch):
    jpath, gpath = str(tmp_path / "metrics.json"), str(tmp_path / "samples.png")
    H.write_json({"fd": 1.0}, jpath)
    H.save_grid(torch.zeros(4, 3, 32, 32), gpath)
    assert json.load(open(jpath)) == {"fd": 1.0} and open(gpath, "rb").read(4) == b"\x89PNG"
    before = {p: open(p, "rb").read() for p in (jpath, gpath)}

    def full(fd):  # the bytes were written; the disk turns out full when they are flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        H.write_json({"fd": 2.0}, jpath)
    assert "No space left on device" in one_line(e) and jpath in str(e.value)
    with pytest.raises(SystemExit) as e:
        H.save_grid(torch.ones(4, 3, 32, 32), gpath)
    assert "No space left on device" in one_line(e) and gpath in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "samples.png"]
    assert {p: open(p, "rb").read() for p in (jpath, gpath)} == before


def test_logger_resume_drops_a_cut_line_and_full_disk_is_one_line(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n{"step": 30, "lo')
    lg = H.Logger(str(tmp_path), total=40, initial=20)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [10, 20]
    lg.log(21, loss=0.4)
    assert json.loads(log.read_text().splitlines()[-1])["step"] == 21

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(SystemExit) as e:
        lg.log(22, loss=0.3)
    monkeypatch.undo()
    assert "No space left on device" in one_line(e)
    lg.close()


# ---- bad input: --out, mixing priors ------------------------------------------------------------

def test_check_out_dir(tmp_path):
    out = tmp_path / "run" / "a"
    H.check_out_dir(str(out))
    assert out.is_dir()
    H.check_out_dir(str(out))  # existing directory: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        H.check_out_dir(str(tmp_path / "file"))
    assert "is a file" in one_line(e) and str(tmp_path / "file") in str(e.value)
    with pytest.raises(SystemExit) as e:
        H.check_out_dir(str(tmp_path / "file" / "below"))  # a parent is a file: cannot be created
    assert "cannot create" in one_line(e) and "pick another --out" in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_check_betas_rejects_nonfinite(bad, which):
    betas = [0.5, 0.0, 0.5]
    betas[which] = bad
    with pytest.raises(SystemExit) as e:
        H.check_betas(*betas)
    assert "finite" in one_line(e) and "--beta-data" in str(e.value)
    assert H.check_betas(0.5, 0.0, 1.5) == (0.25, 0.0, 0.75)


def test_beta_nan_from_the_command_line_is_one_line():
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        beta_data: float = 0.5
        beta_teacher: float = 0.0
        beta_student: float = 0.5
        beta_ramp: float = 0.0
        eval_every: int = 0
        eval_every_samples: int = 100
    cfg = H.parse_config(Cfg, ["--beta-data", "nan"])
    with pytest.raises(SystemExit) as e:
        H.check_ddil(cfg)
    assert "nan" in one_line(e)


# ---- the scripts: a diverging run and a bad --out, end to end ---------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name,extra", [
    ("lcm_ddil.py", ["--iters", "8", "--refresh-every", "1"]),
    ("pd_ddil.py", ["--teacher-steps", "4", "--steps", "2", "--iters-per-stage", "8"]),
    ("dmd2_ddil.py", ["--iters", "8", "--steps", "2", "--fake-updates", "1", "--teacher-substeps", "2"]),
])
def test_a_diverging_run_never_checkpoints_a_nan(name, extra, tiny_teacher, tmp_path):
    """--lr 1e6: the weights blow up. Whether the checkpoint at step 5 or the loss check at step 7
    catches it first, the run stops with one line naming the last checkpoint, and every
    checkpoint on disk is finite (a rerun resumes from a good state)."""
    out = tmp_path / "run"
    r = script(name, "--teacher", tiny_teacher, "--out", str(out), "--lr", "1e6", "--ckpt-every", "5",
               "--log-every", "7", "--batch-size", "8", "--buffer-size", "16", "--refresh", "2",
               "--eval-samples", "8", "--ref-samples", "0", *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert "NaN" in lines[0] or "nan" in lines[0] or "inf" in lines[0]
    assert "no checkpoint was written yet" in lines[0] or "the last checkpoint is" in lines[0]
    if (out / "ckpt.pt").exists():
        assert H.nonfinite_key(torch.load(out / "ckpt.pt", weights_only=True)) is None
        assert "(step " in lines[0]
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_out_naming_a_file_stops_before_any_work(tmp_path):
    f = tmp_path / "taken"
    f.write_text("not a directory")
    r = script("lcm_ddil.py", "--out", str(f), "--teacher", str(tmp_path / "none.pt"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "is a file" in lines[0], r.stderr
