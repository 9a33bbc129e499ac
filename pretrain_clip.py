"""
ATST-Clip pre-training (REFERENCE.md R3-R5): two independent 6 s crops of each clip, each
log-mel -> Mixup -> Random Resized Crop; the student's CLS output of one view predicts the EMA
teacher's of the other, symmetric. This file holds the config and the views; the loop is
pretrain.train.

    python pretrain_clip.py --data demo --preset tiny                       # CPU demo, minutes
    torchrun --nproc_per_node=8 pretrain_clip.py --data as1.9m              # paper: base
    torchrun --nproc_per_node=8 pretrain_clip.py --preset small --data as200k

Ablations (Table II): --segments single|two, --crop_sec 1|6 (--crop_sec2 for a second segment
of another length, e.g. 9 + 6 s as the small model's code).
"""
from types import SimpleNamespace

import torch

import pretrain
from augment import Mixup, RandomResizedCrop, random_crops
from model import ATST, PRESETS as MODEL_PRESETS, MelFrontEnd, frames_for
from config import choose, configure
from plumbing import UserError, user_errors

# -------------------------------------------------------------------------------- config
# The paper's ATST-Clip runs (Table I; steps as the reference code). None = the value of the
# chosen PRESETS row; anything written here, or a flag, wins over a row.
# I/O
out_dir = None              # checkpoints + log.jsonl; a rerun with the same dir resumes
data = None                 # named dataset, demo, or a CSV manifest (column `path`)
data_root = ""              # root of named datasets; '' = $ATST_DATA or ./data
log_every = None            # steps between log lines
ckpt_every = None           # steps between checkpoints (and always at the end)
num_workers = -1            # DataLoader workers per rank (read, crop); -1: CPUs / ranks here - 1
device = "auto"             # auto (CUDA if torch sees it) | cpu | cuda (an error without CUDA)
dtype = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (CPU too) | fp32
compile = False             # torch.compile the encoders (off until measured on a GPU)
seed = 0                    # every random draw of a step derives from (seed, step, rank)
# model
preset = "base"             # run defaults, a PRESETS row: base | small | tiny (the CPU demo)
model = None                # model size, model.PRESETS: tiny | small | base
drop_path = 0.1             # stochastic depth of the last student block (linear from 0)
teacher_drop_path = True    # teacher has the student's drop-path (reference); false: none
# data
seconds = 10.0              # audio read per clip, from which the segments are cropped
# optimizer: AdamW
batch_size = None           # global batch over all GPUs and accumulation steps
micro_batch = 0             # clips per GPU per forward; 0 = batch_size / GPUs
base_lr = None              # peak lr = base_lr * batch_size / 256 (lr_rule linear)
lr_rule = "linear"          # linear: scale base_lr by batch_size / 256 | none: base_lr as is
min_lr = 1e-6               # lr at the last step (cosine)
max_steps = None            # optimizer steps (the reference's); 0 = derive from epochs
epochs = None               # setting it (edit or flag) sets max_steps to 0
warmup_epochs = None        # linear lr warmup
beta1 = 0.9                 # AdamW beta1 (first-moment decay)
beta2 = 0.999               # AdamW beta2 (second-moment decay)
adam_eps = 1e-6             # AdamW eps
clip_grad = 0.0             # per-tensor gradient norm clip; 0 = none (R3)
wd_start = 0.04             # weight decay, cosine to wd_end (matrices only)
wd_end = 0.4                # weight decay at the last step
ema_m0 = None               # teacher EMA momentum at step 0, rising to 1
ema_ramp = "cosine"         # shape of that rise: cosine | linear
# ATST-Clip views (Table II ablations)
segments = "two"            # two: independent crops | single: both views from one crop
crop_sec = 6.0              # segment length in seconds
crop_sec2 = 0.0             # length of the second segment; 0 = crop_sec
mixup_bank = None           # Mixup FIFO size (per rank, per segment length)
mixup_ratio = 0.4           # a ~ mixup_ratio * U(0, 1)
# --preset: the run defaults of Table I (base: the paper's model; small: Table II's ablations
# on AS-200K; tiny: the CPU demo), each with its model size.
PRESETS = {
    "base": dict(model="base", out_dir="out/clip_base", data="as1.9m", batch_size=1536,
                 base_lr=2e-4, max_steps=318000, epochs=200.0, warmup_epochs=10.0,
                 ema_m0=0.9995, mixup_bank=2000, log_every=50, ckpt_every=2000),
    "small": dict(model="small", out_dir="out/clip_small", data="as200k", batch_size=1536,
                  base_lr=5e-4, max_steps=39100, epochs=300.0, warmup_epochs=10.0, ema_m0=0.99,
                  mixup_bank=2000, log_every=50, ckpt_every=2000),
    "tiny": dict(model="tiny", out_dir="out/clip_tiny", data="demo", batch_size=32,
                 base_lr=4e-3, max_steps=0, epochs=40.0, warmup_epochs=4.0, ema_m0=0.99,
                 mixup_bank=256, log_every=20, ckpt_every=100),
}
TABLES, IMPLIES = dict(preset=PRESETS), dict(epochs=dict(max_steps=0))


class ClipViews(torch.nn.Module):
    """Waveforms -> (view 1, view 2, None, None) for ATST.forward: two segments (or one,
    twice) cropped from the waveform inside each clip's real audio (clips shorter than a
    segment are zero-padded to it, as the reference), each -> log-mel -> Mixup -> RRC. No
    mask, no padding mask: RRC rescales time."""

    def __init__(self, c):
        super().__init__()
        assert c.segments in ("two", "single"), c.segments
        self.two = c.segments == "two"
        self.n = [pretrain.crop_samples(c, f) for f in ("crop_sec", "crop_sec2" if c.crop_sec2
                                                         else "crop_sec")]
        if not self.two and self.n[0] != self.n[1]:
            raise UserError("--segments single gives two views of one crop: leave --crop_sec2 "
                            "at 0")
        self.front, self.rrc = MelFrontEnd(), RandomResizedCrop()
        self.mixups = torch.nn.ModuleDict({str(frames_for(n)): Mixup(c.mixup_bank, c.mixup_ratio)
                                           for n in self.n})

    def forward(self, wav, valid, g):
        a = self.front(random_crops(wav, self.n[0], valid, g))       # (B, F, T1)
        b = self.front(random_crops(wav, self.n[1], valid, g)) if self.two else a
        mix_a, mix_b = self.mixups[str(a.shape[-1])], self.mixups[str(b.shape[-1])]
        v1, v2 = self.rrc(mix_a(a, g), g), self.rrc(mix_b(b, g), g)
        mix_a.push(a)
        if self.two:
            mix_b.push(b)
        return v1, v2, None, None


def model_args(c):
    return dict(method="clip", drop_path=c.drop_path, teacher_drop_path=c.teacher_drop_path,
                **choose(MODEL_PRESETS, c.model, "model"))


if __name__ == "__main__":
    cfg = configure(globals(), TABLES, IMPLIES)
    c = SimpleNamespace(**cfg)
    with user_errors():
        pretrain.train(cfg, model_args(c), ATST, ClipViews(c))
