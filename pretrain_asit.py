"""
ASiT pre-training (REFERENCE.md R11-R18): group masked model learning with local and global
self-distillation and reconstruction. Each clip is rolled circularly (p 0.5), two 6 s crops
are taken, each -> Kaldi fbank (128 mels, 592 frames) -> GMML corruption (zeros or pasted from
another clip); the EMA teacher sees the clean crops, the student the corrupted ones. Losses:
global (CLS, across crops) + local (patch tokens, same crop and position) + 2 x reconstruction
of the corrupted pixels. This file holds the config, the views, the heads, the losses and the
teacher-student module (ASiT's own pieces); the loop is pretrain.train.

    python pretrain_asit.py --data demo --preset tiny                       # CPU demo, ~4 min
    torchrun --nproc_per_node=8 pretrain_asit.py --data as2m                # the authors' ViT-B
    torchrun --nproc_per_node=2 pretrain_asit.py --data demo --preset tiny  # gloo on CPU

The authors' run: ViT-B, global batch 128 (4 GPUs x 32), 100 epochs of AudioSet-2M, peak lr
5e-4 x 128 / 256. Their code reads 32 kHz audio; this project uses 16 kHz (as the released
checkpoint is used). A rerun with the same --out_dir resumes from its last checkpoint.
"""
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain
from augment import gmml, random_crops, roll_shifts
from metrics import collapse_std
from model import KINDS, PATCH, Encoder, KaldiFrontEnd, ema_update, init_weights
from config import choose, configure
from plumbing import user_errors

# -------------------------------------------------------------------------------- config
# The authors' ViT-B run (R16). None = the value of the chosen PRESETS row; anything written
# here, or a flag, wins over a row.
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
model = None                # model size, ASIT_PRESETS below: tiny | small | base
drop_path = 0.1             # stochastic depth of the last student block (the teacher has none)
# data and views
seconds = 10.0              # audio read per clip, from which the crops are taken
crop_sec = None             # crop length (6 s -> 592 frames of 128 mels, 37 x 8 patches)
roll_prob = 0.5             # probability of rolling a clip circularly before cropping
zeros_min = 0.5             # zeros branch: covered share ~ U(zeros_min, zeros_max)
zeros_max = 0.7             # (upper end of the zeros branch's share)
replace_share = 0.3         # replace branch: share pasted from another clip's clean crop
replace_prob = 0.5          # probability of the replace branch, per crop
align = 1                   # corruption rectangles aligned to this many pixels (16: patches)
# optimizer: AdamW
batch_size = None           # global batch over all GPUs and accumulation steps
micro_batch = 0             # clips per GPU per forward; 0 = batch_size / GPUs
base_lr = None              # peak lr = base_lr * batch_size / 256 (lr_rule linear)
lr_rule = "linear"          # linear: scale base_lr by batch_size / 256 | none: base_lr as is
min_lr = 1e-6               # lr at the last step (cosine)
max_steps = None            # optimizer steps; 0 = derive from epochs
epochs = None               # the authors' 100: about 1.6M steps on AudioSet-2M
warmup_epochs = None        # linear lr warmup
beta1 = 0.9                 # AdamW beta1 (first-moment decay)
beta2 = 0.999               # AdamW beta2 (second-moment decay)
adam_eps = 1e-8             # AdamW eps (torch's default, as the reference)
clip_grad = 3.0             # per-tensor gradient norm clip (each parameter on its own)
wd_start = 0.04             # weight decay, cosine to wd_end (matrices, positions and CLS)
wd_end = 0.4                # weight decay at the last step
ema_m0 = None               # teacher EMA momentum (all parameters) at step 0, rising to 1
ema_ramp = "cosine"         # shape of that rise: cosine | linear
# self-distillation
teacher_temp0 = 0.04        # teacher temperature, linear to teacher_temp over the warmup
teacher_temp = 0.07         # teacher temperature after the warmup
teacher_temp_epochs = None  # epochs of the temperature warmup (changed once per epoch)
# --preset: the run defaults (base: the authors' ViT-B; tiny: the CPU demo), each with its
# model size.
PRESETS = {
    "base": dict(model="base", out_dir="out/asit_base", data="as2m", batch_size=128,
                 base_lr=5e-4, max_steps=0, epochs=100.0, warmup_epochs=10.0,
                 teacher_temp_epochs=30.0, ema_m0=0.996, crop_sec=6.0,
                 log_every=50, ckpt_every=5000),
    "small": dict(model="small", out_dir="out/asit_small", data="as2m", batch_size=128,
                  base_lr=5e-4, max_steps=0, epochs=100.0, warmup_epochs=10.0,
                  teacher_temp_epochs=30.0, ema_m0=0.996, crop_sec=6.0,
                  log_every=50, ckpt_every=5000),
    "tiny": dict(model="tiny", out_dir="out/asit_tiny", data="demo", batch_size=32,
                 base_lr=2e-3, max_steps=0, epochs=40.0, warmup_epochs=4.0,
                 teacher_temp_epochs=12.0, ema_m0=0.99, crop_sec=2.0,
                 log_every=20, ckpt_every=100),
}
TABLES, IMPLIES = dict(preset=PRESETS), dict(epochs=dict(max_steps=0))

# ---------------------------------------------------------------------- heads, losses, module
ASIT_PRESETS = {  # model args; tiny is for tests and the CPU demo
    "tiny": dict(dim=64, depth=4, heads=4, head_hidden=256, bottleneck=64, global_k=512,
                 local_k=128, recon_hidden=128),
    "small": dict(dim=384, depth=12, heads=6, head_hidden=2048, bottleneck=256,
                  global_k=8192, local_k=1024, recon_hidden=768),
    "base": dict(dim=768, depth=12, heads=12, head_hidden=2048, bottleneck=256,
                 global_k=8192, local_k=1024, recon_hidden=768),
}


class DinoHead(nn.Module):
    """One MLP shared by all tokens (D -> hidden -> hidden -> bottleneck, GELU), L2-normalised,
    then two bias-free prototype layers whose rows are unit vectors (weight normalisation with
    the norm fixed at 1, not trained): logits are cosines. Global (CLS) and local (patches)."""

    def __init__(self, dim, hidden, bottleneck, global_k, local_k):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.apply(init_weights)
        self.global_protos = nn.Linear(bottleneck, global_k, bias=False).weight  # default init
        self.local_protos = nn.Linear(bottleneck, local_k, bias=False).weight

    def forward(self, h):
        """h (B, 1+N, D) -> global logits (B, Kg), local logits (B, N, Kl), and the unit
        vectors of the CLS (B, bottleneck) for the collapse monitor. The cosines are computed
        in fp32 under autocast: the teacher divides them by 0.04, and bf16's 8-bit mantissa
        would quantise a cosine near 1 in steps of 0.004, 0.1 in the teacher's logits."""
        z = self.mlp(h)
        with torch.autocast(z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            return (F.linear(z[:, 0], F.normalize(self.global_protos, dim=-1)),
                    F.linear(z[:, 1:], F.normalize(self.local_protos, dim=-1)), z[:, 0])


class ReconHead(nn.Module):
    """Per patch token: D -> hidden -> hidden -> bottleneck (GELU after each), then a 16 x 16
    transposed convolution to one channel: each token paints its own patch."""

    def __init__(self, dim, hidden=768, bottleneck=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck), nn.GELU())
        self.apply(init_weights)
        self.deconv = nn.ConvTranspose2d(bottleneck, 1, PATCH, stride=PATCH)

    def forward(self, tokens, n_time):
        """tokens (B, N, D), time-major with n_time columns -> pixels (B, F, T)."""
        x = self.mlp(tokens).transpose(1, 2).unflatten(2, (n_time, -1))  # (B, C, nT, nF)
        return self.deconv(x)[:, 0].transpose(1, 2)                     # (B, 16 nF, 16 nT)


def dino_ce(s_logits, t_logits, center, t_temp, s_temp=0.1):
    """Mean over rows of the cross-entropy of softmax(s / s_temp) against the centred,
    sharpened teacher softmax((t - center) / t_temp) (no gradient to the teacher)."""
    t = F.softmax((t_logits.float() - center) / t_temp, dim=-1).detach()
    return -(t * F.log_softmax(s_logits.float() / s_temp, dim=-1)).sum(-1).mean()


def masked_l1(pred, target, mask):
    """L1 over the corrupted pixels only (mask = 1), pooled over the batch."""
    return ((pred.float() - target.float()).abs() * mask).sum() / mask.sum().clamp(min=1)


class ASiT(nn.Module):
    """ASiT teacher-student (R12-R15): student and teacher each hold an encoder (16 x 16
    patches, qkv biases, CLS), a DinoHead and a reconstruction head; the teacher is an EMA copy
    of all of it, sees the clean crops and has no drop-path. Inputs: two crops stacked on the
    batch axis, clean (2B, F, T), corrupted (2B, F, T) and the corruption mask (2B, F, T).

    - global: CE of the student's CLS (one crop) against the teacher's (the other), symmetric;
    - local: CE per patch token, same crop and position, teacher clean / student corrupted;
    - reconstruction: L1 on the corrupted pixels; total = global + local + 2 reconstruction.
    The teacher's logits are centred (a momentum-0.9 mean over all rows of all ranks, one
    centre per head, updated in every forward) and sharpened by teacher_temp (a per-step value
    the loop passes); the student's temperature is 0.1."""
    ckpt_kind, encoder_kind = "asit-pretrain", "asit"

    def __init__(self, dim, depth, heads, head_hidden, bottleneck, global_k, local_k,
                 recon_hidden, drop_path=0.1, student_temp=0.1, center_momentum=0.9,
                 max_tokens=KINDS["asit"].max_tokens):
        super().__init__()
        enc = dict(dim=dim, depth=depth, heads=heads,
                   **dict(KINDS["asit"].encoder_args(), max_tokens=max_tokens))
        self.encoder_args = enc
        self.student_temp, self.center_momentum = student_temp, center_momentum

        def branch(rate):
            return nn.ModuleDict(dict(
                encoder=Encoder(drop_path=rate, **enc),
                head=DinoHead(dim, head_hidden, bottleneck, global_k, local_k),
                recon=ReconHead(dim, recon_hidden)))
        self.student, self.teacher = branch(drop_path), branch(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("center_global", torch.zeros(1, global_k))
        self.register_buffer("center_local", torch.zeros(1, local_k))

    def forward(self, clean, corrupt, mask, teacher_temp=0.04):
        """Returns (loss, stats: the three losses and the teacher's entropies, detached)."""
        h = self.student.encoder(corrupt)                               # (2B, 1+N, D)
        s_g, s_l, _ = self.student.head(h)
        recon = self.student.recon(h[:, 1:], clean.shape[-1] // PATCH)
        with torch.no_grad():
            t_g, t_l, t_z = self.teacher.head(self.teacher.encoder(clean))
        t_g, t_l = t_g.float(), t_l.float().flatten(0, 1)              # (2B, Kg), (2B N, Kl)
        (s0, s1), (t0, t1) = s_g.chunk(2), t_g.chunk(2)
        ce = lambda s, t, c: dino_ce(s, t, c, teacher_temp, self.student_temp)
        loss_g = (ce(s1, t0, self.center_global) + ce(s0, t1, self.center_global)) / 2
        loss_l = ce(s_l.flatten(0, 1), t_l, self.center_local)
        loss_r = masked_l1(recon, clean, mask)
        stats = dict(loss_g=loss_g.detach(), loss_l=loss_l.detach(), loss_r=loss_r.detach(),
                     ent_g=_entropy(t_g, self.center_global, teacher_temp),
                     ent_l=_entropy(t_l, self.center_local, teacher_temp), z=t_z.float())
        self.update_centers(t_g, t_l)
        return loss_g + loss_l + 2 * loss_r, stats

    @torch.no_grad()
    def update_centers(self, t_g, t_l):
        """c <- m c + (1 - m) mean of the teacher's logits over all rows of all ranks."""
        for c, t in ((self.center_global, t_g), (self.center_local, t_l)):
            stats = torch.cat([t.sum(0), t.new_full((1,), t.shape[0])])  # no host copy
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(stats)
            c.mul_(self.center_momentum).add_(stats[:-1] / stats[-1] * (1 - self.center_momentum))

    @staticmethod
    def summarize(stats, world=1):
        """The losses and entropies averaged over ranks, and std_t: the collapse std of the
        teacher's CLS unit vectors over all rows of all ranks (about 1/sqrt(bottleneck) when
        spread; toward 0 when every clip gets the same vector, which the centring turns into
        flat teacher distributions: entropy near log K)."""
        scalars = {k: v for k, v in stats.items() if k != "z"}
        v = torch.stack(list(scalars.values())).float()
        if world > 1:
            torch.distributed.all_reduce(v)
            v /= world
        return dict(zip(scalars, v.tolist()), std_t=collapse_std(stats["z"], world))

    @torch.no_grad()
    def update_teacher(self, m):
        """EMA over all parameters: teacher <- m * teacher + (1 - m) * student."""
        ema_update(list(self.teacher.parameters()), list(self.student.parameters()), m)


@torch.no_grad()
def _entropy(t_logits, center, temp):
    """Mean entropy (nats) of the teacher's distributions: log K when flat, 0 when collapsed
    to one prototype per row (the DINO collapse monitor)."""
    p = F.softmax((t_logits - center) / temp, dim=-1)
    return -(p * p.clamp(min=1e-12).log()).sum(-1).mean()


# -------------------------------------------------------------------------------- views

class AsitViews(torch.nn.Module):
    """Waveforms -> (clean, corrupted, mask) for ASiT.forward, each (2B, 128, T): the two
    crops of every clip stacked on the batch axis (crop A of all clips, then crop B). Roll,
    crop inside the real audio (short clips zero-padded), Kaldi fbank, then GMML per crop
    (donors for the replace branch come from the same crop of other clips)."""

    def __init__(self, c):
        super().__init__()
        self.front, self.c = KaldiFrontEnd(), c
        self.n = pretrain.crop_samples(c, "crop_sec")

    def forward(self, wav, valid, g):
        c, valid = self.c, pretrain.valid_samples(wav, valid)
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
    return dict(drop_path=c.drop_path, **choose(ASIT_PRESETS, c.model, "model"))


if __name__ == "__main__":
    cfg = configure(globals(), TABLES, IMPLIES)
    c = SimpleNamespace(**cfg)
    with user_errors():
        pretrain.train(cfg, model_args(c), ASiT, AsitViews(c), schedules(c))
