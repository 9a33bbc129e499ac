"""
The pre-training loop every method shares (ATST-Frame, ATST-Clip, ASiT): DDP (nccl on CUDA, gloo on
CPU), bf16 autocast on CUDA, gradient accumulation, AdamW with lr / weight-decay / EMA schedules
indexed by step, atomic checkpoints and exact resume, a non-finite loss stops the run, a clip
that fails to decode is replaced (loaders.Unreadable: too many stop the run), one log line. It
knows no method: a pre-training script gives it

- `model_args` and `make_model`: make_model(**model_args) builds the teacher-student module,
  whose forward(*inputs) returns (loss, stats: a dict of detached tensors),
  update_teacher(m) does the EMA step, summarize(stats, world) turns stats into the logged
  numbers (e.g. collapse monitors; it may all-reduce), `ckpt_kind` names its checkpoints and
  `encoder_kind` the model.KINDS row of its encoder;
- `views`: an nn.Module, views(wav (B, S), valid samples (B,), generator) -> the model's
  inputs, run on the device under no_grad; its state (augmentation banks) is saved per rank.
  valid is None when every clip of the batch is whole (decided on the host, before any copy):
  the views then give the model no padding mask (valid_samples gives them the lengths);
- optionally `schedules(total_steps, steps_per_epoch)` -> {name: tensor indexed by step}:
  per-step values of the method (ASiT's teacher temperature), passed to the model's forward
  as keyword arguments and logged.
The method's config block holds every value of the recipe the loop reads (NEEDS below): the
optimizer's betas and eps, the lr scaling rule, the schedules' ends and shapes, the per-tensor
gradient-norm clip (`clip_grad`, 0 = none).

out_dir holds ckpt.pt (`model`: the whole teacher-student state, strict; `model_args`, which
rebuild it; `optimizer`, `step`, `config`; `kind` "atst-pretrain" / "asit-pretrain" and
`encoder_kind`, the model.KINDS row; downstream stages read `teacher.encoder.*`), ckpt.pt.json
(the same summary for people), log.jsonl (one record per log line), unreadable.txt (the clips
replaced, if any) and, per rank, the views' state (Mixup banks) of the last save, so that a
killed run resumes bit for bit.
"""
import glob
import math
import os
import signal
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

from cluster import (accumulate, claim_out_dir, cleanup_distributed, decide, setup_distributed,
                     split_batch, visible, workers, wrap_ddp)
from config import describe
from data import on_device, read_manifest, resolve_manifest, task_copy
from loaders import Unreadable, replaced, stream_loader
from model import SAMPLE_RATE, Encoder, param_groups
from plumbing import (Log, UserError, cosine_schedule, ema_schedule, load_checkpoint, save_atomic,
                      step_seed, warmup_steps)


NEEDS = ("out_dir", "data", "data_root", "seed", "device", "dtype", "num_workers", "log_every",
         "ckpt_every", "seconds", "batch_size", "micro_batch", "base_lr", "lr_rule", "min_lr",
         "max_steps", "epochs", "warmup_epochs", "beta1", "beta2", "adam_eps", "clip_grad",
         "wd_start", "wd_end", "ema_m0", "ema_ramp", "compile")
LR_RULES = {"linear": lambda base_lr, batch: base_lr * batch / 256, "none": lambda lr, _: lr}


def train(cfg, model_args, make_model, views, schedules=None):
    missing = [k for k in NEEDS if k not in cfg]
    if missing:
        raise KeyError(f"pretrain.train: the config lacks {missing} (every method's config "
                       "block sets them; see pretrain_frame.py)")
    if cfg["lr_rule"] not in LR_RULES:
        raise SystemExit(f"error: --lr_rule {cfg['lr_rule']!r}: one of {sorted(LR_RULES)}")
    if cfg["ema_ramp"] not in ("cosine", "linear"):  # said now, not after the model is built
        raise SystemExit(f"error: --ema_ramp {cfg['ema_ramp']!r}: cosine or linear")
    c = SimpleNamespace(**cfg)
    d = setup_distributed(c.device, c.dtype)
    d.print(describe(cfg))
    claim_out_dir(c.out_dir, d)  # nothing of this run writes before the model is broadcast
    t0 = time.time()
    rows = read_manifest(resolve_manifest(c.data, "train", c.data_root or None), d=d)
    copy = task_copy(c.data, c.data_root or None)  # what prepare.py recorded of this copy
    checked = time.time() - t0
    micro, accum = split_batch(c.batch_size, c.micro_batch, d)
    per_epoch = len(rows) // c.batch_size
    if not per_epoch:
        raise UserError(f"{len(rows)} clips of {c.data} are fewer than one batch of "
                        f"{c.batch_size}: lower --batch_size")
    total = c.max_steps or max(1, int(c.epochs * per_epoch))
    warmup = warmup_steps(c.warmup_epochs, per_epoch, total, d.print)
    peak_lr = LR_RULES[c.lr_rule](c.base_lr, c.batch_size)
    d.print(f"{len(rows)} clips (every file present, checked in {checked:.1f} s), {per_epoch} "
            f"steps/epoch, {total} steps ({total / per_epoch:.1f} epochs), warmup {warmup}, "
            f"batch {c.batch_size} = {micro} x {d.world} ranks x {accum} accum, peak lr "
            f"{peak_lr:.3g}, {d.precision}" + (f"; data: copy {copy['fingerprint']} of "
                                               f"{copy['dataset']}" if copy else ""))

    # model, optimizer, schedules
    torch.manual_seed(c.seed)  # same initial weights on every rank and every launch
    model = make_model(**model_args).to(d.device)
    if c.compile:
        compile_encoders(model)
    groups = param_groups(model)
    d.print(f"parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
            "trained; AdamW groups: " + ", ".join(
                f"{'decay' if g['decay'] else 'no decay'} {len(g['params'])} tensors"
                for g in groups))
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(c.beta1, c.beta2), eps=c.adam_eps,
                            fused=d.device.type == "cuda")
    lr_s = cosine_schedule(peak_lr, c.min_lr, total, warmup)
    wd_s = cosine_schedule(c.wd_start, c.wd_end, total)
    m_s = ema_schedule(c.ema_m0, total, c.ema_ramp)
    extra = schedules(total, per_epoch) if schedules else {}
    views.to(d.device)

    # resume (rank 0 decides from where), then DDP, which starts every rank from rank 0's weights
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    step = resume(ckpt_path, model, opt, views, model_args, total, d) \
        if decide(lambda: os.path.exists(ckpt_path), d) else 0
    start = saved = step
    model, ddp = wrap_ddp(model, d)

    loader = stream_loader(rows, c.seconds, micro, d, c.seed, step * accum,
                           workers(c.num_workers))
    del rows  # the loader holds them packed (loaders.Clips); the dicts are ~1 GB per 2M rows
    said = []  # messages of the clips replaced in this step's batches
    batches = replaced(iter(loader), said)
    log = Log(c.out_dir, d.master, resume=("step", step))
    unreadable = Unreadable(c.out_dir, d, step)
    gen = torch.Generator(device=d.device)
    pbar = tqdm(total=total, initial=step, disable=not d.master, dynamic_ncols=True)
    t_log, steps_log = time.time(), 0
    while True:
        last = step == total
        if step > start and (step % c.ckpt_every == 0 or last):
            # views first, per rank and per step: a kill before the checkpoint is written
            # leaves the views of the previous one, which is kept until the next save
            save_atomic(dict(views=views.state_dict(), step=step), views_path(c.out_dir, d, step))
            for old in glob.glob(views_path(glob.escape(c.out_dir), d, "*")):
                if int(old.rsplit("step", 1)[1][:-3]) < saved:
                    os.remove(old)
            saved = step
            if d.master:
                save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step,
                                 model_args=model_args, config=cfg, kind=model.ckpt_kind,
                                 encoder_kind=model.encoder_kind),
                            ckpt_path, summary=dict(step=step, total=total,
                                                    model_args=model_args, config=cfg,
                                                    dataset_copy=copy, precision=d.precision))
        if last:
            break
        if step == int(os.environ.get("ATST_DIE_AT_STEP", -1)):  # tests: a kill mid-run
            os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(step_seed(c.seed, step, d.rank))  # drop-path
        gen.manual_seed(step_seed(c.seed, step, d.rank))    # masks and augmentations
        for g in opt.param_groups:
            g["lr"] = lr_s[step].item()
            g["weight_decay"] = wd_s[step].item() if g["decay"] else 0.0
        log_now = (step + 1) % c.log_every == 0 or step + 1 == total
        now = {k: v[step].item() for k, v in extra.items()}
        loss_val, gnorm, stats = run_step(model, ddp, opt, views, batches, accum, d, gen, log_now,
                                          c.clip_grad, now)
        if not math.isfinite(loss_val):
            last_good = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
            raise SystemExit(f"non-finite loss ({loss_val}) at step {step}: stopping without "
                             f"an optimizer step; last good checkpoint: {last_good}")
        model.update_teacher(m_s[step].item())
        step += 1
        unreadable(step, said, step * c.batch_size)
        steps_log += 1
        pbar.update(1)
        if log_now:
            dt = (time.time() - t_log) / steps_log
            rec = dict(step=step, loss=loss_val, lr=lr_s[step - 1].item(),
                       wd=wd_s[step - 1].item(), ema=m_s[step - 1].item(), gnorm=gnorm,
                       **now, **model.summarize(stats, d.world), ms=dt * 1000,
                       clips_s=c.batch_size / dt)
            monitors = " | ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in (
                "step", "loss", "lr", "wd", "ema", "gnorm", "ms", "clips_s"))
            log(rec, f"step {step}/{total} | loss {loss_val:.4f} | lr {rec['lr']:.3g} | wd "
                     f"{rec['wd']:.3f} | ema {rec['ema']:.5f} | gnorm {gnorm:.3f} | "
                     f"{monitors} | {rec['ms']:.0f} ms/step | {rec['clips_s']:.1f} clips/s")
            t_log, steps_log = time.time(), 0
    pbar.close()
    check_replicas(model, d)
    d.print(f"done: {ckpt_path} (step {step})")
    cleanup_distributed()
    return model


def crop_samples(c, flag):
    """Samples of the crop --FLAG sets, said at start-up (not at the first step) when it is
    longer than the audio read per clip (--seconds)."""
    if getattr(c, flag) > c.seconds:
        raise UserError(f"--{flag} {getattr(c, flag):g} is longer than --seconds {c.seconds:g}, "
                        "the audio read per clip: shorten the crop or raise --seconds")
    return int(getattr(c, flag) * SAMPLE_RATE)


def compile_encoders(model):
    """torch.compile every Encoder of the model in place (Module.compile), so that its
    state_dict, and so every checkpoint, keeps its keys (no `_orig_mod.` prefix). Random ops
    fall back to eager's, so that drop-path draws what the uncompiled model draws."""
    for m in model.modules():
        if isinstance(m, Encoder):
            m.compile(options=dict(fallback_random=True))


def valid_samples(wav, valid):
    """The views' valid samples per clip (B,): `valid`, or every clip whole (valid None: the
    whole width of wav (B, S)), made on wav's device for the random draws that use them."""
    if valid is None:
        return torch.full(wav.shape[:1], wav.shape[-1], device=wav.device)
    return valid


def views_path(out_dir, d, step):
    return os.path.join(out_dir, f"views_rank{d.rank}_step{step}.pt")


def resume(ckpt_path, model, opt, views, model_args, total, d):
    """Load the checkpoint rank 0 found, on every rank, and this rank's views state saved at
    its step; returns the step. A checkpoint of another model or past this run's last step is
    an error saying what to do."""
    ck = load_checkpoint(visible(ckpt_path, d, "out_dir"))
    if ck["model_args"] != model_args:
        raise UserError(f"{ckpt_path} holds a model {ck['model_args']}, this run builds "
                        f"{model_args}: use another --out_dir")
    step = ck["step"]
    if step > total:
        raise UserError(f"{ckpt_path} is at step {step}, past this run's last step {total} "
                        f"(--max_steps / --epochs): resume with at least {step} steps, or "
                        "start afresh in another --out_dir")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    path = views_path(os.path.dirname(ckpt_path), d, step)
    if os.path.exists(path):
        views.load_state_dict(torch.load(path, map_location=d.device)["views"])
    else:
        print(f"rank {d.rank}: no views state (Mixup bank) saved at step {step}: it starts "
              "empty, so this run will not match an uninterrupted one exactly")
    d.print(f"resumed from {ckpt_path} at step {step}")
    return step


def run_step(model, ddp, opt, views, batches, accum, d, gen, want_gnorm=False, clip=0.0,
             kwargs=None):
    """One optimizer step over `accum` micro-batches: views on the device, forward/backward
    (kwargs: this step's schedule values), per-tensor gradient clipping at `clip` (0 = none),
    then AdamW (the caller updates the teacher). Returns (loss averaged over ranks, grad norm
    before clipping or None, the stats of the last micro-batch). The optimizer does not step
    when the loss is not finite: reading the loss is the step's one wait for the device (the
    grad norm's too on log steps), besides the methods' own (ATST-Frame's masked-row count,
    ASiT's GMML looks)."""
    last = {}

    def micro(_):
        wav, valid = next(batches)
        # whole clips (nearly every AudioSet batch) need no padding mask, which would rule out
        # the flash kernel: said by the host's copy of valid, so the device is not asked
        whole = bool((valid >= wav.shape[-1]).all())
        valid = None if whole else valid.to(d.device, non_blocking=True)
        with torch.no_grad():
            inputs = views(on_device(wav, d.device), valid, gen)
        with d.ctx:
            loss, last["stats"] = ddp(*inputs, **(kwargs or {}))
        return loss
    loss_val = accumulate(ddp, accum, d, micro)
    stats = last["stats"]
    gnorm = None
    if math.isfinite(loss_val):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if want_gnorm:
            gnorm = torch.nn.utils.get_total_norm(grads).item()
        if clip:
            clip_per_tensor(grads, clip)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_val, gnorm, stats


@torch.no_grad()
def clip_per_tensor(grads, max_norm):
    """Scale each gradient tensor whose norm exceeds max_norm down to it (DINO / ASiT clip
    each parameter on its own, not the global norm)."""
    norms = torch.stack(torch._foreach_norm(grads))  # the scales in 4 kernels, not 3 per tensor
    torch._foreach_mul_(grads, (max_norm / (norms + 1e-6)).clamp(max=1.0).unbind())


@torch.no_grad()
def check_replicas(model, d):
    """All ranks must end with bit-identical weights (student and teacher)."""
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
