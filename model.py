"""
The network, shared by every stage and method: the mel and Kaldi front-ends, the one Encoder,
model sizes, the table of encoder kinds, the BYOL teacher-student pair that ATST-Clip and
ATST-Frame share, EMA and parameter groups. Section numbers (R1, R12, ...) refer to
REFERENCE.md. What lives elsewhere: ASiT's heads and losses in pretrain_asit.py (its only
user), the embedding runtime and checkpoint layouts in runtime.py, downstream heads in
heads.py, group masking and the augmentations in augment.py.

How the Encoder differs from a vanilla ViT:
- tokens are 4 mel frames x 64 mel bins (40 ms each, mel-major flattening), not 2-D patches
  (ASiT's kind: 16 x 16 patches, time-major);
- positions are a learned table (10 s of 40 ms tokens) plus one CLS slot, cut (never
  interpolated) to the input length; longer inputs are chunked by the runtime;
- a learned mask token replaces the token embedding of masked tokens *before* positions are
  added, and masked tokens stay in the sequence (ATST-Frame);
- padded batches carry valid lengths, turned into a key-padding mask for attention; a batch
  of whole clips carries none, so attention runs without a mask (its fastest kernels);
- the same final LayerNorm is applied to every block output that is read.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from metrics import collapse_std

# ----------------------------------------------------------------------------------------------
# Front-ends (R1, R11)

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

    @staticmethod
    def frames(samples):
        """Frames of clips of `samples` samples (tensor or int)."""
        return frames_for(samples)

    @staticmethod
    def samples_for(frames):
        """The fewest samples that give `frames` frames."""
        return (frames - 1) * HOP

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
    """ASiT's front-end (R11), batched on the device: waveform (B, S) at 16 kHz ->
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

    @staticmethod
    def frames(samples):
        """Frames (25 ms every 10 ms, snip_edges) of clips of `samples` samples (a tensor;
        clips under one 400-sample window count as one), before the cut to a multiple of 16."""
        return (samples.clamp(min=400) - 400) // HOP + 1

    @staticmethod
    def samples_for(frames):
        """The fewest samples that give `frames` frames."""
        return 400 + (frames - 1) * HOP

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
# Encoder (R2, R12)

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
        self.apply(init_weights)
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


# ----------------------------------------------------------------------------------------------
# Kinds of encoder (R2, R12): what differs between them, one row each. The runtime, the
# checkpoint loader, the stages, tables.py and bench.py read this table; a new kind is a row
# (and its front-end, if new), never an `if kind == ...`.


@dataclass(frozen=True)
class Kind:
    name: str            # display name
    front: type          # front-end: waveform (B, S) -> (B, F, T); .frames(samples)
    tokens: str          # Encoder token layout: "atst" (4 frames x 64 mels, time order) |
                         # "patch16" (16 x 16 patches, time-major)
    cls_token: bool      # the encoder has a CLS token
    mask_token: bool     # the encoder has a mask token (masked-token pre-training)
    qkv_bias: bool
    max_tokens: int      # positional table as pre-trained
    unit: int            # front-end frames per output frame
    per_frame: int       # tokens per output frame (a time column of patches)
    chunk: int           # output frames per chunk of long audio (the pre-training length)
    clip_pool: str       # clip embedding per layer: "mean" of frames | "cls+mean" [CLS, mean]
    frame_pool: str      # a time column's tokens -> one output frame: "mean" | "concat"

    def encoder_args(self):
        """The Encoder arguments this kind fixes (size comes from PRESETS)."""
        return dict(tokens=self.tokens, cls_token=self.cls_token, mask_token=self.mask_token,
                    qkv_bias=self.qkv_bias, max_tokens=self.max_tokens)


KINDS = {  # output frames: ATST 40 ms, ASiT 160 ms; chunks 6 s / 10 s / 5.92 s (R6, R17)
    "clip": Kind("ATST-Clip", MelFrontEnd, "atst", cls_token=True, mask_token=False,
                 qkv_bias=False, max_tokens=MAX_TOKENS, unit=FRAMES_PER_TOKEN, per_frame=1,
                 chunk=150, clip_pool="cls+mean", frame_pool="mean"),
    "frame": Kind("ATST-Frame", MelFrontEnd, "atst", cls_token=False, mask_token=True,
                  qkv_bias=False, max_tokens=MAX_TOKENS, unit=FRAMES_PER_TOKEN, per_frame=1,
                  chunk=250, clip_pool="mean", frame_pool="mean"),
    "asit": Kind("ASiT", KaldiFrontEnd, "patch16", cls_token=True, mask_token=False,
                 qkv_bias=True, max_tokens=37 * ASIT_MELS // PATCH, unit=PATCH,
                 per_frame=ASIT_MELS // PATCH, chunk=37, clip_pool="cls+mean",
                 frame_pool="mean"),  # 592 frames x 128 mels: 37 x 8 patches
}


def set_drop_path(encoder, rate):
    """Stochastic depth rising linearly from 0 (first block) to `rate` (last block)."""
    for blk, r in zip(encoder.blocks, torch.linspace(0, rate, encoder.depth).tolist()):
        blk.drop_path.p = r


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

# ----------------------------------------------------------------------------------------------
# ATST's teacher-student (R3)


def mlp_head(dim_in, hidden, dim_out):
    """BYOL projector / predictor: Linear -> BN -> ReLU -> Linear (no biases)."""
    return nn.Sequential(nn.Linear(dim_in, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, dim_out, bias=False))


def byol_loss(q, z):
    """Mean over rows of 2 - 2 cos(q, z) (squared distance of L2-normalised vectors)."""
    return (2 - 2 * F.cosine_similarity(q.float(), z.float(), dim=-1)).mean()


class ATST(nn.Module):
    """Student (encoder, projector, predictor) and EMA teacher (encoder, projector), as the
    reference code trains them (R3):

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
        self.encoder_kind = method  # the KINDS row its encoder is
        enc = dict(dim=dim, depth=depth, heads=heads, **KINDS[method].encoder_args())
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
        """v1, v2: log-mel views (B, F, T); mask (B, N) and n_valid (B,) for 'frame' (n_valid
        None when every clip is whole: no padding mask in attention). Returns (loss, stats:
        L2-normalised student and teacher rows, detached)."""
        if self.method == "frame":
            # the masked tokens' places, found once: their count sets a shape, so finding
            # them waits for the device (h[mask] would wait once per view and per branch)
            at = mask.flatten().nonzero().squeeze(1)
            rows = lambda h: h.flatten(0, 1)[at]           # (B, N, D) -> (masked tokens, D)
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

