"""
ATST-Clip pre-training (SPEC 3-5): two independent 6 s crops of each clip's log-mel, each
Mixup -> Random Resized Crop; the student's CLS output of one view predicts the EMA teacher's
of the other, symmetric. The loop (DDP, bf16, schedules, resume, logs) is pretrain_frame.train.

    python pretrain_clip.py --data demo --preset tiny                       # CPU demo, minutes
    torchrun --nproc_per_node=8 pretrain_clip.py --data as1.9m              # paper: base
    torchrun --nproc_per_node=8 pretrain_clip.py --preset small --data as200k

Ablations (Table II): --segments single|two, --crop_sec 1|6 (--crop_sec2 for a second segment
of another length, e.g. 9 + 6 s as the small model's code).
"""
from types import SimpleNamespace

import torch

from augment import Mixup, RandomResizedCrop, random_crops
from data import configure
from model import SAMPLE_RATE, frames_for
from pretrain_frame import train

# -------------------------------------------------------------------------------- config
# defaults = the paper's ATST-Clip base run (Table I; steps as the reference code)
# I/O
out_dir = "out/clip_base"   # checkpoints + log.jsonl; a rerun with the same dir resumes
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
seconds = 10.0              # audio read per clip, from which the segments are cropped
# optimizer (AdamW 0.9/0.999, eps 1e-6)
batch_size = 1536           # global batch over all GPUs and accumulation steps
micro_batch = 0             # clips per GPU per forward; 0 = batch_size / GPUs
base_lr = 2e-4              # peak lr = base_lr * batch_size / 256
min_lr = 1e-6               # lr at the last step (cosine)
epochs = 200.0              # used when max_steps is 0
max_steps = 318000          # optimizer steps; 0 = derive from epochs
warmup_epochs = 10.0        # linear lr warmup
wd_start = 0.04             # weight decay, cosine to wd_end (matrices only)
wd_end = 0.4
ema_m0 = 0.9995             # teacher EMA momentum, cosine to 1
# ATST-Clip views (Table II ablations)
segments = "two"            # two: independent crops | single: both views from one crop
crop_sec = 6.0              # segment length in seconds
crop_sec2 = 0.0             # length of the second segment; 0 = crop_sec
mixup_bank = 2000           # Mixup FIFO size (per rank, per segment length)
mixup_ratio = 0.4           # a ~ mixup_ratio * U(0, 1)
PRESETS = {
    "base": dict(),
    "small": dict(out_dir="out/clip_small", data="as200k", batch_size=1536, base_lr=5e-4,
                  epochs=300.0, max_steps=39100, ema_m0=0.99),
    "tiny": dict(out_dir="out/clip_tiny", data="demo", batch_size=32, base_lr=4e-3,
                 epochs=40.0, max_steps=0, warmup_epochs=4.0, ema_m0=0.99, mixup_bank=256,
                 num_workers=2, log_every=20, ckpt_every=100),
}

def clip_views(c):
    """ATST-Clip views from config `c`: two segments (or one, twice), each Mixup -> RRC. No
    mask and no padding mask: RRC rescales time, and short clips were zero-padded to the
    segment as in the reference. Returns (make_views, stateful augmentations)."""
    n1 = frames_for(int(c.crop_sec * SAMPLE_RATE))  # mel frames of a segment (6 s -> 601)
    n2 = frames_for(int((c.crop_sec2 or c.crop_sec) * SAMPLE_RATE))
    assert c.segments in ("two", "single"), c.segments
    assert c.segments == "two" or n1 == n2, "a single segment gives two views of one length"
    mixups = torch.nn.ModuleDict({str(n): Mixup(c.mixup_bank, c.mixup_ratio) for n in {n1, n2}})
    rrc = RandomResizedCrop()

    def make_views(mel, n_valid, g):
        a = random_crops(mel, n1, g)
        b = random_crops(mel, n2, g) if c.segments == "two" else a
        v1, v2 = rrc(mixups[str(n1)](a, g), g), rrc(mixups[str(n2)](b, g), g)
        mixups[str(n1)].push(a)
        if c.segments == "two":
            mixups[str(n2)].push(b)
        return v1, v2, None, None

    return make_views, mixups


if __name__ == "__main__":
    cfg = configure(globals(), PRESETS)
    train(cfg, "clip", *clip_views(SimpleNamespace(**cfg)))
