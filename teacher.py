"""Train the v-prediction diffusion teacher that the three methods distil.

    t ~ U[0, 1],  x_t = alpha_t x0 + sigma_t eps,  v = alpha_t eps - sigma_t x0
    loss = || v_theta(x_t, t, y) - v ||^2          (y dropped to the null class w.p. p_uncond)

The cosine logSNR schedule and the U-Net live in common.py; the EMA network is the teacher.
    python teacher.py          # digits: about 7 min on 2 CPU cores (4000 iterations)
    python teacher.py --cond   # the class-conditional digits lab (CFG)
    torchrun --nproc_per_node=8 teacher.py --dataset cifar10
"""
import copy
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common as C
import harness as H
import published


@dataclass
class Config(H.RunConfig):
    warmup: int = H.flag(200, "Iterations of linear learning-rate warm-up.")
    ema: float = H.flag(0.999, "EMA decay of the teacher network (the EMA is the teacher).")
    p_uncond: float = H.flag(0.1, "Probability of dropping the label to the null class "
                             "(classifier-free guidance; --cond only).")
    sample_steps: int = H.flag(64, "DDIM steps of the final samples.png.")
    sample_count: int = H.flag(64, "Images in the final samples.png.")
    ch: int = H.flag(0, "The U-Net's base width (0 = the data set's preset); a narrower network "
                     "rehearses a preset's code path on a CPU. Students inherit it.")
    # the shared flags' defaults for the digits teacher
    iters: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    ckpt_every: int = 1000
    log_every: int = 50


PRESETS = {  # batch_size is per process: global = 8 x 64 = 512 on 8 GPUs (on 1 GPU,
    # --grad-accum to taste)
    "cifar10": dict(iters=400_000, batch_size=64, lr=2e-4, warmup=5000, ema=0.9999,
                    ckpt_every=10_000),
    # 277.2M params: 64 per GPU in 2 micro-batches of 32 keeps activations within an 80 GB card
    "imagenet64": dict(iters=400_000, batch_size=64, grad_accum=2, lr=1e-4, warmup=5000, ema=0.9999,
                       cond=True, ckpt_every=10_000),
    "mnist": dict(iters=20_000, lr=5e-4),
}


def build_model(cfg):
    num_classes = H.DATASETS[cfg.dataset][2] if cfg.cond else 0
    width = dict(ch=cfg.ch) if cfg.ch else {}
    if cfg.dataset not in C.MODEL_PRESETS:  # mnist: the digits network widened for 28x28
        return C.build_unet("digits", resolution=28, attn_res=(7,), num_classes=num_classes,
                            **{"ch": 64, **width})
    return C.build_unet(cfg.dataset, num_classes=num_classes, **width)


def main(argv=None):
    cfg = H.parse_config(Config, argv, PRESETS)
    H.check_positive(cfg, "iters", "batch_size", "log_every", "ckpt_every", "grad_accum",
                     "sample_count")
    if cfg.batch_size % cfg.grad_accum:
        H.fail(f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}")
    rank, world, device, data = H.setup(cfg, "teacher")  # --out: runs/teacher-<dataset>[-cond]

    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    H.check_free_space(cfg.out, [model, ema], [model])
    ckpt_path, step = os.path.join(cfg.out, "ckpt.pt"), 0
    if os.path.isfile(ckpt_path):
        ck = H.load_checkpoint(ckpt_path, map_location=device)
        if ck.get("model_config") != model.config:
            H.fail(f"{ckpt_path} holds a model of another shape ({ck.get('model_config')}); "
                   f"use a fresh --out or the same --dataset/--cond")
        H.load_weights(model, ck["model"]), H.load_weights(ema, ck["ema"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        if H.is_main():
            print(f"resuming from {ckpt_path} at step {step}", flush=True)
    net = DDP(model) if world > 1 else model
    ch, res, _ = H.DATASETS[cfg.dataset]
    m = cfg.batch_size // cfg.grad_accum  # trial forward at the training micro-batch shape
    net = H.maybe_compile(net, torch.zeros(m, ch, res, res, device=device),
                          torch.rand(m, device=device),
                          torch.zeros(m, dtype=torch.long, device=device) if cfg.cond else None,
                          enabled=cfg.compile)
    if H.is_main():
        print(f"teacher: {C.num_params(model) / 1e6:.2f}M params, global batch "
              f"{cfg.batch_size * world} ({world} x {cfg.batch_size}), {device}", flush=True)

    batches = H.Batches(data, cfg.batch_size, cfg.seed, rank, world, device)
    log = H.Logger(cfg.out, cfg.iters, step, desc="teacher")
    null = model.num_classes

    def checkpoint():
        H.save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(),
                                      "opt": opt.state_dict(), "step": step, "config": asdict(cfg),
                                      "model_config": model.config})

    while step < cfg.iters:
        H.step_seed(cfg.seed, rank, step)
        x0, y = batches.get(step)
        if cfg.cond:
            y = torch.where(torch.rand(y.shape, device=device) < cfg.p_uncond, null, y)
        else:
            y = None
        t = torch.rand(x0.shape[0], device=device)
        eps = torch.randn_like(x0)
        alpha, sigma = (C.bcast(c, x0) for c in C.alpha_sigma(t))
        x_t = alpha * x0 + sigma * eps
        v = C.v_from_x0_eps(x0, eps, alpha, sigma)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for sync, (x_m, t_m, y_m, v_m) in H.micro_batches(net, cfg.grad_accum, x_t, t, y, v):
            with sync:
                with H.autocast(device, cfg.bf16):
                    v_pred = net(x_m, t_m, y_m)
                loss_m = F.mse_loss(v_pred.float(), v_m) / cfg.grad_accum
                loss_m.backward()
            loss = loss + loss_m.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        C.ema_update(ema, model, cfg.ema)
        step += 1
        log.update()
        # the loss is checked at every checkpoint step too: never checkpoint a NaN
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == cfg.iters:
            loss_v = loss.item()
            H.check_finite_loss({"loss": loss_v}, step, ckpt_path)
            log.log(step, loss=loss_v, lr=opt.param_groups[0]["lr"])
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            checkpoint()
    log.close()

    # --sample-count DDIM samples (--sample-steps steps) from the EMA teacher
    torch.manual_seed(cfg.seed)
    x1 = torch.randn(cfg.sample_count, ch, res, res, device=device)
    y = torch.arange(cfg.sample_count, device=device) % model.num_classes if cfg.cond else None
    samples = C.ddim_sample(C.guided(ema, y), x1, C.time_grid(cfg.sample_steps),
                            bound="clip")
    H.save_grid(samples, os.path.join(cfg.out, "samples.png"), nrow=min(8, cfg.sample_count))
    H.barrier()
    return ema


# ----------------------------------------------------------------------------------------------
# networks from checkpoints, and the teacher a method distils
# ----------------------------------------------------------------------------------------------

SHIPPED = "assets"  # digits teachers shipped with the code (EMA weights in fp16): see README


def default_teacher_path(dataset, cond=False):
    """Where teacher.py writes a data set's default teacher (and a method script looks first)."""
    return os.path.join("runs", f"teacher-{dataset}{'-cond' if cond else ''}", "ckpt.pt")


def shipped_teacher_path(dataset, cond=False):
    """The teacher shipped in assets/ for a data set, or None (only the digits labs have one)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, SHIPPED, f"teacher-{dataset}{'-cond' if cond else ''}.pt")
    return path if os.path.isfile(path) else None


def build_net(config):
    """A network (random weights) from the `config` a checkpoint saved: our U-Net, or a wrapped
    published one (config["kind"]: published.py, which needs diffusers)."""
    if "kind" in config:
        return published.build_from_config(config)
    return C.UNet(**config)


def load_net(path, device="cpu"):
    """The sampling network of any checkpoint this project writes, with its sampler kind.

    Teacher checkpoints hold the EMA network under "ema"; student checkpoints hold the network
    to sample with under "net" and say how under "sampler" ("ddim" or "renoise").
    Returns (net in eval mode, sampler kind, checkpoint dict).
    """
    ck = H.load_checkpoint(path, map_location=device)
    key = "net" if "net" in ck else "ema"
    if key not in ck or "model_config" not in ck:
        H.fail(f"{path} holds no network ('net' or 'ema' with 'model_config'): pass a ckpt.pt "
               f"written by teacher.py or a method script")
    model = build_net(ck["model_config"]).to(device)
    H.load_weights(model, ck[key], what=path)
    return model.eval().requires_grad_(False), ck.get("sampler", "ddim"), ck


def load_teacher(path, dataset, device="cpu", cond=False, edm_repo="", data_dir="data"):
    """The teacher's EMA network (eval mode, frozen) for the method scripts.

    A published teacher (`diffusers:<folder or hub id>`, `edm-adm:<.pt>`, `edm-pkl:<.pkl>`) is
    wrapped to the same interface by published.py (`edm-pkl:` builds NVlabs' network with the
    user's own EDM checkout, edm_repo). With no path, in this order: runs/teacher-<dataset>
    [-cond]/ckpt.pt (a teacher you trained), the digits teacher shipped in assets/, and for
    digits and mnist a teacher trained here first by this file (saying so and how long it takes).
    A larger data set's teacher is days of GPU time: that is a one-line error with the commands.
    """
    if os.path.isdir(path):  # a diffusers pipeline or model folder passed without its prefix
        if H.is_main():
            print(f"teacher: {path} is a folder, read as --teacher diffusers:{path}", flush=True)
        path = "diffusers:" + path
    if published.is_published_spec(path):  # diffusers:..., edm-adm:..., edm-pkl:...
        model = published.load_published_teacher(path, device, edm_repo or None)
        ch, res, _ = H.DATASETS[dataset]
        if (model.config["in_ch"], model.config["resolution"]) != (ch, res):
            H.fail(f"--teacher {path} makes {model.config['in_ch']}x{model.config['resolution']}^2 "
                   f"images but --dataset {dataset} is {ch}x{res}^2; pass a matching --dataset")
        return model
    if not path:
        path = default_teacher_path(dataset, cond)
        if not os.path.isfile(path) and shipped_teacher_path(dataset, cond):
            path = shipped_teacher_path(dataset, cond)
            if H.is_main():
                print(f"teacher: the shipped {os.path.relpath(path)} (train your own with "
                      f"python teacher.py{' --cond' if cond else ''}; it is then used instead)",
                      flush=True)
        elif not os.path.isfile(path):
            # under torchrun each rank's own GPU: pass the device type, which init_dist maps
            device = torch.device(device)
            dist = torch.distributed
            distributed = dist.is_initialized() and dist.get_world_size() > 1
            args = ["--dataset", dataset, "--out", os.path.dirname(path), "--data-dir", data_dir,
                    "--device", device.type if distributed else str(device)]
            args += ["--cond"] if cond else []
            if dataset not in ("digits", "mnist"):
                H.fail(f"no teacher at {path}: train one (torchrun --nproc_per_node=8 teacher.py "
                       f"{' '.join(args[:-2])}, days on 8 GPUs: docs/reproduce.md) or pass a "
                       f"published one with --teacher diffusers:|edm-adm:|edm-pkl:")
            if H.is_main():
                print(f"no teacher at {path}: training it first (python teacher.py "
                      f"{' '.join(args)}; digits takes about 7 min on 2 CPU cores)", flush=True)
            main(args)
            H.barrier()
    model, _, ck = load_net(path, device)
    if ck.get("config", {}).get("dataset") != dataset:
        H.fail(f"teacher {path} was trained on {ck.get('config', {}).get('dataset')!r} but "
               f"--dataset is {dataset!r}; pass a matching --teacher")
    return model


def make_student(teacher, head="auto", w_embed=False, width=1.0, seed=0):
    """A trainable copy of the teacher, without dropout: common.student_of for our U-Net
    (w_embed: LCM's guidance-weight input, starting at zero), published.student_copy (with its
    output head, --student-head) for a wrapped published network. width < 1 (our U-Net): a
    student with that fraction of the teacher's channels (a multiple of 4), random weights
    (seeded) that published.warm_up_head fits to the teacher's v first (it has `refit`)."""
    if isinstance(teacher, C.UNet) and width != 1.0:
        ch = max(4, 4 * round(teacher.config["ch"] * width / 4))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            student = C.UNet(**{**teacher.config, "dropout": 0.0, "ch": ch, "w_embed": w_embed})
        student.refit = True
        return student.to(next(teacher.parameters()).device).train()
    if width != 1.0:
        H.fail("--student-width applies to this project's U-Net teachers only: leave it at 1")
    if isinstance(teacher, C.UNet):  # (--student-head v is refused for it by check_ddil)
        return C.student_of(teacher, w_embed=w_embed)
    if w_embed:
        H.fail("a published teacher has no guidance-weight input to give an LCM student: "
               "pass --w-max 0 (CD at its labels, unguided)")
    return published.student_copy(teacher, head=head)


if __name__ == "__main__":
    main()
