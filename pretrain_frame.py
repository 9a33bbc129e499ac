"""
ATST-Frame pre-training (REFERENCE.md R3-R5): one 10 s crop per clip; view 1 clean, view 2 Mixup ->
frequency warp; one group mask per clip shared by both views; the student sees each view
masked, the EMA teacher the other view unmasked; BYOL loss on the masked frames, symmetric.
This file holds the config and the views; the loop is pretrain.train.

    python pretrain_frame.py --data demo --preset tiny                      # CPU demo, minutes
    torchrun --nproc_per_node=8 pretrain_frame.py --data as1.9m             # paper: base
    torchrun --nproc_per_node=8 pretrain_frame.py --preset small --data as200k
    torchrun --nproc_per_node=2 pretrain_frame.py --data demo --preset tiny # gloo on CPU

A rerun with the same --out_dir resumes from its last checkpoint. Ablations (Table III):
--aug_views 0|1|2, --mask_teacher true, --mask_mode random.
"""
from types import SimpleNamespace

import torch

import pretrain
from augment import FreqWarp, Mixup, group_mask
from model import ATST, FRAMES_PER_TOKEN, PRESETS as MODEL_PRESETS, MelFrontEnd, tokens_for
from config import choose, configure
from plumbing import user_errors

# -------------------------------------------------------------------------------- config
# The paper's ATST-Frame runs (Table I; steps as the reference code). None = the value of the
# chosen PRESETS row (or MASK_MODES row); anything written here, or a flag, wins over a row.
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
seconds = 10.0              # crop length per clip (shorter clips are zero-padded)
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
# ATST-Frame views and masking (Table III ablations)
aug_views = 1               # 0: none, 1: view 2 augmented (D, the paper), 2: both (E)
mask_teacher = False        # the teacher is masked too (config C)
mask_mode = "group"         # group: spans of mask_span tokens | random: single tokens (config B)
mask_span = None            # tokens per span (MASK_MODES: group 5, random 1)
mask_prob = None            # group: span starts per token x span; random: share masked
mixup_bank = None           # Mixup FIFO size (per rank)
mixup_ratio = 0.4           # a ~ mixup_ratio * U(0, 1)
freq_warp = "code"          # code: h = U(0.6,1.5)*F clipped | paper: h ~ U[0.6F, F]
# --preset: the run defaults of Table I (base: the paper's model; small: Table III's ablations
# on AS-200K; tiny: the CPU demo), each with its model size.
PRESETS = {
    "base": dict(model="base", out_dir="out/frame_base", data="as1.9m", batch_size=864,
                 base_lr=8e-5, max_steps=398000, epochs=200.0, warmup_epochs=10.0,
                 ema_m0=0.9996, mixup_bank=2000, log_every=50, ckpt_every=2000),
    "small": dict(model="small", out_dir="out/frame_small", data="as200k", batch_size=1024,
                  base_lr=4e-4, max_steps=58500, epochs=300.0, warmup_epochs=10.0,
                  ema_m0=0.997, mixup_bank=2000, log_every=50, ckpt_every=2000),
    "tiny": dict(model="tiny", out_dir="out/frame_tiny", data="demo", batch_size=32,
                 base_lr=4e-3, max_steps=0, epochs=40.0, warmup_epochs=4.0, ema_m0=0.99,
                 mixup_bank=256, log_every=20, ckpt_every=100),
}
# --mask_mode: group masking (the method) or random single tokens at the same 50% share
MASK_MODES = {"group": dict(mask_span=5, mask_prob=0.65),
              "random": dict(mask_span=1, mask_prob=0.5)}
TABLES, IMPLIES = dict(preset=PRESETS, mask_mode=MASK_MODES), dict(epochs=dict(max_steps=0))


class FrameViews(torch.nn.Module):
    """Waveforms -> (view 1, view 2, mask, valid tokens) for ATST.forward: log-mel on the
    device; view 1 clean and view 2 Mixup -> frequency warp (aug_views 1), both augmented (2)
    or neither (0); one mask per clip shared by both views. Valid tokens are None when every
    clip is whole (valid None): the encoders then attend without a padding mask."""

    def __init__(self, c):
        super().__init__()
        assert c.mask_mode in MASK_MODES and c.aug_views in (0, 1, 2), (c.mask_mode, c.aug_views)
        self.front = MelFrontEnd()
        self.mixup, self.warp = Mixup(c.mixup_bank, c.mixup_ratio), FreqWarp(c.freq_warp)
        self.aug_views, self.span, self.prob = c.aug_views, c.mask_span, c.mask_prob

    def forward(self, wav, valid, g):
        mel = self.front(wav)                                        # (B, F, T)
        n_valid = tokens_for(pretrain.valid_samples(wav, valid))     # (B,)
        mask = group_mask(n_valid, mel.shape[-1] // FRAMES_PER_TOKEN, self.span, self.prob, g)
        aug = lambda x: self.warp(self.mixup(x, g), g)
        v1 = aug(mel) if self.aug_views == 2 else mel
        v2 = aug(mel) if self.aug_views >= 1 else mel
        self.mixup.push(mel)
        return v1, v2, mask, None if valid is None else n_valid


def model_args(c):
    return dict(method="frame", drop_path=c.drop_path, teacher_drop_path=c.teacher_drop_path,
                mask_teacher=c.mask_teacher, **choose(MODEL_PRESETS, c.model, "model"))


if __name__ == "__main__":
    cfg = configure(globals(), TABLES, IMPLIES)
    c = SimpleNamespace(**cfg)
    with user_errors():
        pretrain.train(cfg, model_args(c), ATST, FrameViews(c))
