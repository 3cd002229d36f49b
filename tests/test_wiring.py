"""The DDIL loops' wiring in all three methods: which network makes each source's states, on
which grid, at which labels, guidance and bound, with which expert, and (PD) which teacher each
stage distils. A loop can pass every unit test of its rollout functions and still hand them the
wrong arguments, so spies replace the module-level functions, record each call's arguments by
name (and which source function made it: the caller, teacher_source or student_source) and call
the real function; main() runs a few iterations with all three sources on."""
import inspect
import json
import sys

import pytest
import torch

import common as C
import dmd2_ddil as D
import harness as H
import lcm_ddil as L
import pd_ddil as P

SOURCES = ("teacher_source", "student_source")


def spy(monkeypatch, module, name, calls, before=None, after=None):
    """Replace module.name by a wrapper that appends {argument: value, "caller": the calling
    function's name, "result": the return value} to calls and calls the real function; before /
    after(call) run around it (weights snapshots)."""
    real = getattr(module, name)
    sig = inspect.signature(real)

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments, caller=sys._getframe(1).f_code.co_name)
        calls.append(call)
        if before:
            before(call)
        call["result"] = real(*args, **kwargs)
        if after:
            after(call)
        return call["result"]
    monkeypatch.setattr(module, name, wrapper)


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(module, request, tmp_path, cond, *extra):
    """main() on the tiny (conditional) teacher with every DDIL source on, rollouts DAgger-mixed,
    bound and sample bound different; returns the checkpoint (its "config": the run's flags)."""
    teacher = request.getfixturevalue("tiny_cond_teacher" if cond else "tiny_teacher")
    module.main(["--teacher", teacher, "--out", str(tmp_path), "--beta-data", "1",
                 "--beta-teacher", "1", "--beta-student", "1", "--rollout-teacher-p", "0.5",
                 "--bound", "reflect", "--sample-bound", "clip", "--batch-size", "6",
                 "--buffer-size", "16", "--refresh", "2", "--eval-samples", "4",
                 "--shift-samples", "4", "--ref-samples", "0", "--reference-steps", "2",
                 "--log-every", "1", "--seed", "1", *(["--cond"] if cond else []), *extra])
    ck = H.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert json.loads((tmp_path / "config.json").read_text())["bound"] == ck["config"]["bound"]
    assert ck["config"]["bound"] != ck["config"]["sample_bound"]  # so a mix-up shows
    return ck


def check_labels(y, n, nc):
    """A conditional teacher's rollouts carry n uniform labels in [0, nc); otherwise none."""
    if nc:
        assert torch.is_tensor(y) and y.shape == (n,) and y.dtype == torch.long
        assert 0 <= int(y.min()) and int(y.max()) < nc
    else:
        assert y is None


def spy_nets(monkeypatch, module):
    """Spies on the module's load_teacher and make_student: the loaded teacher and the student
    are then known by identity."""
    nets = {"load_teacher": [], "make_student": []}
    for name, calls in nets.items():
        spy(monkeypatch, module, name, calls)
    return nets


def the_nets(nets):
    assert len(nets["load_teacher"]) == 1 and len(nets["make_student"]) == 1
    return nets["load_teacher"][0]["result"], nets["make_student"][0]["result"]


def check_callers(calls):
    """Both sources made states, and the rollout functions were called by nothing else."""
    assert {c["caller"] for c in calls} == set(SOURCES), [c["caller"] for c in calls]


# ---- PD ---------------------------------------------------------------------------------------

def pd_bound(cfg, caller):
    """The bound each PD source's rollouts must use (one line to change per source): the
    samplers' own, --sample-bound."""
    return {"teacher_source": cfg["sample_bound"], "student_source": cfg["sample_bound"]}[caller]


@pytest.mark.parametrize("cond", [False, True], ids=["unguided", "guided"])
def test_pd_wiring(request, tmp_path, monkeypatch, cond):
    """Per stage: the teacher source runs the stage teacher's 2N-step sampler (sub 2) at the
    stage's guidance; the student source the trained student's N steps (sub 1, w 0) with the stage
    teacher as its expert at that guidance; stage 0 distils the loaded teacher and stage 1 a frozen
    copy of the student as stage 0 left it."""
    nets, events = spy_nets(monkeypatch, P), []  # rollouts and steps in the order they ran

    def before(call):  # the teacher's weights as this step sees them
        call["teacher_sd"] = snapshot(call["teacher"])

    def after(call):  # the student's weights once this step is done
        call["student_sd"] = snapshot(call["student"])
    spy(monkeypatch, P, "rollout_states", events)
    spy(monkeypatch, P, "train_step", events, before, after)
    extra = ["--guidance", "2"] if cond else []
    ck = run(P, request, tmp_path, cond, "--teacher-steps", "8", "--steps", "2",
             "--iters-per-stage", "2", "--stage-eval-samples", "4", *extra)
    cfg = ck["config"]
    teacher0, student = the_nets(nets)
    steps = [e for e in events if "x_t" in e]
    nc, ips = teacher0.num_classes, cfg["iters_per_stage"]
    assert (nc > 0) == cond
    stages = P.stage_steps(cfg["teacher_steps"], cfg["steps"])
    assert stages == [4, 2] and len(steps) == ips * len(stages)
    w_guide = cfg["guidance"] if nc else 0.0
    assert w_guide == (2.0 if cond else 0.0)

    stage_teacher = []
    for s in range(len(stages)):
        calls = steps[s * ips:(s + 1) * ips]
        teacher = calls[0]["teacher"]
        stage_teacher.append(teacher)
        w = w_guide if s == 0 else 0.0
        for c in calls:
            assert c["teacher"] is teacher and c["student"] is student
            assert C.unwrap(c["net"]) is student and c["N"] == stages[s] and c["w"] == w
            check_labels(c["y"], len(c["x_t"]), nc)
            assert same_weights(c["teacher_sd"], calls[0]["teacher_sd"])  # frozen in its stage
    assert stage_teacher[0] is teacher0
    # stage 1 distils the student as stage 0 left it: a frozen copy, not the loaded teacher
    assert stage_teacher[1] is not student and stage_teacher[1] is not teacher0
    assert same_weights(steps[ips]["teacher_sd"], steps[ips - 1]["student_sd"])
    assert not same_weights(steps[ips]["teacher_sd"], snapshot(teacher0))
    assert same_weights(ck["net"], snapshot(student))  # the student trained is the one saved

    check_callers([e for e in events if "x1" in e])
    stage, seen, k = None, set(), len(steps)
    for e in reversed(events):  # each rollout feeds the train_step that follows it
        if "x_t" in e:
            k -= 1
            stage = k // ips
            continue
        assert stage is not None, "a rollout after the last train_step"
        seen.add((stage, e["caller"]))
        teacher, w = stage_teacher[stage], (w_guide if stage == 0 else 0.0)
        assert e["N"] == stages[stage] and e["bound"] == pd_bound(cfg, e["caller"])
        check_labels(e["y"], len(e["x1"]), nc)
        if e["caller"] == "teacher_source":
            assert e["net"] is teacher and e["sub"] == 2 and e["w"] == w
            assert e["expert"] is None and e["p"] == 0.0
        else:
            assert e["net"] is student and e["sub"] == 1 and e["w"] == 0.0
            assert e["expert"] is teacher and e["expert_w"] == w
            assert e["p"] == cfg["rollout_teacher_p"] > 0
    assert seen == {(s, src) for s in range(len(stages)) for src in SOURCES}


# ---- LCM --------------------------------------------------------------------------------------

def lcm_bound(cfg, caller):
    """The bound each LCM source's rollouts must use (one line to change per source): the
    samplers' own, --sample-bound."""
    return {"teacher_source": cfg["sample_bound"], "student_source": cfg["sample_bound"]}[caller]


@pytest.mark.parametrize("cond", [False, True], ids=["unguided", "guided"])
def test_lcm_wiring(request, tmp_path, monkeypatch, cond):
    """The teacher source runs the loaded teacher's DDIM on the N-step training grid, kept at the
    K sampling times; the student source the trained student's K-step sampler with the teacher as
    its expert on the same grid; both at uniform labels and a guidance weight per trajectory in
    [w_min, w_max] (a conditional teacher; none and 0 otherwise)."""
    nets, teacher_calls, student_calls = spy_nets(monkeypatch, L), [], []
    spy(monkeypatch, L, "teacher_rollout", teacher_calls)
    spy(monkeypatch, L, "student_rollout", student_calls)
    ck = run(L, request, tmp_path, cond, "--steps", "2", "--grid", "8", "--iters", "3",
             "--refresh-every", "2")
    cfg = ck["config"]
    teacher, student = the_nets(nets)
    nc = teacher.num_classes
    assert (nc > 0) == cond and cfg["grid"] != cfg["steps"]
    assert student is not teacher and same_weights(ck["net"], snapshot(student))
    assert any(not torch.equal(ck["net"][k], v) for k, v in snapshot(teacher).items())
    lo, hi = (cfg["w_min"], cfg["w_max"]) if nc else (0.0, 0.0)
    assert hi > lo or not cond

    calls = teacher_calls + student_calls
    check_callers(calls)
    assert {c["caller"] for c in teacher_calls} == {"teacher_source"}
    assert {c["caller"] for c in student_calls} == {"student_source"}
    for c in calls:
        n = len(c["x1"])
        assert c["steps"] == cfg["steps"] and c["grid"] == cfg["grid"]
        assert c["bound"] == lcm_bound(cfg, c["caller"])
        check_labels(c["y"], n, nc)
        w = c["w"]  # one guidance weight per trajectory, drawn from the range
        assert torch.is_tensor(w) and w.shape == (n,)
        assert float(w.min()) >= lo and float(w.max()) <= hi
        if cond and n > 1:
            assert len(w.unique()) > 1
    for c in teacher_calls:
        assert c["teacher"] is teacher
    for c in student_calls:
        assert c["student"] is student and c["expert"] is teacher
        assert c["p"] == cfg["rollout_teacher_p"] > 0


def test_lcm_student_states_grid_reaches_the_buffer(request, tmp_path, monkeypatch):
    """--student-states grid: the student source asks for the filled rollout, and the student's
    buffer then holds own states at grid times between the sampling times (default: only at them)."""
    calls = []
    spy(monkeypatch, L, "student_rollout", calls)
    ck = run(L, request, tmp_path, False, "--steps", "2", "--grid", "8", "--iters", "2",
             "--refresh-every", "1", "--student-states", "grid")
    assert calls and all(c["fill"] for c in calls)
    t = ck["buffers"]["student"]["t"][:int(ck["buffers"]["student"]["size"])]
    assert {round(8 * float(v)) for v in t} - {8, 4}  # 7/8, 6/8, ...: not only tau = 1, 1/2


# ---- DMD2 -------------------------------------------------------------------------------------

def dmd2_bound(cfg, caller):
    """The bound each DMD2 source's rollouts must use (one line to change per source): the
    samplers' own, --sample-bound."""
    return {"teacher_source": cfg["sample_bound"], "student_source": cfg["sample_bound"]}[caller]


@pytest.mark.parametrize("cond", [False, True], ids=["unguided", "guided"])
def test_dmd2_wiring(request, tmp_path, monkeypatch, cond):
    """The teacher source runs the loaded teacher's DDIM at --guidance with --teacher-substeps per
    student step; the student source G's backward simulation with the teacher as its expert at
    --guidance and the same substeps; both at the K sampling times and uniform labels."""
    nets, teacher_calls, student_calls = spy_nets(monkeypatch, D), [], []
    spy(monkeypatch, D, "teacher_rollout", teacher_calls)
    spy(monkeypatch, D, "backward_simulation", student_calls)
    extra = ["--guidance", "2"] if cond else []
    ck = run(D, request, tmp_path, cond, "--steps", "2", "--iters", "3", "--teacher-substeps", "3",
             "--fake-updates", "1", *extra)
    cfg = ck["config"]
    teacher, G = the_nets(nets)
    nc = teacher.num_classes
    assert (nc > 0) == cond and cfg["teacher_substeps"] > 1
    assert cfg["guidance"] == (2.0 if cond else 0.0)
    assert G is not teacher and same_weights(ck["net"], snapshot(G))
    taus = C.time_grid(cfg["steps"])[:-1]

    calls = teacher_calls + student_calls
    check_callers(calls)
    assert {c["caller"] for c in teacher_calls} == {"teacher_source"}
    assert {c["caller"] for c in student_calls} == {"student_source"}
    for c in calls:
        assert torch.equal(c["taus"], taus) and c["substeps"] == cfg["teacher_substeps"]
        assert c["bound"] == dmd2_bound(cfg, c["caller"])
        check_labels(c["y"], len(c["x1"]), nc)
    for c in teacher_calls:
        assert c["T"] is teacher and c["w"] == cfg["guidance"]
    for c in student_calls:
        assert c["G"] is G and c["expert"] is teacher and c["expert_w"] == cfg["guidance"]
        assert c["p"] == cfg["rollout_teacher_p"] > 0
