"""Train the v-prediction diffusion teacher that the three methods distil.

    t ~ U[0, 1],  x_t = alpha_t x0 + sigma_t eps,  v = alpha_t eps - sigma_t x0
    loss = || v_theta(x_t, t, y) - v ||^2          (y dropped to the null class w.p. p_uncond)

The cosine logSNR schedule and the U-Net live in common.py; the EMA network is the teacher.
    python teacher.py                                   # digits, CPU, a few minutes
    python teacher.py --cond                            # the class-conditional digits lab (CFG)
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


@dataclass
class Config(H.RunConfig):
    warmup: int = H.flag(200, "Iterations of linear learning-rate warm-up.")
    ema: float = H.flag(0.999, "EMA decay of the teacher network (the EMA is the teacher).")
    p_uncond: float = H.flag(0.1, "Probability of dropping the label to the null class "
                             "(classifier-free guidance; --cond only).")
    sample_steps: int = H.flag(64, "DDIM steps of the final samples.png.")
    sample_count: int = H.flag(64, "Images in the final samples.png.")
    # the shared flags' defaults for the digits teacher
    iters: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    ckpt_every: int = 1000
    log_every: int = 50


PRESETS = {  # batch_size is per process: global = 8 x 64 = 512 on 8 GPUs (1 GPU: --grad-accum to taste)
    "cifar10": dict(iters=400_000, batch_size=64, lr=2e-4, warmup=5000, ema=0.9999, ckpt_every=10_000),
    # ~300M params: 64 per GPU in 2 micro-batches of 32 keeps activations within an 80 GB card
    "imagenet64": dict(iters=400_000, batch_size=64, grad_accum=2, lr=1e-4, warmup=5000, ema=0.9999,
                       cond=True, ckpt_every=10_000),
    "mnist": dict(iters=20_000, lr=5e-4),
}


def build_model(cfg):
    preset = cfg.dataset if cfg.dataset in C.MODEL_PRESETS else None
    if preset is None:  # mnist: the digits network widened for 28x28
        return C.build_unet("digits", resolution=28, ch=64, attn_res=(7,), num_classes=10 if cfg.cond else 0)
    return C.build_unet(preset, num_classes=H.DATASETS[cfg.dataset][2] if cfg.cond else 0)


def main(argv=None):
    cfg = H.parse_config(Config, argv, PRESETS)
    cfg.out = cfg.out or os.path.dirname(H.default_teacher_path(cfg.dataset, cfg.cond))
    H.check_positive(cfg, "iters", "batch_size", "log_every", "ckpt_every", "grad_accum",
                     "sample_count")
    if cfg.batch_size % cfg.grad_accum:
        H.fail(f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}")
    H.check_out_dir(cfg.out)  # --out naming a file: one line, before any work
    rank, world, device = H.init_dist(cfg.device)
    data = H.load_dataset(cfg.dataset, cfg.data_dir)
    H.save_config(cfg, cfg.out)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
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
    net = H.maybe_compile(net, torch.zeros(m, ch, res, res, device=device), torch.rand(m, device=device),
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
        if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == cfg.iters:  # never checkpoint a NaN
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
    samples = C.ddim_sample(C.guided(ema, y), x1, C.time_grid(cfg.sample_steps), "clip")
    H.save_grid(samples, os.path.join(cfg.out, "samples.png"), nrow=min(8, cfg.sample_count))
    H.barrier()
    return ema


def load_teacher(path, dataset, device="cpu", cond=False, edm_repo=""):
    """The teacher's EMA network (eval mode, frozen) and its saved config dict, for the method
    scripts. With no path, runs/teacher-<dataset>[-cond]/ckpt.pt; when that is missing, this
    file trains it first (saying so), so a method script runs end to end on a fresh machine.
    A published teacher (`diffusers:<folder or hub id>`, `edm-adm:<.pt>`, `edm-pkl:<.pkl>`) is
    wrapped to the same interface by published.py (`edm-pkl:` builds NVlabs' network with the
    user's own EDM checkout, edm_repo)."""
    import published
    if published.is_published_spec(path):  # diffusers:..., edm-adm:..., edm-pkl:...
        model = published.load_published_teacher(path, device, edm_repo or None)
        ch, res, _ = H.DATASETS[dataset]
        if (model.config["in_ch"], model.config["resolution"]) != (ch, res):
            H.fail(f"--teacher {path} makes {model.config['in_ch']}x{model.config['resolution']}^2 "
                   f"images but --dataset {dataset} is {ch}x{res}^2; pass a matching --dataset")
        return model, {"dataset": dataset, "teacher": path}
    if not path:
        path = H.default_teacher_path(dataset, cond)
        if not os.path.isfile(path):
            args = ["--dataset", dataset, "--out", os.path.dirname(path)] + (["--cond"] if cond else [])
            if H.is_main():
                print(f"no teacher at {path}: training the default {dataset} teacher first "
                      f"(python teacher.py {' '.join(args)})", flush=True)
            main(args)
            H.barrier()
    model, _, ck = H.load_net(path, device)
    if ck.get("config", {}).get("dataset") != dataset:
        H.fail(f"teacher {path} was trained on {ck.get('config', {}).get('dataset')!r} but --dataset "
               f"is {dataset!r}; pass a matching --teacher")
    return model, ck["config"]


if __name__ == "__main__":
    main()
