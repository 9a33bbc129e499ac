"""
Fine-tuning (REFERENCE.md R6, paper Table V): the pre-trained teacher encoder and a BatchNorm +
Linear head on the last block (Frame: mean of frames; Clip and ASiT: [CLS, mean]) trained
together: SGD momentum 0.9, layer-wise lr decay 0.75, 5 warmup epochs then cosine to 1e-6, grad
clip 3, Mixup with labels + Random Resized Crop where R6 says so (BCE then). The best epoch on
the validation split is kept and scored once on test. distill.py shares this loop (`train`).

    python finetune.py --ckpt out/frame_tiny/ckpt.pt --data demo_events
    torchrun --nproc_per_node=8 finetune.py --ckpt atstframe_base.ckpt --data as2m
    torchrun --nproc_per_node=8 finetune.py --ckpt atstclip_base.pth --data vox1 --lr 0.5
    torchrun --nproc_per_node=4 finetune.py --ckpt X.ckpt --data as2m --micro_batch 64  # accum 4
    python finetune.py --ckpt X.pt --data my/train.csv --test_csv my/test.csv

Per-dataset defaults (epochs, batch, Mixup, balanced sampling) are the TASKS table below;
they apply when --data names the dataset; a global edited in the block or a flag wins over
them (config.configure). A rerun with the same
--out_dir resumes after the last finished epoch.
"""
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from augment import RandomResizedCrop, mixup_labels
from cluster import (accumulate, cleanup_distributed, gather_shards, my_shard, split_batch,
                     visible, wrap_ddp)
from config import config_keys, configure
from data import Labels, on_device, task_copy, task_splits
from downstream import publish, record, resume, run_dir, save_epoch, start, start_encoder
from heads import Classifier, layer_decay_groups
from loaders import (BalancedSampler, EpochItems, LabelledClips, Unreadable, make_loader,
                     pad_collate, replaced)
from metrics import score
from model import freeze, set_drop_path
from plumbing import (Log, UserError, cosine_schedule, load_checkpoint, save_atomic, step_seed,
                      user_errors, warmup_steps)

# -------------------------------------------------------------------------------- config
# None = the value of the task's TASKS row (a CSV or an unnamed dataset takes "default");
# anything written here, or a flag, wins over a row.
# I/O
ckpt = ""                   # pre-trained checkpoint: ours (teacher encoder) or a released one
data = "demo_events"        # task: named dataset, demo_events / demo_tags, or a train CSV
data_root = ""              # root of named datasets; '' = $ATST_DATA or ./data
test_csv = ""               # test manifest when --data is a CSV
valid_csv = ""              # validation manifest (else 10% of train is held out)
out_dir = ""                # checkpoints, log, result; '' = out/finetune_<data>_<kind>
random_init = False         # baseline: the same encoder with random weights
# optimizer: SGD, momentum 0.9
lr = None                   # peak lr (the head's; blocks get layer_decay powers of it)
layer_decay = 0.75          # layer-wise lr decay
weight_decay = 0.0          # SGD weight decay (matrices only; biases and norms none)
batch_size = None           # global batch over all GPUs
micro_batch = 0             # clips per GPU in one forward (gradient accumulation); 0 = batch/GPUs
epochs = None               # training epochs
warmup_epochs = None        # linear warmup, then cosine to min_lr
min_lr = 1e-6               # lr at the last step
grad_clip = 3.0             # global gradient norm clip
drop_path = 0.1             # stochastic depth of the last block (linear from 0)
# data and augmentation
train_seconds = None        # random crop of longer training clips
max_seconds = 12.0          # evaluation: centre crop of longer clips, then 6 s / 10 s chunks
mixup = None                # Mixup with labels (lambda ~ Beta(a, a)) + RRC; targets use BCE
mixup_alpha = 0.5           # a of Beta(a, a)
balanced = None             # balanced sampling (AS-2M): weight sum_c y_c 1000 / (count_c + 0.01)
# runtime
num_workers = -1            # DataLoader workers per rank; -1: the CPUs / ranks here, less one
device = "auto"             # auto (CUDA if torch sees it) | cpu | cuda (an error without CUDA)
dtype = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (CPU too) | fp32
seed = 0                    # every random draw of a step derives from (seed, step, rank)
# --data NAME: the paper's per-dataset settings (R6); "default" for CSVs and other datasets.
# The demo rows are CPU-sized (at lr 0.5 demo fine-tuning diverged at first, at 0.1 its loss
# falls every epoch).
#                 epochs batch_size   lr  warmup_epochs  train_seconds  mixup  balanced
_ROWS = {"default": (100, 512, 0.1, 5.0, 10.0, False, False),
         "as2m": (10, 1024, 0.1, 5.0, 10.0, True, True),
         "as20k": (200, 512, 0.1, 5.0, 10.0, True, False),
         "fsd50k": (100, 512, 0.1, 5.0, 10.0, True, False),
         "spcv2": (50, 512, 0.1, 5.0, 1.0, True, False),
         "vox1": (50, 512, 0.1, 5.0, 10.0, False, False),
         "demo_events": (8, 32, 0.1, 1.0, 4.0, False, False),
         "demo_tags": (8, 32, 0.1, 1.0, 6.0, True, False)}
TASKS = {k: dict(zip(("epochs", "batch_size", "lr", "warmup_epochs", "train_seconds", "mixup",
                      "balanced"), v)) for k, v in _ROWS.items()}
TABLES = dict(data=TASKS)
CONFIG_KEYS = config_keys(globals())  # distill.py extends this config


def balanced_weights(targets):
    """Per-clip sampling weights sum_c y_c * 1000 / (count_c + 0.01) (R6)."""
    y = targets.float() if targets.dim() == 2 else F.one_hot(targets).float()
    return (y * 1000 / (y.sum(0) + 0.01)).sum(1)


def scoring_loader(rows, targets, batch, c, d):
    """This rank's shard of a split (a rank may have none), centre-cropped, `batch` clips at
    a time: (the shard's row indices, its loader, made once per run), for predict."""
    mine = my_shard(len(rows), d)
    ds = LabelledClips([rows[i] for i in mine], targets[mine], c.max_seconds)
    return mine, make_loader(ds, d.device, c.num_workers, batch_size=batch,
                             collate_fn=pad_collate)


@torch.no_grad()
def predict(model, shard, n, d):
    """Logits of the n clips of a split (chunked), each rank computing its shard
    (scoring_loader), gathered."""
    model.eval()
    mine, loader = shard
    out = []
    for wav, valid, _ in tqdm(loader, desc=f"scoring {n} clips", disable=not d.master,
                              leave=False):
        with d.ctx:
            out.append(model(*model.ae.features(on_device(wav, d.device),
                                                valid.to(d.device, non_blocking=True)))
                       .float().cpu())
    return gather_shards(mine, out, n, d)


def task_loss(logits, target, soft):
    return F.binary_cross_entropy_with_logits(logits, target) if soft else \
        F.cross_entropy(logits, target)


def kd_loss(student, teacher_logits, soft):
    """R6: BCE(s, sigmoid(t)) for multi-label or Mixup, CE(s, softmax(t)) otherwise."""
    if soft:
        return F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher_logits))
    return F.cross_entropy(student, teacher_logits.softmax(-1))


def teacher_inputs(teacher, ae, x, n, wav, valid, c, seed):
    """The teacher's input: the student's own (augmented) input when both share a front-end;
    else (ASiT <-> ATST) the teacher's front-end on the waveforms, with the same Mixup draws
    (the step's rng: same lambdas and partners) and no RRC, the teacher seeing the whole
    mixed clip."""
    if teacher.ae.same_front(ae):
        return x, n
    tx, tn = teacher.ae.features(wav, valid)
    if c.mixup:  # labels play no part here: a dummy column
        tx, _ = mixup_labels(tx, tx.new_zeros(len(tx), 1), c.mixup_alpha,
                             np.random.default_rng(seed))
        tn = torch.full_like(tn, tx.shape[-1] // teacher.ae.unit)
    return tx, tn


def setup(cfg, teacher, stage):
    """Everything a run needs before its first epoch: splits, labels, model, optimizer,
    loader, schedule; a namespace."""
    c, d, t0 = start(cfg)
    if not c.ckpt:
        raise SystemExit(f"{stage}.py needs --ckpt (a pre-trained checkpoint)")
    train_rows, valid_rows, test_rows = task_splits(c.data, c.data_root or None, c.test_csv,
                                                    c.valid_csv, seed=c.seed, d=d)
    labels = Labels.of_task(c.data, train_rows + valid_rows + test_rows, c.data_root or None)
    y_train, y_valid, y_test = (labels.encode(r) for r in (train_rows, valid_rows, test_rows))
    micro, accum = split_batch(c.batch_size, c.micro_batch, d)  # said before any loading
    ae = start_encoder(c, d)
    out_dir = run_dir(c, d, stage, ae)
    if teacher is not None:
        freeze(teacher.to(d.device))
        if teacher.classes != labels.classes:
            raise SystemExit(f"the teacher was fine-tuned on other classes ({len(teacher.classes)}"
                             f" vs {len(labels.classes)} here)")
        if teacher.ae.kind == ae.kind:
            d.print(f"note: teacher and student are both {ae.name} (C2F/F2C cross kinds)")
    torch.manual_seed(c.seed)
    set_drop_path(ae.encoder, c.drop_path)
    model = Classifier(ae, len(labels.classes)).to(d.device).train()  # DDP after resume
    groups = layer_decay_groups(model, c.layer_decay, c.weight_decay)
    d.print(f"{ae.source}: {ae.name}, {len(labels.classes)} classes "
            f"({'multi' if labels.multi else 'single'}-label), {len(train_rows)}/"
            f"{len(valid_rows)}/{len(test_rows)} clips; groups (lr scale, weight decay) "
            + ", ".join(f"{g['lr_scale']:.3g}/{g['weight_decay']:g} x{len(g['params'])}"
                        for g in groups))
    opt = torch.optim.SGD(groups, lr=c.lr, momentum=0.9)
    ds = LabelledClips(train_rows, y_train, c.train_seconds, train=True, seed=c.seed)
    sampler = EpochItems(
        BalancedSampler(balanced_weights(y_train), len(ds) // d.world, c.seed, d.rank)
        if c.balanced else torch.utils.data.DistributedSampler(ds, d.world, d.rank, seed=c.seed,
                                                               drop_last=True))
    loader = make_loader(ds, d.device, c.num_workers, batch_size=micro, sampler=sampler,
                         collate_fn=pad_collate, drop_last=True)
    per_epoch = len(loader) // accum
    if not per_epoch:
        raise UserError(f"{len(ds)} training clips are fewer than one batch of "
                        f"{c.batch_size}: lower --batch_size")
    total = c.epochs * per_epoch
    sched = cosine_schedule(c.lr, c.min_lr, total,
                            warmup_steps(c.warmup_epochs, per_epoch, total, d.print))
    d.print(f"batch {c.batch_size} = {micro} x {d.world} ranks x {accum} accum, {per_epoch} "
            "steps/epoch")
    return SimpleNamespace(c=c, d=d, t0=t0, cfg=cfg, labels=labels, ae=ae, out_dir=out_dir,
                           rrc=RandomResizedCrop(), accum=accum,
                           teacher=teacher, model=model, opt=opt,
                           sampler=sampler, loader=loader, per_epoch=per_epoch, total=total,
                           sched=sched, soft=labels.multi or c.mixup,  # BCE on soft targets
                           splits=dict(train=train_rows, valid=valid_rows, test=test_rows),
                           y=dict(valid=y_valid, test=y_test),
                           scoring={k: scoring_loader(rows, y, micro, c, d) for k, rows, y in
                                    (("valid", valid_rows, y_valid), ("test", test_rows, y_test))})


def micro_loss(r, wav, valid, y, seed, kd_weight):
    """The loss of one micro-batch (features, Mixup + RRC where on, teacher), its forward
    through DDP (r.ddp)."""
    c, d, model, labels = r.c, r.d, r.model, r.labels
    wav, valid, y = (on_device(wav, d.device), valid.to(d.device, non_blocking=True),
                     y.to(d.device, non_blocking=True))
    with torch.no_grad():
        x, n = model.ae.features(wav, valid)                    # (B, F, T), (B,)
        target = y.float() if labels.multi else y
        if c.mixup:  # RRC stretches time, so every clip is taken as full length
            r.gen.manual_seed(seed)
            onehot = target if labels.multi else F.one_hot(y, len(labels.classes)).float()
            x, target = mixup_labels(x, onehot, c.mixup_alpha, np.random.default_rng(seed))
            x = r.rrc(x, r.gen)
            n = torch.full_like(n, x.shape[-1] // model.ae.unit)
    with d.ctx:
        logits = r.ddp(x, n).float()
        loss = task_loss(logits, target, r.soft)
        if r.teacher is not None:
            with torch.no_grad():
                t_logits = r.teacher(*teacher_inputs(r.teacher, model.ae, x, n, wav, valid,
                                                     c, seed)).float()
            loss = (1 - kd_weight) * loss + kd_weight * kd_loss(logits, t_logits, r.soft)
    return loss


def run_epoch(r, epoch, kd_weight, pbar):
    """One epoch of optimizer steps, each over r.accum micro-batches per rank; returns the
    mean loss (over ranks too). A non-finite loss stops every rank."""
    c, d, model, opt = r.c, r.d, r.model, r.opt
    model.train()
    r.sampler.set_epoch(epoch)  # the crops' epoch too: EpochItems
    said = []  # messages of the clips replaced in this step's batches
    batches, loss_sum = replaced(iter(r.loader), said), 0.0
    for i in range(r.per_epoch):
        step = epoch * r.per_epoch + i
        for g in opt.param_groups:
            g["lr"] = r.sched[step].item() * g["lr_scale"]

        def micro(k):
            seed = step_seed(c.seed, step * r.accum + k, d.rank)
            torch.manual_seed(seed)  # drop-path
            return micro_loss(r, *next(batches), seed, kd_weight)
        loss_val = accumulate(r.ddp, r.accum, d, micro)
        r.unreadable(step + 1, said, (step + 1) * c.batch_size)
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        if not math.isfinite(loss_val):
            raise SystemExit(f"non-finite loss ({loss_val}) at epoch {epoch} step {i}: stopping")
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss_val
        pbar.update(1)
    return loss_sum / r.per_epoch


def evaluate(r, split):
    """mAP (multi-label) or accuracy of the model on a split."""
    return score(predict(r.model, r.scoring[split], len(r.splits[split]), r.d), r.y[split],
                 r.labels.multi)


def train(cfg, teacher=None, kd_weight=0.5, stage="finetune"):
    r = setup(cfg, teacher, stage)
    c, d, model, labels = r.c, r.d, r.model, r.labels
    ckpt_path, best_path = (os.path.join(r.out_dir, f) for f in ("ckpt.pt", "best.pt"))
    epoch, best = resume(ckpt_path, model, r.opt, d, cfg)
    best = best or dict(valid=-math.inf, epoch=-1)
    model, r.ddp = wrap_ddp(model, d)  # after resume: every rank starts from rank 0's weights
    r.model, r.gen = model, torch.Generator(device=d.device)
    r.unreadable = Unreadable(r.out_dir, d, epoch * r.per_epoch)
    log = Log(r.out_dir, d.master, resume=("epoch", epoch))
    pbar = tqdm(total=r.total, initial=epoch * r.per_epoch, disable=not d.master,
                dynamic_ncols=True)
    metric = "mAP" if labels.multi else "acc"
    for epoch in range(epoch, c.epochs):
        t_ep = time.time()
        loss = run_epoch(r, epoch, kd_weight, pbar)
        v = evaluate(r, "valid")
        if v > best["valid"]:
            best = dict(valid=v, epoch=epoch + 1)
            if d.master:
                save_atomic(dict(kind="atst-finetune", model=model.export(),
                                 encoder_args=r.ae.encoder.args, encoder_kind=r.ae.kind,
                                 classes=labels.classes, multi=labels.multi, valid=v,
                                 epoch=epoch + 1, config=cfg, pretrained=c.ckpt), best_path)
        save_epoch(ckpt_path, model, r.opt, epoch + 1, best, cfg, d)
        lr = r.sched[(epoch + 1) * r.per_epoch - 1].item()
        log(dict(epoch=epoch + 1, loss=loss, lr=lr, valid=v, best=best["valid"],
                 s=time.time() - t_ep),
            f"epoch {epoch + 1}/{c.epochs} | loss {loss:.4f} | lr {lr:.3g} | valid {metric} "
            f"{v:.4f} | best {best['valid']:.4f} (epoch {best['epoch']}) | "
            f"{time.time() - t_ep:.0f}s")
    pbar.close()
    if d.world > 1:
        dist.barrier()  # best.pt is written by rank 0
    model.load_export(load_checkpoint(visible(best_path, d, "out_dir"))["model"])  # strictly
    test = evaluate(r, "test")
    res = record(stage, c.data, task_copy(c.data, c.data_root or None), c, d, r.ae, r.t0, cfg,
                 teacher=cfg.get("teacher"), teacher_kind=teacher.ae.kind if teacher else None,
                 metric="mAP" if labels.multi else "accuracy", test=test, valid=best["valid"],
                 best_epoch=best["epoch"], lr=c.lr, n=[len(r.splits[k]) for k in r.splits])
    publish(res, os.path.join(r.out_dir, "result.json"), d,
            f"{stage} {c.data} | {r.ae.name} | {res['metric']} {test:.4f} (test) | valid "
            f"{best['valid']:.4f} at epoch {best['epoch']} | {res['elapsed_s']:.0f}s")
    cleanup_distributed()
    return res


if __name__ == "__main__":
    cfg = configure(globals(), TABLES)
    with user_errors():
        train(cfg)
