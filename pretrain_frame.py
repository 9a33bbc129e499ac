"""
ATST-Frame pre-training (SPEC 3-5): one 10 s crop per clip; view 1 clean, view 2 Mixup ->
frequency warp; one group mask per clip shared by both views; the student sees each view
masked, the EMA teacher the other view unmasked; BYOL loss on the masked frames, symmetric.
This file also holds the pre-training loop that pretrain_clip.py shares (`train`).

    python pretrain_frame.py --data demo --preset tiny                      # CPU demo, minutes
    torchrun --nproc_per_node=8 pretrain_frame.py --data as1.9m             # paper: base
    torchrun --nproc_per_node=8 pretrain_frame.py --preset small --data as200k
    torchrun --nproc_per_node=2 pretrain_frame.py --data demo --preset tiny # gloo on CPU

A rerun with the same --out_dir resumes from its last checkpoint. Ablations (Table III):
--aug_views 0|1|2, --mask_teacher true, --mask_mode random.
"""
import contextlib
import math
import os
import signal
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

from augment import FreqWarp, Mixup
from data import (Log, all_mean, cleanup_distributed, configure, load_checkpoint, read_manifest,
                  resolve_manifest, save_atomic, setup_distributed, stream_loader)
from model import (ATST, FRAMES_PER_TOKEN, PRESETS as MODEL_PRESETS, MelFrontEnd, collapse_std,
                   cosine_schedule, ema_schedule, group_mask, param_groups, tokens_for)

# -------------------------------------------------------------------------------- config
# defaults = the paper's ATST-Frame base run (Table I; steps as the reference code)
# I/O
out_dir = "out/frame_base"  # checkpoints + log.jsonl; a rerun with the same dir resumes
data = "as1.9m"             # named dataset, demo, or a CSV manifest (column `path`)
data_root = ""              # root of named datasets; '' = $ATST_DATA or ./data
log_every = 50              # steps between log lines
ckpt_every = 2000           # steps between checkpoints (and always at the end)
num_workers = 8             # DataLoader workers per rank (they only read and crop audio)
device = "auto"             # auto (CUDA when present) | cpu
seed = 0                    # every random draw of a step derives from (seed, step, rank)
die_at_step = -1            # testing: SIGKILL this process when it reaches this step
# model
preset = "base"             # tiny | small | base (model size; also sets the run defaults)
drop_path = 0.1             # stochastic depth of the last student block (linear from 0)
# data
seconds = 10.0              # crop length per clip (shorter clips are zero-padded)
# optimizer (AdamW 0.9/0.999, eps 1e-6)
batch_size = 864            # global batch over all GPUs and accumulation steps
micro_batch = 0             # clips per GPU per forward; 0 = batch_size / GPUs
base_lr = 8e-5              # peak lr = base_lr * batch_size / 256
min_lr = 1e-6               # lr at the last step (cosine)
epochs = 200.0              # used when max_steps is 0
max_steps = 398000          # optimizer steps; 0 = derive from epochs
warmup_epochs = 10.0        # linear lr warmup
wd_start = 0.04             # weight decay, cosine to wd_end (matrices only)
wd_end = 0.4
ema_m0 = 0.9996             # teacher EMA momentum, cosine to 1
# ATST-Frame views and masking (Table III ablations)
aug_views = 1               # 0: none, 1: view 2 augmented (D, the paper), 2: both (E)
mask_teacher = False        # the teacher is masked too (config C)
mask_mode = "group"         # group: spans of mask_span at mask_prob | random: 50% of tokens
mask_span = 5
mask_prob = 0.65
mixup_bank = 2000           # Mixup FIFO size (per rank)
mixup_ratio = 0.4           # a ~ mixup_ratio * U(0, 1)
freq_warp = "code"          # code: h = U(0.6,1.5)*F clipped | paper: h ~ U[0.6F, F]
PRESETS = {
    "base": dict(),
    "small": dict(out_dir="out/frame_small", data="as200k", batch_size=1024, base_lr=4e-4,
                  epochs=300.0, max_steps=58500, ema_m0=0.997),
    "tiny": dict(out_dir="out/frame_tiny", data="demo", batch_size=32, base_lr=4e-3,
                 epochs=40.0, max_steps=0, warmup_epochs=4.0, ema_m0=0.99, mixup_bank=256,
                 num_workers=2, log_every=20, ckpt_every=100),
}


def step_seed(seed, step, rank):
    return (seed * 1_000_003 + step) * 1024 + rank


def train(cfg, method, make_views, augs):
    """The pre-training loop shared by ATST-Frame and ATST-Clip.

    make_views(mel (B, F, T), n_valid (B,), g) -> (v1, v2, mask, n_valid) for ATST.forward;
    augs: the stateful augmentations (Mixup banks), saved per rank with each checkpoint.
    """
    c = SimpleNamespace(**cfg)
    d = setup_distributed(c.device)
    d.print("config:", " ".join(f"{k}={v}" for k, v in cfg.items()))
    os.makedirs(c.out_dir, exist_ok=True)
    rows = read_manifest(resolve_manifest(c.data, "train", c.data_root or None))
    micro = c.micro_batch or c.batch_size // d.world
    accum = c.batch_size // (micro * d.world)
    assert accum * micro * d.world == c.batch_size, \
        f"batch_size {c.batch_size} is not micro_batch {micro} x {d.world} ranks x an integer"
    per_epoch = len(rows) // c.batch_size
    assert per_epoch > 0, f"{len(rows)} clips are fewer than one batch of {c.batch_size}"
    total = c.max_steps or max(1, int(c.epochs * per_epoch))
    warmup = min(int(c.warmup_epochs * per_epoch), total)
    peak_lr = c.base_lr * c.batch_size / 256
    d.print(f"{len(rows)} clips, {per_epoch} steps/epoch, {total} steps ({total / per_epoch:.1f} "
            f"epochs), warmup {warmup}, batch {c.batch_size} = {micro} x {d.world} ranks x "
            f"{accum} accum, peak lr {peak_lr:.3g}")

    # model, optimizer, schedules
    margs = dict(method=method, drop_path=c.drop_path, **MODEL_PRESETS[c.preset])
    if method == "frame":
        margs["mask_teacher"] = c.mask_teacher
    torch.manual_seed(c.seed)  # same initial weights on every rank and every launch
    model = ATST(**margs).to(d.device)
    if d.world > 1 and d.device.type == "cuda":  # SyncBatchNorm raises on CPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = model if d.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    groups = param_groups(model)
    d.print(f"parameters: student {sum(p.numel() for p in model.student.parameters()):,}, "
            f"predictor {sum(p.numel() for p in model.predictor.parameters()):,}; AdamW groups: "
            + ", ".join(f"{'decay' if g['decay'] else 'no decay'} {len(g['params'])} tensors"
                        for g in groups))
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999), eps=1e-6,
                            fused=d.device.type == "cuda")
    lr_s = cosine_schedule(peak_lr, c.min_lr, total, warmup)
    wd_s = cosine_schedule(c.wd_start, c.wd_end, total)
    m_s = ema_schedule(c.ema_m0, total)
    front = MelFrontEnd().to(d.device)
    augs.to(d.device)

    # resume
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    bank_path = os.path.join(c.out_dir, f"augment_rank{d.rank}.pt")
    step = 0
    if os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path)
        if ck["model_args"] != margs:
            raise ValueError(f"{ckpt_path} holds a model {ck['model_args']}, this run builds "
                             f"{margs}: use another --out_dir")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        bank = torch.load(bank_path, map_location=d.device) if os.path.exists(bank_path) else {}
        if bank.get("step") == step:
            augs.load_state_dict(bank["augs"])
        else:
            print(f"rank {d.rank}: no Mixup bank saved at step {step}; starting it empty")
        d.print(f"resumed from {ckpt_path} at step {step}")
    start = step

    loader = stream_loader(rows, c.seconds, micro, d, c.seed, step * accum, c.num_workers)
    batches = iter(loader)
    log = Log(c.out_dir, d.master)
    gen = torch.Generator(device=d.device)
    pbar = tqdm(total=total, initial=step, disable=not d.master, dynamic_ncols=True)
    t_log, steps_log = time.time(), 0
    while True:
        last = step == total
        if step > start and (step % c.ckpt_every == 0 or last):
            save_atomic(dict(augs=augs.state_dict(), step=step), bank_path)
            if d.master:
                save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                                 model_args=margs, config=cfg, kind="atst-pretrain"), ckpt_path,
                            summary=dict(step=step, total=total, model_args=margs, config=cfg))
        if last:
            break
        if step == c.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(step_seed(c.seed, step, d.rank))  # drop-path
        gen.manual_seed(step_seed(c.seed, step, d.rank))    # masks and augmentations
        for g in opt.param_groups:
            g["lr"] = lr_s[step].item()
            g["weight_decay"] = wd_s[step].item() if g["decay"] else 0.0
        log_now = (step + 1) % c.log_every == 0 or step + 1 == total
        loss_val, gnorm, s_rows, t_rows = run_step(model, ddp, opt, front, make_views, batches,
                                                   accum, d, gen, log_now)
        if not math.isfinite(loss_val):
            last_good = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
            raise SystemExit(f"non-finite loss ({loss_val}) at step {step}: stopping without "
                             f"an optimizer step; last good checkpoint: {last_good}")
        model.update_teacher(m_s[step].item())
        step += 1
        steps_log += 1
        pbar.update(1)
        if log_now:
            dt = (time.time() - t_log) / steps_log
            rec = dict(step=step, loss=loss_val, lr=lr_s[step - 1].item(),
                       wd=wd_s[step - 1].item(), ema=m_s[step - 1].item(), gnorm=gnorm,
                       std_s=collapse_std(s_rows, d.world), std_t=collapse_std(t_rows, d.world),
                       ms=dt * 1000, clips_s=c.batch_size / dt)
            log(rec, f"step {step}/{total} | loss {loss_val:.4f} | lr {rec['lr']:.3g} | wd "
                     f"{rec['wd']:.3f} | ema {rec['ema']:.5f} | gnorm {gnorm:.3f} | std s "
                     f"{rec['std_s']:.4f} t {rec['std_t']:.4f} | {rec['ms']:.0f} ms/step | "
                     f"{rec['clips_s']:.1f} clips/s")
            t_log, steps_log = time.time(), 0
    pbar.close()
    check_replicas(model, d)
    d.print(f"done: {ckpt_path} (step {step})")
    cleanup_distributed()
    return model


def run_step(model, ddp, opt, front, make_views, batches, accum, d, gen, want_gnorm=False):
    """One optimizer step over `accum` micro-batches: mel -> views -> forward/backward on the
    device, then AdamW (the caller updates the teacher). Returns (loss averaged over ranks,
    grad norm or None, student rows, teacher rows of the last micro-batch). The optimizer does
    not step when the loss is not finite."""
    loss_sum = torch.zeros((), device=d.device)
    for k in range(accum):
        wav, valid = next(batches)
        wav = wav.to(d.device, non_blocking=True)
        with torch.no_grad():
            mel = front(wav)                                        # (B, F, T)
            v1, v2, mask, n_valid = make_views(mel, tokens_for(valid).to(d.device), gen)
        sync = ddp.no_sync() if d.world > 1 and k < accum - 1 else contextlib.nullcontext()
        with sync:
            with d.ctx:
                loss, s_rows, t_rows = ddp(v1, v2, mask, n_valid)
            (loss / accum).backward()
        loss_sum += loss.detach()
    loss_val = all_mean(loss_sum / accum, d).item()
    gnorm = None
    if math.isfinite(loss_val):
        if want_gnorm:
            gnorm = torch.nn.utils.get_total_norm(
                [p.grad for p in model.parameters() if p.grad is not None]).item()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_val, gnorm, s_rows, t_rows


@torch.no_grad()
def check_replicas(model, d):
    """All ranks must end with bit-identical student and teacher weights."""
    if d.world == 1:
        return
    sums = torch.stack([torch.stack([p.double().sum(), (p.double().flatten() * torch.arange(
        p.numel(), device=p.device, dtype=torch.float64).remainder(97)).sum()])
        for p in model.parameters()]).flatten()
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("ranks ended with different weights")
    d.print(f"replica check: weights identical on {d.world} ranks")


def frame_views(c):
    """ATST-Frame views from config `c`: view 1 clean, view 2 Mixup -> frequency warp (both
    with aug_views=2); one mask per clip. Returns (make_views, stateful augmentations)."""
    mixup, warp = Mixup(c.mixup_bank, c.mixup_ratio), FreqWarp(c.freq_warp)
    span, prob = (c.mask_span, c.mask_prob) if c.mask_mode == "group" else (1, 0.5)
    assert c.mask_mode in ("group", "random"), c.mask_mode  # random: Table III config B

    def make_views(mel, n_valid, g):
        mask = group_mask(n_valid, mel.shape[-1] // FRAMES_PER_TOKEN, span, prob, g)
        v1 = warp(mixup(mel, g), g) if c.aug_views == 2 else mel
        v2 = warp(mixup(mel, g), g) if c.aug_views >= 1 else mel
        mixup.push(mel)
        return v1, v2, mask, n_valid

    return make_views, torch.nn.ModuleDict(dict(mixup=mixup))


if __name__ == "__main__":
    cfg = configure(globals(), PRESETS)
    train(cfg, "frame", *frame_views(SimpleNamespace(**cfg)))
