"""
Everything with parameters, shared by every stage: the mel and Kaldi front-ends, the Encoder,
the BYOL teacher-student pair for ATST-Clip and ATST-Frame, ASiT's heads and teacher-student,
EMA, parameter groups, the embedding API (all three kinds) and checkpoint loading, the
downstream heads. Numbers come from ../shared/SPEC.md and SPEC_ASIT.md (section numbers in
comments); group masking and the augmentations are in augment.py.

How the Encoder differs from a vanilla ViT:
- tokens are 4 mel frames x 64 mel bins (40 ms each, mel-major flattening), not 2-D patches;
- positions are a learned table of 250 token slots (10 s) plus one CLS slot, cut (never
  interpolated) to the input length; longer inputs must be chunked by the caller;
- a learned mask token replaces the token embedding of masked tokens *before* positions are
  added, and masked tokens stay in the sequence (ATST-Frame);
- padded batches carry valid lengths, turned into a key-padding mask for attention;
- the same final LayerNorm is applied to every block output that is read.
"""
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from metrics import collapse_std
from plumbing import UserError, autocast, load_checkpoint

# ----------------------------------------------------------------------------------------------
# Front-end (SPEC 1)

SAMPLE_RATE = 16000
HOP = 160              # 10 ms mel hop
FRAMES_PER_TOKEN = 4   # 4 frames -> one 40 ms token
N_MELS = 64
TOKEN_S = HOP * FRAMES_PER_TOKEN / SAMPLE_RATE  # 0.04 s: one encoder token (40 ms)
DB_MIN, DB_MAX = -79.6482, 50.6842  # fixed min-max of the released models
PATCH = 16                             # ASiT: 16 frames x 16 mel bins per token (160 ms)
ASIT_MELS, ASIT_MEAN, ASIT_STD = 128, -4.2677393, 4.5689974  # AST's AudioSet statistics


def frames_for(samples):
    """Mel frames produced by center=True STFT for `samples` samples (tensor or int)."""
    return samples // HOP + 1


def tokens_for(samples):
    """Encoder tokens for `samples` samples: trailing T mod 4 frames are dropped."""
    return frames_for(samples) // FRAMES_PER_TOKEN


def kaldi_frames_for(samples):
    """Kaldi fbank frames (25 ms every 10 ms, snip_edges) in `samples` samples (>= 400)."""
    return (samples - 400) // HOP + 1


class MelFrontEnd(nn.Module):
    """Waveform (B, S) at 16 kHz -> normalised log-mel (B, F=64, T = S // 160 + 1), batched on
    the device, always in fp32 (outside autocast).

    Without `lengths` every clip is taken as S samples long (pre-training zero-pads, as the
    reference did). With `lengths` (valid samples per clip of a padded batch) each clip's
    padding starts with the reflection of its end, as center=True STFT pads an unpadded clip,
    and the top-dB floor is taken over its valid frames only: the valid frames come out as
    they would for the clip alone. Frames past a clip's valid length are not silence; the
    Encoder masks them out of attention through n_valid.
    """

    def __init__(self):
        super().__init__()
        self.n_fft = 1024
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=self.n_fft, win_length=1024, hop_length=HOP,
            f_min=60, f_max=7800, n_mels=N_MELS)  # Hann, power 2, center, HTK, no norm

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, wav, lengths=None):
        wav = wav.float()
        B, S = wav.shape
        T = frames_for(S)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=wav.device)
            half = self.n_fft // 2
            wav = F.pad(wav, (0, half))                              # room for every tail
            idx = torch.arange(S + half, device=wav.device)
            src = 2 * lengths[:, None] - 2 - idx                     # reflect about the end
            tail = (idx >= lengths[:, None]) & (idx < lengths[:, None] + half)
            wav = torch.where(tail & (src >= 0), wav.gather(1, src.clamp(0, S - 1)), wav * ~tail)
        x = self.mel(wav)[..., :T]                                   # (B, F, T)
        x = 10 * torch.log10(x.clamp(min=1e-10))                    # power -> dB
        top = x if lengths is None else x.masked_fill(
            torch.arange(T, device=x.device) >= frames_for(lengths)[:, None, None], -torch.inf)
        # top_db=80 per clip, as the reference computed it clip by clip (torchaudio's
        # AmplitudeToDB on a 3-D batch would share one floor across the batch)
        x = torch.maximum(x, top.amax(dim=(1, 2), keepdim=True) - 80)
        return (x - DB_MIN) / (DB_MAX - DB_MIN) * 2 - 1

class KaldiFrontEnd(nn.Module):
    """ASiT's front-end (SPEC_ASIT 1), batched on the device: waveform (B, S) at 16 kHz ->
    (B, F=128, T) normalised log-mel, T cut to a multiple of 16 (6 s -> 598 -> 592 frames).
    Per clip it equals torchaudio.compliance.kaldi.fbank(wav - wav.mean(), htk_compat=True,
    use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    then (x - mean) / (2 std): 25 ms frames every 10 ms (snip_edges), per-frame DC removal,
    preemphasis 0.97, Hann window, 512-point FFT, power, mel banks 20 Hz - Nyquist, log with
    an epsilon floor. Digital silence comes out near -1.278. Always fp32."""

    def __init__(self, n_mels=ASIT_MELS):
        super().__init__()
        self.win, self.shift, self.n_fft = 400, HOP, 512
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
            n_mels, self.n_fft, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
        self.register_buffer("banks", F.pad(banks, (0, 1)), persistent=False)  # (M, 257)
        self.register_buffer("window", torch.hann_window(self.win, periodic=False),
                             persistent=False)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, wav, lengths=None):
        """lengths: valid samples per clip of a padded batch; each clip's mean is taken over
        them, so its valid frames (those inside its samples) come out as for the clip alone."""
        wav = wav.float()
        if lengths is None:
            mean = wav.mean(-1, keepdim=True)
        else:
            lengths = torch.as_tensor(lengths, device=wav.device)[:, None]
            inside = torch.arange(wav.shape[-1], device=wav.device) < lengths
            mean = (wav * inside).sum(-1, keepdim=True) / lengths.clamp(min=1)
        wav = wav - mean                                               # the clip's mean
        x = wav.unfold(-1, self.win, self.shift)                      # (B, T, 400) frames
        x = x - x.mean(-1, keepdim=True)                              # per-frame DC
        x = x - 0.97 * torch.cat([x[..., :1], x[..., :-1]], -1)        # preemphasis
        x = F.pad(x * self.window, (0, self.n_fft - self.win))
        power = torch.fft.rfft(x).abs().pow(2)                        # (B, T, 257)
        fbank = (power @ self.banks.T).clamp(min=torch.finfo(torch.float32).eps).log()
        T = fbank.shape[1] // PATCH * PATCH
        return ((fbank[:, :T] - ASIT_MEAN) / (2 * ASIT_STD)).transpose(1, 2)  # (B, M, T)

# ----------------------------------------------------------------------------------------------
# Encoder (SPEC 2)

PRESETS = {  # model args; tiny is for tests and the CPU demo
    "tiny": dict(dim=64, depth=4, heads=4, proj_hidden=512, proj_dim=128),
    "small": dict(dim=384, depth=12, heads=6, proj_hidden=4096, proj_dim=256),
    "base": dict(dim=768, depth=12, heads=12, proj_hidden=4096, proj_dim=256),
}
MAX_TOKENS = 250  # 10 s of 40 ms tokens: the positional table


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples (uses the global RNG)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)

    def extra_repr(self):
        return f"p={self.p:.3f}"


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, drop_path, qkv_bias=False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    """One encoder for every stage. cls_token: ATST-Clip, ASiT; mask_token: ATST-Frame.
    tokens="atst": 4 frames x 64 mels per token (40 ms); "patch16": ASiT's 16 x 16 patches of
    a 128-mel input, time-major (160 ms per time column), with qkv biases."""

    def __init__(self, dim=768, depth=12, heads=12, drop_path=0.1, cls_token=False,
                 mask_token=False, max_tokens=MAX_TOKENS, tokens="atst", qkv_bias=False):
        super().__init__()
        assert tokens in ("atst", "patch16"), tokens
        self.dim, self.depth, self.max_tokens, self.tokens = dim, depth, max_tokens, tokens
        self.args = dict(dim=dim, depth=depth, heads=heads, cls_token=cls_token,
                         mask_token=mask_token, max_tokens=max_tokens, tokens=tokens,
                         qkv_bias=qkv_bias)  # saved with checkpoints
        self.patch_embed = nn.Linear(N_MELS * FRAMES_PER_TOKEN, dim)  # = PATCH * PATCH values
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + max_tokens, dim))  # slot 0: CLS
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, r, qkv_bias) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_weights)
        if tokens == "patch16":  # ASiT's Conv2d patch embedding keeps PyTorch's default init
            self.patch_embed.reset_parameters()
        for p in (self.pos_embed, self.cls_token, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def tokenize(self, mel):
        """(B, F, T) -> (B, N, 256) token inputs in sequence order. atst: token n = frames
        4n..4n+3 of all 64 mels, flattened mel-major (mel * 4 + offset); patch16: 16 x 16
        patches, time-major (token k = time block k // (F / 16), mel block k % (F / 16)),
        flattened (time offset, mel offset) as Conv2d(1, D, 16, 16) weights reshaped to
        (D, 256). Trailing frames that fill no token are dropped."""
        B, Fm, T = mel.shape
        if self.tokens == "atst":
            N = T // FRAMES_PER_TOKEN
            x = mel[:, :, :N * FRAMES_PER_TOKEN].reshape(B, Fm, N, FRAMES_PER_TOKEN)
            return x.permute(0, 2, 1, 3).reshape(B, N, Fm * FRAMES_PER_TOKEN)
        nT, nF = T // PATCH, Fm // PATCH
        x = mel[:, :, :nT * PATCH].reshape(B, nF, PATCH, nT, PATCH)   # (B, nF, f, nT, t)
        return x.permute(0, 3, 1, 4, 2).reshape(B, nT * nF, PATCH * PATCH)

    def forward(self, mel, n_valid=None, mask=None, layers=None):
        """mel (B, F, T) -> (B, [1+]N, D) after the final norm (N tokens, see tokenize).

        n_valid: (B,) valid tokens per clip, or None when nothing is padded.
        mask: (B, N) bool, True = replace by the mask token.
        layers: block indices to return (a list of (B, [1+]N, D), each after the final norm).
        """
        x = self.patch_embed(self.tokenize(mel))                         # (B, N, D)
        B, N, _ = x.shape
        if N > self.max_tokens:
            raise ValueError(f"input has {N} tokens but the positional table holds "
                             f"{self.max_tokens}: chunk long audio before encoding")
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed[:, 1:N + 1]
        keep = None
        if n_valid is not None:
            keep = torch.arange(N, device=x.device) < n_valid.to(x.device).unsqueeze(1)  # (B, N)
        if self.cls_token is not None:
            x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], 1)
            if keep is not None:
                keep = F.pad(keep, (1, 0), value=True)
        attn_mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, L) keys
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, attn_mask)
            if layers is not None and i in layers:
                outs.append(self.norm(x))
        return outs if layers is not None else self.norm(x)


def set_drop_path(encoder, rate):
    """Stochastic depth rising linearly from 0 (first block) to `rate` (last block)."""
    for blk, r in zip(encoder.blocks, torch.linspace(0, rate, encoder.depth).tolist()):
        blk.drop_path.p = r


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

# ----------------------------------------------------------------------------------------------
# Teacher-student (SPEC 3)


def mlp_head(dim_in, hidden, dim_out):
    """BYOL projector / predictor: Linear -> BN -> ReLU -> Linear (no biases)."""
    return nn.Sequential(nn.Linear(dim_in, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, dim_out, bias=False))


def byol_loss(q, z):
    """Mean over rows of 2 - 2 cos(q, z) (squared distance of L2-normalised vectors)."""
    return (2 - 2 * F.cosine_similarity(q.float(), z.float(), dim=-1)).mean()


class ATST(nn.Module):
    """Student (encoder, projector, predictor) and EMA teacher (encoder, projector), as the
    reference code trains them (SPEC 3):

    - method 'clip': rows are the CLS outputs of the two views; 'frame': rows are the masked
      tokens, and the teacher sees the view unmasked (or masked too, mask_teacher=True, Table
      III config C) and is read at the same positions;
    - the rows of both views go through the projector (and predictor) as one batch, so
      BatchNorm normalises them together;
    - the teacher runs in train mode like the student: batch statistics in its BatchNorm and,
      with teacher_drop_path (the default), the student's stochastic depth (0 -> drop_path
      over blocks); teacher_drop_path=False gives it none (as DINO's teacher);
    - the loss is the mean of the two symmetric terms (the paper writes their sum).
    forward returns (loss, stats); summarize(stats) gives the collapse monitors.
    """
    ckpt_kind = "atst-pretrain"

    def __init__(self, method, dim, depth, heads, proj_hidden, proj_dim, drop_path=0.1,
                 mask_teacher=False, teacher_drop_path=True):
        super().__init__()
        assert method in ("clip", "frame"), method
        self.method, self.mask_teacher = method, mask_teacher
        enc = dict(dim=dim, depth=depth, heads=heads, cls_token=method == "clip",
                   mask_token=method == "frame")
        self.encoder_args = enc
        self.student = nn.ModuleDict(dict(encoder=Encoder(drop_path=drop_path, **enc),
                                          projector=mlp_head(dim, proj_hidden, proj_dim)))
        self.predictor = mlp_head(proj_dim, proj_hidden, proj_dim)
        self.teacher = nn.ModuleDict(dict(
            encoder=Encoder(drop_path=drop_path if teacher_drop_path else 0.0, **enc),
            projector=mlp_head(dim, proj_hidden, proj_dim)))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def forward(self, v1, v2, mask=None, n_valid=None):
        """v1, v2: log-mel views (B, F, T); mask (B, N) and n_valid (B,) for 'frame'.
        Returns (loss, stats: L2-normalised student and teacher rows, detached)."""
        if self.method == "frame":
            rows = lambda h: h[mask]                       # (B, N, D) -> (masked tokens, D)
            s_mask, t_mask = mask, mask if self.mask_teacher else None
        else:
            rows = lambda h: h[:, 0]                       # CLS: (B, D)
            s_mask = t_mask = n_valid = None
        h1, h2 = self._encode(self.student.encoder, v1, v2, n_valid, s_mask)
        q = self.predictor(self.student.projector(torch.cat([rows(h1), rows(h2)])))
        with torch.no_grad():
            t1, t2 = self._encode(self.teacher.encoder, v1, v2, n_valid, t_mask)
            z = self.teacher.projector(torch.cat([rows(t1), rows(t2)]))
        (q1, q2), (z1, z2) = q.chunk(2), z.chunk(2)       # both views hold as many rows
        loss = (byol_loss(q1, z2) + byol_loss(q2, z1)) / 2
        unit = lambda x: F.normalize(x.detach().float(), dim=-1)
        return loss, dict(s=unit(q), t=unit(z))

    @staticmethod
    def summarize(stats, world=1):
        """Collapse monitors of the student (predictor) and teacher (projector) rows."""
        return dict(std_s=collapse_std(stats["s"], world), std_t=collapse_std(stats["t"], world))

    @staticmethod
    def _encode(encoder, v1, v2, n_valid=None, mask=None):
        """Both views through one encoder call when their shapes match (one big batch)."""
        if v1.shape != v2.shape:
            return encoder(v1, n_valid, mask), encoder(v2, n_valid, mask)
        rep = lambda t: None if t is None else torch.cat([t, t])
        return encoder(torch.cat([v1, v2]), rep(n_valid), rep(mask)).chunk(2)

    @torch.no_grad()
    def update_teacher(self, m):
        """EMA: teacher <- m * teacher + (1 - m) * student (parameters only)."""
        ema_update(list(self.teacher.parameters()), list(self.student.parameters()), m)


# ----------------------------------------------------------------------------------------------
# ASiT: group masked model learning with local and global self-distillation (SPEC_ASIT 2-5)

ASIT_PRESETS = {  # model args; tiny is for tests and the CPU demo
    "tiny": dict(dim=64, depth=4, heads=4, head_hidden=256, bottleneck=64, global_k=512,
                 local_k=128, recon_hidden=128),
    "small": dict(dim=384, depth=12, heads=6, head_hidden=2048, bottleneck=256,
                  global_k=8192, local_k=1024, recon_hidden=768),
    "base": dict(dim=768, depth=12, heads=12, head_hidden=2048, bottleneck=256,
                 global_k=8192, local_k=1024, recon_hidden=768),
}
ASIT_TOKENS = 37 * 8  # 592 frames x 128 mels in 16 x 16 patches: the positional table


class DinoHead(nn.Module):
    """One MLP shared by all tokens (D -> hidden -> hidden -> bottleneck, GELU), L2-normalised,
    then two bias-free prototype layers whose rows are unit vectors (weight normalisation with
    the norm fixed at 1, not trained): logits are cosines. Global (CLS) and local (patches)."""

    def __init__(self, dim, hidden, bottleneck, global_k, local_k):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.apply(_init_weights)
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
        self.apply(_init_weights)
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
    """ASiT teacher-student (SPEC_ASIT 2-5): student and teacher each hold an encoder (16 x 16
    patches, qkv biases, CLS), a DinoHead and a reconstruction head; the teacher is an EMA copy
    of all of it, sees the clean crops and has no drop-path. Inputs: two crops stacked on the
    batch axis, clean (2B, F, T), corrupted (2B, F, T) and the corruption mask (2B, F, T).

    - global: CE of the student's CLS (one crop) against the teacher's (the other), symmetric;
    - local: CE per patch token, same crop and position, teacher clean / student corrupted;
    - reconstruction: L1 on the corrupted pixels; total = global + local + 2 reconstruction.
    The teacher's logits are centred (a momentum-0.9 mean over all rows of all ranks, one
    centre per head, updated in every forward) and sharpened by teacher_temp (a per-step value
    the loop passes); the student's temperature is 0.1."""
    ckpt_kind = "asit-pretrain"

    def __init__(self, dim, depth, heads, head_hidden, bottleneck, global_k, local_k,
                 recon_hidden, drop_path=0.1, student_temp=0.1, center_momentum=0.9,
                 max_tokens=ASIT_TOKENS):
        super().__init__()
        enc = dict(dim=dim, depth=depth, heads=heads, cls_token=True, tokens="patch16",
                   qkv_bias=True, max_tokens=max_tokens)
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
            stats = torch.cat([t.sum(0), t.new_tensor([t.shape[0]])])
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


@torch.no_grad()
def ema_update(teacher_params, student_params, m):
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - float(m))


def param_groups(module, weight_decay=0.0, lr_scale=None):
    """Optimizer groups from one rule: weight decay on tensors with ndim >= 2, not on biases or
    norms (`decay` marks which, for schedules). lr_scale(name) -> float splits the groups
    further by lr scale (layer-wise lr decay)."""
    groups = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            key = (lr_scale(n) if lr_scale else 1.0, p.ndim >= 2)
            groups.setdefault(key, []).append(p)
    return [dict(params=ps, lr_scale=sc, decay=dec, weight_decay=weight_decay if dec else 0.0)
            for (sc, dec), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


def freeze(module):
    """A frozen module: eval mode (no drop-path, BatchNorm running statistics), no gradients."""
    return module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Inference: embeddings from audio of any length, and loading any checkpoint (SPEC 6, 9;
# SPEC_ASIT 7, 8)

KIND_NAMES = {"frame": "ATST-Frame", "clip": "ATST-Clip", "asit": "ASiT"}
CHUNK_FRAMES = {"frame": 250, "clip": 150, "asit": 37}  # output frames per chunk, as
                                                        # pre-trained: 10 s / 6 s / 5.92 s


class Embeddings(NamedTuple):
    frames: torch.Tensor      # (B, N, D * layers): one row per output frame (ATST 40 ms, ASiT
                              # 160 ms: the mean of a time column's 8 patch tokens); zero past
                              # `lengths`
    timestamps: torch.Tensor  # (N,) centre of each frame, ms: ATST 20, 60, ...; ASiT 80, 240, ...
    clip: torch.Tensor        # (B, D * layers) Frame: mean of frames; Clip, ASiT: [CLS, mean]
                              # per layer
    lengths: torch.Tensor     # (B,) valid frames per clip


class AudioEncoder(nn.Module):
    """Front-end + Encoder: the inference and embedding entry point (what load_encoder returns),
    for the three kinds: "frame" (ATST-Frame), "clip" (ATST-Clip), "asit" (ASiT, its own Kaldi
    front-end and 16 x 16 patches).

    enc(audio, sample_rate) -> Embeddings. audio: (S,), (B, S) or (B, C, S) (channels are
    averaged), any sample rate (resampled to 16 kHz on the device); `lengths` gives the valid
    samples of a padded batch. Audio longer than one chunk (Frame 10 s, Clip 6 s, ASiT 5.92 s)
    is cut into consecutive chunks that are encoded separately and concatenated: every output
    frame of the clip is kept. The clip embedding averages per-chunk embeddings (Clip and ASiT:
    the chunk's CLS and its frame mean); a trailing chunk counts only when longer than half a
    chunk (SPEC 6). A clip shorter than one output frame (ATST 30 ms, ASiT 175 ms) is zero-padded
    to one. `layers`: None (last block), "all", or block indices; outputs are concatenated.

    Stages call the two halves: features(wav, lengths) -> (front-end output, valid frames),
    then encode(x, n). `unit` is the front-end frames per output frame (4 / 16), `frame_s` the
    output frame hop in seconds (0.04 / 0.16)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder, kind):
        super().__init__()
        assert kind in CHUNK_FRAMES, kind
        self.encoder, self.kind, self.name = encoder, kind, KIND_NAMES[kind]
        asit = kind == "asit"
        self.front = KaldiFrontEnd() if asit else MelFrontEnd()
        self.unit = PATCH if asit else FRAMES_PER_TOKEN
        self.per_frame = ASIT_MELS // PATCH if asit else 1          # tokens per output frame
        self.frame_s = self.unit * HOP / SAMPLE_RATE
        self.min_samples = 400 + (PATCH - 1) * HOP if asit else (FRAMES_PER_TOKEN - 1) * HOP
        self.chunk = min(CHUNK_FRAMES[kind], encoder.max_tokens // self.per_frame)

    def frames_in(self, samples):
        """Valid output frames of clips of `samples` samples (tensor)."""
        if self.kind == "asit":
            return kaldi_frames_for(samples.clamp(min=400)) // PATCH
        return tokens_for(samples)

    def same_front(self, other):
        """Whether `other` takes this encoder's inputs: ATST-Clip and ATST-Frame share a
        front-end; ASiT has its own."""
        return type(self.front) is type(other.front)

    def features(self, wav, lengths):
        """(B, S) mono 16 kHz and valid samples (B,) -> (front-end output (B, F, T), valid
        output frames (B,)). Clips shorter than one output frame are zero-padded to one."""
        if wav.shape[-1] < self.min_samples:
            wav = F.pad(wav, (0, self.min_samples - wav.shape[-1]))
        lengths = torch.as_tensor(lengths, device=wav.device).clamp(min=self.min_samples)
        return self.front(wav, lengths), self.frames_in(lengths)

    def layer_list(self, layers):
        L = self.encoder.depth
        if layers is None:
            return [L - 1]
        if layers == "all":
            return list(range(L))
        bad = [i for i in layers if not 0 <= i < L]
        if bad:
            raise ValueError(f"layers {bad}: this encoder has blocks 0 to {L - 1}")
        return sorted(layers)

    def dims(self, layers=None):
        """(frame embedding size, clip embedding size) for a choice of layers."""
        n = self.encoder.dim * len(self.layer_list(layers))
        return n, n * (1 if self.kind == "frame" else 2)

    @torch.no_grad()
    def forward(self, audio, sample_rate=None, lengths=None, layers=None, chunk_batch=64,
                dtype="auto"):
        audio, lengths = self.prepare(audio, sample_rate, lengths)
        x, n = self.features(audio, lengths)
        with autocast(audio.device, dtype):  # auto: bf16 on CUDA, fp32 on CPU
            return self.encode(x, n, layers, chunk_batch)

    def prepare(self, audio, sample_rate=None, lengths=None):
        """Any audio -> ((B, S) mono 16 kHz fp32 on the model's device, (B,) valid samples).
        audio: (S,) one clip; (B, S) a batch; (B, C, S) channels averaged; (S, C) with C <= 16,
        as soundfile returns a multi-channel file, is one clip of C channels. Integer PCM is
        scaled to [-1, 1) (int16 / 2^15, int32 / 2^31, uint8 (x - 128) / 128). sample_rate
        (Hz, any positive number; rounded to whole Hz) is required; other rates are resampled.
        lengths: one per clip, each at most the audio's samples. Errors say what is wrong
        instead of encoding nonsense: NaN, a "batch" with more rows than samples, empty clips."""
        if sample_rate is None:
            raise ValueError("sample_rate is required: pass the audio's rate in Hz, e.g. "
                             "enc(x, sample_rate=sr) (it is resampled to 16 kHz)")
        if torch.is_tensor(sample_rate) and sample_rate.numel() == 1:
            sample_rate = sample_rate.item()
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or \
                not math.isfinite(sample_rate) or sample_rate < 1:
            raise ValueError(f"sample_rate {sample_rate!r}: a positive number of Hz expected "
                             "(e.g. 44100 or 44100.0)")
        sample_rate = round(sample_rate)  # resampling is between whole rates
        dev = next(self.parameters()).device
        audio = torch.as_tensor(audio)
        if not audio.is_floating_point():
            pcm = {torch.int16: (0, 2 ** 15), torch.int32: (0, 2 ** 31), torch.uint8: (128, 128)}
            if audio.dtype not in pcm:
                raise ValueError(f"audio of dtype {audio.dtype}: pass float (-1..1) or "
                                 "int16 / int32 / uint8 PCM")
            offset, scale = pcm[audio.dtype]
            audio = (audio.double() - offset) / scale
        audio = audio.to(dev, torch.float32)
        if audio.dim() == 2 and audio.shape[1] <= 16 < audio.shape[0]:  # soundfile's (S, C)
            audio = audio.T[None]
        if audio.dim() == 3:
            if audio.shape[1] > audio.shape[2]:
                raise ValueError(f"audio of shape {tuple(audio.shape)}: expected (batch, "
                                 "channels, samples)")
            audio = audio.mean(1)                                     # (B, C, S) -> (B, S)
        audio = audio[None] if audio.dim() == 1 else audio           # (B, S)
        if audio.dim() != 2 or audio.shape[0] > audio.shape[1]:
            raise ValueError(f"audio of shape {tuple(audio.shape)}: expected (samples,), "
                             "(batch, samples) or (batch, channels, samples); a batch of more "
                             "clips than samples is a (samples, channels) array: transpose it")
        if not torch.isfinite(audio).all():
            raise ValueError("audio has NaN or infinite samples")
        B, S = audio.shape
        lengths = (torch.full((B,), S) if lengths is None else
                   torch.as_tensor(lengths)).to(dev).long().reshape(-1)
        if len(lengths) != B:
            raise ValueError(f"lengths has {len(lengths)} values for {B} clips: one per clip "
                             "(its valid samples)")
        if (lengths > S).any():
            raise ValueError(f"lengths {lengths.tolist()}: a clip cannot be longer than the "
                             f"audio's {S} samples")
        if S == 0 or (lengths <= 0).any():
            raise ValueError("empty audio: every clip needs at least one sample")
        if sample_rate != SAMPLE_RATE:
            audio = torchaudio.functional.resample(audio, sample_rate, SAMPLE_RATE)
            lengths = (lengths * SAMPLE_RATE + sample_rate - 1) // sample_rate
        return audio, lengths

    def encode(self, x, n, layers=None, chunk_batch=None):
        """Front-end output (B, F, T) with valid output frames n (B,) -> Embeddings, chunked;
        keeps the graph (fine-tuning calls it in train mode). chunk_batch bounds chunks per
        call. An output frame is one token (ATST) or the mean of a time column's tokens (ASiT)."""
        B, Fm, dev = x.shape[0], x.shape[1], x.device
        r, C, P = self.unit, self.chunk, self.per_frame
        N = x.shape[-1] // r
        K = max(1, -(-N // C))                                        # chunks per clip
        x = F.pad(x[..., :N * r], (0, (K * C - N) * r))
        chunks = x.reshape(B, Fm, K, C * r).transpose(1, 2).reshape(B * K, Fm, C * r)
        n_valid = (n[:, None] - torch.arange(K, device=dev) * C).clamp(0, C).flatten()
        keep = (n_valid > 0).nonzero().squeeze(1)                     # chunks holding audio
        layers = self.layer_list(layers)
        cls_tok = int(self.encoder.cls_token is not None)
        D = self.encoder.dim * len(layers)
        frames = torch.zeros(B * K, C, D, device=dev)
        cls = torch.zeros(B * K, D, device=dev)
        step = chunk_batch or len(keep)
        for i in range(0, len(keep), step):
            idx = keep[i:i + step]
            out = torch.cat(self.encoder(chunks[idx], n_valid[idx] * P, layers=layers), -1)
            out = out.float()                                         # (b, [1+]C P, D)
            frames[idx] = out[:, cls_tok:].unflatten(1, (C, P)).mean(2)  # time-major tokens
            if cls_tok:
                cls[idx] = out[:, 0]
        valid = torch.arange(C, device=dev) < n_valid[:, None]        # (B*K, C)
        frames = frames * valid[..., None]
        mean = frames.sum(1) / n_valid.clamp(min=1)[:, None]          # (B*K, D)
        if cls_tok:  # per layer [CLS, mean]
            L = len(layers)
            mean = torch.stack([cls.view(-1, L, D // L), mean.view(-1, L, D // L)], 2)
            mean = mean.reshape(B * K, 2 * D)
        counts = ((n_valid > C // 2) | (torch.arange(B * K, device=dev) % K == 0)) & (n_valid > 0)
        w = counts.float().view(B, K, 1)
        clip = (mean.view(B, K, -1) * w).sum(1) / w.sum(1)
        frames = frames.view(B, K * C, D)[:, :N]
        stamps = (torch.arange(N, device=dev) + 0.5) * (self.frame_s * 1000)  # centres, ms
        return Embeddings(frames, stamps, clip, n)


# ----------------------------------------------------------------------------------------------
# Downstream heads and metrics (SPEC 6)


class LinearHead(nn.Module):
    """BatchNorm1d(affine=False) + Linear with weights ~ N(0, 0.01) and zero bias."""

    def __init__(self, dim, n_classes):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, n_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.norm(x))


class Classifier(nn.Module):
    """AudioEncoder + LinearHead on the last block's clip embedding (Frame: mean of frames, D;
    Clip: [CLS, mean], 2D), for fine-tuning. Takes log-mel and valid tokens (chunked)."""

    def __init__(self, ae, n_classes):
        super().__init__()
        self.ae, self.head = ae, LinearHead(ae.dims()[1], n_classes)

    def forward(self, mel, n_tok):
        return self.head(self.ae.encode(mel, n_tok).clip)

    def export(self):
        """State of our fine-tuned checkpoints: `encoder.*` + `head.*` (load_encoder reads it)."""
        return {**{f"encoder.{k}": v for k, v in self.ae.encoder.state_dict().items()},
                **{f"head.{k}": v for k, v in self.head.state_dict().items()}}

    def load_export(self, state):
        """Inverse of export(), strict: a missing or unexpected key is an error naming it."""
        want, got = set(self.export()), set(state)
        if want != got:
            raise KeyError(f"fine-tuned weights do not match the model: missing "
                           f"{sorted(want - got)}, unexpected {sorted(got - want)}")
        self.ae.encoder.load_state_dict(_subtree(state, "encoder."), strict=True)
        self.head.load_state_dict(_subtree(state, "head."), strict=True)
        return self


class SedHead(nn.Module):
    """SPEC 7: strong s = sigmoid(W_s h) per frame; attention a = softmax over classes of
    (W_a h), clamped to [1e-7, 1]; weak y = sum_t s a / sum_t a over the valid frames."""

    def __init__(self, dim, n_classes):
        super().__init__()
        self.strong, self.attn = nn.Linear(dim, n_classes), nn.Linear(dim, n_classes)

    def forward(self, h, valid=None):
        """h (B, T, D), valid (B, T) bool -> strong (B, T, C), weak (B, C) probabilities."""
        s = torch.sigmoid(self.strong(h).float())
        a = self.attn(h).float().softmax(-1).clamp(1e-7, 1)
        if valid is not None:
            a = a * valid.unsqueeze(-1)
        return s, (s * a).sum(1) / a.sum(1)


class SedModel(nn.Module):
    """AudioEncoder + SedHead on the last block's frames. The strong output is on the 40 ms
    label grid: ASiT's 160 ms frames are each repeated over their four 40 ms label frames
    (SPEC_ASIT 7), so labels and the SED code are the same for every kind."""

    def __init__(self, ae, n_classes):
        super().__init__()
        self.ae, self.head = ae, SedHead(ae.encoder.dim, n_classes)
        self.repeat = round(ae.frame_s / TOKEN_S)

    def forward(self, x, n, features=False):
        """x: front-end output (B, F, T), or with features=True the encoder's frames (B, N, D)
        computed before (a frozen encoder: sed.py --mode linear caches them); n: valid frames.
        -> (strong (B, N * repeat, C), weak (B, C))."""
        frames = x if features else self.ae.encode(x, n).frames
        s, w = self.head(frames, torch.arange(frames.shape[1], device=x.device) < n[:, None])
        return s.repeat_interleave(self.repeat, 1), w

    export, load_export = Classifier.export, Classifier.load_export


def random_weights(ae, seed=0):
    """The same AudioEncoder with a freshly initialised encoder of the same shape: the
    random-weights baseline every stage offers as --random_init."""
    torch.manual_seed(seed)
    dev = next(ae.parameters()).device
    ae.encoder = Encoder(**dict(ae.encoder.args, drop_path=0.0)).to(dev).eval()
    ae.source += ", random weights"
    return ae


def encoder_kind(enc):
    """The AudioEncoder kind of an Encoder: asit (16 x 16 patches), clip (CLS) or frame."""
    return "asit" if enc.tokens == "patch16" else "clip" if enc.cls_token is not None else "frame"


CKPT_KINDS = {  # our checkpoint kinds, as errors name them
    "atst-pretrain": "a pre-training checkpoint (pretrain_frame.py / pretrain_clip.py)",
    "asit-pretrain": "an ASiT pre-training checkpoint (pretrain_asit.py)",
    "atst-finetune": "a fine-tuned classifier (best.pt of finetune.py / distill.py)",
    "atst-sed": "an SED model (best.pt of sed.py)"}


def load_classifier(path, device="cpu", expect=("atst-finetune", "atst-sed")):
    """A fine-tuned Classifier (atst-finetune) or SedModel (atst-sed), in eval mode, from one
    of our checkpoints of a kind in `expect`."""
    ck = load_checkpoint(path)
    kinds = {"atst-finetune": Classifier, "atst-sed": SedModel}
    if not isinstance(ck, dict) or ck.get("kind") not in expect:
        kind = ck.get("kind") if isinstance(ck, dict) else None
        what = CKPT_KINDS.get(kind, "not a fine-tuned checkpoint of ours")
        raise UserError(f"{path}: {what}; this needs " +
                        " or ".join(CKPT_KINDS[k] for k in expect))
    enc = Encoder(drop_path=0.0, **ck["encoder_args"])
    ae = AudioEncoder(enc, encoder_kind(enc))
    model = kinds[ck["kind"]](ae, len(ck["classes"])).load_export(ck["model"])
    model.classes, model.config = ck["classes"], ck.get("config", {})
    return model.to(device).eval()


def layer_decay_groups(model, decay=0.75, weight_decay=0.0):
    """SGD groups with lr_scale for layer-wise lr decay (SPEC 6): head 1, final norm decay,
    block i decay^(L - i), embeddings (patch, positions, CLS, mask) decay^L like block 0;
    weight decay on matrices only, as in pre-training."""
    L = model.ae.encoder.depth

    def scale(name):
        if name.startswith("ae.encoder.blocks."):
            return decay ** (L - int(name.split(".")[3]))
        if name.startswith("ae.encoder.norm."):
            return decay
        return decay ** L if name.startswith("ae.encoder.") else 1.0
    return param_groups(model, weight_decay, scale)


# released checkpoints (SPEC 9, SPEC_ASIT 8) -> our names; every other encoder key is named alike
OFFICIAL_NAMES = {"patch_embed.patch_embed.weight": "patch_embed.weight",
                  "patch_embed.patch_embed.bias": "patch_embed.bias",
                  "mask_embed": "mask_token",
                  "norm_frame.weight": "norm.weight", "norm_frame.bias": "norm.bias"}
ASIT_ARGS = dict(tokens="patch16", qkv_bias=True)                # what names cannot tell
ASIT_NAMES = {"patch_embed.proj.weight": "patch_embed.weight",  # Conv2d(1, D, 16, 16)
              "patch_embed.proj.bias": "patch_embed.bias"}      # (SPEC_ASIT 8)


def _subtree(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def encoder_state(ck, path="checkpoint"):
    """(encoder state dict in our names, Encoder args the file states (the rest is read from
    the weights), description) from any supported file: ours (pre-training: teacher.encoder;
    fine-tuning / SED: encoder + encoder_args), ATST-Frame Lightning (model.teacher.encoder /
    fine-tuned encoder.encoder), DINO-style training checkpoints (`teacher`, with module. /
    backbone. prefixes: ATST-Clip, and ASiT's training script), the flat `model.`-prefixed
    ASiT release (ASIT_ssl.pt; ASIT_weak / ASIT_strong heads are left out)."""
    kind = ck.get("kind") if isinstance(ck, dict) else None
    if kind in ("atst-pretrain", "asit-pretrain"):
        a = ck["model_args"]
        hints = dict(heads=a["heads"], **(ASIT_ARGS if kind == "asit-pretrain" else {}))
        method = "ASiT" if kind == "asit-pretrain" else a["method"]
        return _subtree(ck["model"], "teacher.encoder."), hints, \
            f"our {method} pre-training checkpoint"
    if isinstance(ck, dict) and "encoder_args" in ck:
        return _subtree(ck["model"], "encoder."), dict(ck["encoder_args"]), \
            f"our {kind or 'downstream'} checkpoint"
    if isinstance(ck, dict) and "state_dict" in ck:  # PyTorch Lightning (ATST-Frame)
        sd = ck["state_dict"]
        for prefix, what in (("model.teacher.encoder.", "released ATST-Frame (teacher)"),
                             ("encoder.encoder.", "released fine-tuned ATST")):
            if any(k.startswith(prefix) for k in sd):
                return _rename(_subtree(sd, prefix), what)
    if isinstance(ck, dict) and "teacher" in ck:  # DINO-style (ATST-Clip, ASiT's script)
        sd = {k[len("module."):] if k.startswith("module.") else k: v
              for k, v in ck["teacher"].items()}
        if any(k.startswith("backbone.") for k in sd):
            sd = _subtree(sd, "backbone.")
        else:  # no backbone prefix: everything but the DINO projection head
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        asit = "patch_embed.proj.weight" in sd
        return _rename(sd, "ASiT training checkpoint (teacher backbone)" if asit else
                       "released ATST-Clip (DINO-style teacher)")
    if isinstance(ck, dict) and any(k.startswith("model.") for k in ck) and \
            all(torch.is_tensor(v) for v in ck.values()):  # the ASiT release
        heads = [k for k in ck if k.split(".")[0] in ("weak_head", "strong_head") or
                 k.startswith(("model.weak_head.", "model.strong_head."))]
        sd = _subtree({k: v for k, v in ck.items() if k not in heads}, "model.")
        return _rename(sd, "released fine-tuned ASiT" if heads else "released ASiT (ASIT_ssl)")
    keys = list(ck)[:8] if isinstance(ck, dict) else type(ck).__name__
    raise UserError(f"{path}: not a checkpoint layout load_encoder knows (top-level keys: "
                    f"{keys}); see README 'Use a released checkpoint'")


def _rename(sd, what):
    """Released names -> ours, and ASiT's Conv2d patch weight (D, 1, 16, 16) -> (D, 256)
    (time offset, mel offset: the order Encoder.tokenize flattens a patch in)."""
    if "patch_embed.proj.weight" not in sd:
        return {OFFICIAL_NAMES.get(k, k): v for k, v in sd.items()}, {}, what
    out = {ASIT_NAMES.get(k, k): v for k, v in sd.items()}
    out["patch_embed.weight"] = sd["patch_embed.proj.weight"].flatten(1)
    return out, dict(ASIT_ARGS), what


def load_encoder(path, device="cpu", pretrained=False):
    """A ready AudioEncoder (front-end + encoder, eval mode) from any supported checkpoint.
    Kind (ASiT: 16 x 16 patches; Clip: a CLS token; Frame) and size are read from the weights;
    loading is strict and a missing or unexpected key is an error that lists them.
    pretrained=True refuses fine-tuned checkpoints (for stages that start from pre-training)."""
    ck = load_checkpoint(path)
    state, hints, what = encoder_state(ck, path)
    need = [k for k in ("pos_embed", "blocks.0.attn.qkv.weight") if k not in state]
    if need:  # the keys that give the encoder's size
        raise UserError(f"{path} ({what}): " + (f"missing encoder keys {need}" if any(
            k.startswith("blocks.") for k in state) else f"no encoder weights found (keys: "
            f"{list(state)[:8]})"))
    dim = state["pos_embed"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    args = dict(dim=dim, depth=depth, heads=max(1, dim // 64), cls_token="cls_token" in state,
                mask_token="mask_token" in state, max_tokens=state["pos_embed"].shape[1] - 1,
                tokens="atst", qkv_bias=False)
    enc = Encoder(drop_path=0.0, **dict(args, **hints))
    kind = encoder_kind(enc)
    expected, got = set(enc.state_dict()), set(state)
    if expected != got:
        raise UserError(f"{path} ({what}): encoder keys do not match an encoder of "
                        f"{KIND_NAMES[kind]}, dim {dim}, depth {depth}; missing: "
                        f"{sorted(expected - got)}; unexpected: {sorted(got - expected)}")
    bad = [k for k, v in enc.state_dict().items() if v.shape != state[k].shape]
    if bad:
        raise UserError(f"{path} ({what}): shapes differ from an encoder of {KIND_NAMES[kind]}, "
                        f"dim {dim}, depth {depth}: " + ", ".join(
                            f"{k} {tuple(state[k].shape)} (expected "
                            f"{tuple(enc.state_dict()[k].shape)})" for k in bad[:4]))
    enc.load_state_dict(state, strict=True)
    ae = AudioEncoder(enc, kind).to(device).eval()
    ae.source = what
    ae.finetuned = (isinstance(ck, dict) and ck.get("kind") in ("atst-finetune", "atst-sed")) \
        or what.startswith("released fine-tuned")
    if pretrained and ae.finetuned:
        raise UserError(f"{path} is a fine-tuned checkpoint ({what}); this stage starts from "
                        "a pre-trained one")
    return ae
