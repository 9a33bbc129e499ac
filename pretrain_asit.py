"""
ASiT pre-training (../shared/SPEC_ASIT.md): group masked model learning with local and global
self-distillation and reconstruction. Each clip is rolled circularly (p 0.5), two 6 s crops
are taken, each -> Kaldi fbank (128 mels, 592 frames) -> GMML corruption (zeros or pasted from
another clip); the EMA teacher sees the clean crops, the student the corrupted ones. Losses:
global (CLS, across crops) + local (patch tokens, same crop and position) + 2 x reconstruction
of the corrupted pixels. This file holds the config and the views; the loop is pretrain.train.

    python pretrain_asit.py --data demo --preset tiny                       # CPU demo, ~4 min
    torchrun --nproc_per_node=8 pretrain_asit.py --data as2m                # the authors' ViT-B
    torchrun --nproc_per_node=2 pretrain_asit.py --data demo --preset tiny  # gloo on CPU

The authors' run: ViT-B, global batch 128 (4 GPUs x 32), 100 epochs of AudioSet-2M, peak lr
5e-4 x 128 / 256. Their code reads 32 kHz audio; this project uses 16 kHz (as the released
checkpoint is used). A rerun with the same --out_dir resumes from its last checkpoint.
"""
from types import SimpleNamespace

import torch

import pretrain
from augment import gmml, random_crops, roll_shifts
from model import ASIT_PRESETS, ASiT, KaldiFrontEnd, SAMPLE_RATE
from plumbing import configure, user_errors

# -------------------------------------------------------------------------------- config
# defaults = the authors' ViT-B run (SPEC_ASIT 6)
# I/O
out_dir = "out/asit_base"   # checkpoints + log.jsonl; a rerun with the same dir resumes
data = "as2m"               # named dataset, demo, or a CSV manifest (column `path`)
data_root = ""              # root of named datasets; '' = $ATST_DATA or ./data
log_every = 50              # steps between log lines
ckpt_every = 5000           # steps between checkpoints (and always at the end)
num_workers = 8             # DataLoader workers per rank (they only read and crop audio)
device = "auto"             # auto (CUDA if torch sees it) | cpu | cuda (an error without CUDA)
dtype = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (CPU too) | fp32
seed = 0                    # every random draw of a step derives from (seed, step, rank)
# model
preset = "base"             # tiny | small | base (model size; also sets the run defaults)
drop_path = 0.1             # stochastic depth of the last student block (the teacher has none)
# data and views
seconds = 10.0              # audio read per clip, from which the crops are taken
crop_sec = 6.0              # crop length (6 s -> 592 frames of 128 mels, 37 x 8 patches)
roll_prob = 0.5             # probability of rolling a clip circularly before cropping
zeros_min = 0.5             # zeros branch: covered share ~ U(zeros_min, zeros_max)
zeros_max = 0.7             # (upper end of the zeros branch's share)
replace_share = 0.3         # replace branch: share pasted from another clip's clean crop
replace_prob = 0.5          # probability of the replace branch, per crop
align = 1                   # corruption rectangles aligned to this many pixels (16: patches)
# optimizer (AdamW 0.9/0.999)
batch_size = 128            # global batch over all GPUs and accumulation steps
micro_batch = 0             # clips per GPU per forward; 0 = batch_size / GPUs
base_lr = 5e-4              # peak lr = base_lr * batch_size / 256
min_lr = 1e-6               # lr at the last step (cosine)
max_steps = 0               # optimizer steps; 0 = derive from epochs
epochs = 100.0              # the authors' (about 1.6M steps on AudioSet-2M)
warmup_epochs = 10.0        # linear lr warmup
adam_eps = 1e-8             # AdamW eps (torch's default, as the reference)
clip_grad = 3.0             # per-tensor gradient norm clip (each parameter on its own)
wd_start = 0.04             # weight decay, cosine to wd_end (matrices, positions and CLS)
wd_end = 0.4                # weight decay at the last step
ema_m0 = 0.996              # teacher EMA momentum (all parameters), cosine to 1
# self-distillation
teacher_temp0 = 0.04        # teacher temperature, linear to teacher_temp over the warmup
teacher_temp = 0.07         # teacher temperature after the warmup
teacher_temp_epochs = 30.0  # epochs of the temperature warmup (changed once per epoch)
# --preset: model size (model.ASIT_PRESETS) and run defaults. Every row lists the same names;
# the first repeats the block above, so an edited global wins over any row.
PRESETS = {
    "base": dict(out_dir="out/asit_base", data="as2m", batch_size=128, base_lr=5e-4,
                 max_steps=0, epochs=100.0, warmup_epochs=10.0, teacher_temp_epochs=30.0,
                 ema_m0=0.996, crop_sec=6.0, num_workers=8, log_every=50, ckpt_every=5000),
    "small": dict(out_dir="out/asit_small", data="as2m", batch_size=128, base_lr=5e-4,
                  max_steps=0, epochs=100.0, warmup_epochs=10.0, teacher_temp_epochs=30.0,
                  ema_m0=0.996, crop_sec=6.0, num_workers=8, log_every=50, ckpt_every=5000),
    "tiny": dict(out_dir="out/asit_tiny", data="demo", batch_size=32, base_lr=2e-3,
                 max_steps=0, epochs=40.0, warmup_epochs=4.0, teacher_temp_epochs=12.0,
                 ema_m0=0.99, crop_sec=2.0, num_workers=2, log_every=20, ckpt_every=100),
}


class AsitViews(torch.nn.Module):
    """Waveforms -> (clean, corrupted, mask) for ASiT.forward, each (2B, 128, T): the two
    crops of every clip stacked on the batch axis (crop A of all clips, then crop B). Roll,
    crop inside the real audio (short clips zero-padded), Kaldi fbank, then GMML per crop
    (donors for the replace branch come from the same crop of other clips)."""

    def __init__(self, c):
        super().__init__()
        self.front, self.c = KaldiFrontEnd(), c
        self.n = int(c.crop_sec * SAMPLE_RATE)

    def forward(self, wav, valid, g):
        c = self.c
        shift = roll_shifts(valid, g, c.roll_prob)
        clean = torch.cat([self.front(random_crops(wav, self.n, valid, g, shift))
                           for _ in range(2)])
        corrupt, mask = zip(*(gmml(x, g, c.replace_prob, (c.zeros_min, c.zeros_max),
                                   c.replace_share, align=c.align) for x in clean.chunk(2)))
        return clean, torch.cat(corrupt), torch.cat(mask)


def schedules(c):
    """The teacher temperature per step: linear from teacher_temp0 to teacher_temp over
    teacher_temp_epochs, changed once per epoch as the reference, then constant."""
    def make(total, per_epoch):
        epoch = torch.arange(total + 1, dtype=torch.float64) // per_epoch
        ramp = (epoch / max(c.teacher_temp_epochs - 1, 1)).clamp(max=1)
        return dict(teacher_temp=c.teacher_temp0 + (c.teacher_temp - c.teacher_temp0) * ramp)
    return make


def model_args(c):
    return dict(drop_path=c.drop_path, **ASIT_PRESETS[c.preset])


if __name__ == "__main__":
    cfg = configure(globals(), dict(preset=PRESETS), implies=dict(epochs=dict(max_steps=0)))
    c = SimpleNamespace(**cfg)
    with user_errors():
        pretrain.train(cfg, model_args(c), ASiT, AsitViews(c), schedules(c))
