"""
Everything with parameters, shared by every stage: the mel front-end, the Encoder, the BYOL
teacher-student pair for ATST-Clip and ATST-Frame, group masking, EMA and cosine schedules.
Numbers come from ../shared/SPEC.md (section numbers in comments).

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

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

# ----------------------------------------------------------------------------------------------
# Front-end (SPEC 1)

SAMPLE_RATE = 16000
HOP = 160              # 10 ms mel hop
FRAMES_PER_TOKEN = 4   # 4 frames -> one 40 ms token
N_MELS = 64
DB_MIN, DB_MAX = -79.6482, 50.6842  # fixed min-max of the released models


def frames_for(samples):
    """Mel frames produced by center=True STFT for `samples` samples (tensor or int)."""
    return samples // HOP + 1


def tokens_for(samples):
    """Encoder tokens for `samples` samples: trailing T mod 4 frames are dropped."""
    return frames_for(samples) // FRAMES_PER_TOKEN


class MelFrontEnd(nn.Module):
    """Waveform (B, S) at 16 kHz -> normalised log-mel (B, F=64, T), batched on the device.

    Padding is not replaced by a 'silence' value: callers carry valid lengths instead, and
    the Encoder masks padded tokens out of attention. Always runs in fp32 (outside autocast).
    """

    def __init__(self):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=1024, win_length=1024, hop_length=HOP,
            f_min=60, f_max=7800, n_mels=N_MELS)  # Hann, power 2, center, HTK, no norm
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, wav):
        x = self.mel(wav.float())                    # (B, F, T)
        # AmplitudeToDB takes one top_db cut-off per 4-D item: (B, 1, F, T) gives one per clip,
        # as the reference computed it clip by clip; a 3-D batch would share the batch maximum.
        x = self.to_db(x.unsqueeze(1)).squeeze(1)    # (B, F, T)
        return (x - DB_MIN) / (DB_MAX - DB_MIN) * 2 - 1

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
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
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
    def __init__(self, dim, heads, drop_path):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    """One encoder for every stage. cls_token: ATST-Clip; mask_token: ATST-Frame."""

    def __init__(self, dim=768, depth=12, heads=12, drop_path=0.1, cls_token=False,
                 mask_token=False, max_tokens=MAX_TOKENS):
        super().__init__()
        self.dim, self.depth, self.max_tokens = dim, depth, max_tokens
        self.patch_embed = nn.Linear(N_MELS * FRAMES_PER_TOKEN, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + max_tokens, dim))  # slot 0: CLS
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_weights)
        for p in (self.pos_embed, self.cls_token, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, mel, n_valid=None, mask=None, layers=None):
        """mel (B, F, T) -> (B, [1+]N, D) after the final norm, N = T // 4.

        n_valid: (B,) valid tokens per clip, or None when nothing is padded.
        mask: (B, N) bool, True = replace by the mask token.
        layers: block indices to return (a list of (B, [1+]N, D), each after the final norm).
        """
        B, Fm, T = mel.shape
        N = T // FRAMES_PER_TOKEN
        if N > self.max_tokens:
            raise ValueError(f"input has {N} tokens ({N * 0.04:.2f} s) but the positional table "
                             f"holds {self.max_tokens}: chunk long audio before encoding")
        x = mel[:, :, :N * FRAMES_PER_TOKEN].reshape(B, Fm, N, FRAMES_PER_TOKEN)
        x = x.permute(0, 2, 1, 3).reshape(B, N, Fm * FRAMES_PER_TOKEN)  # (B, N, 256) mel*4+offset
        x = self.patch_embed(x)                                          # (B, N, D)
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
    """Student (encoder, projector, predictor) and EMA teacher (encoder, projector).

    method 'clip': rows are the CLS outputs of two views.
    method 'frame': rows are the masked tokens; the teacher sees the same view unmasked
    (or masked too, mask_teacher=True, Table III config C) and is read at the same positions.
    The loss is the mean of the two symmetric terms (as the reference code; the paper sums).
    The teacher encoder has no drop-path (as DINO's); its projector BN uses batch statistics.
    """

    def __init__(self, method, dim, depth, heads, proj_hidden, proj_dim, drop_path=0.1,
                 mask_teacher=False):
        super().__init__()
        assert method in ("clip", "frame"), method
        self.method, self.mask_teacher = method, mask_teacher
        enc = dict(dim=dim, depth=depth, heads=heads, cls_token=method == "clip",
                   mask_token=method == "frame")
        self.encoder_args = enc
        self.student = nn.ModuleDict(dict(encoder=Encoder(drop_path=drop_path, **enc),
                                          projector=mlp_head(dim, proj_hidden, proj_dim)))
        self.predictor = mlp_head(proj_dim, proj_hidden, proj_dim)
        self.teacher = nn.ModuleDict(dict(encoder=Encoder(drop_path=0.0, **enc),
                                          projector=mlp_head(dim, proj_hidden, proj_dim)))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def forward(self, v1, v2, mask=None, n_valid=None):
        """Returns (loss, student rows, teacher rows); rows are L2-normalised and detached."""
        if self.method == "frame":
            h1, h2 = self._encode(self.student.encoder, v1, v2, n_valid, mask)
            q1, q2 = (self.predictor(self.student.projector(h[mask])) for h in (h1, h2))
            with torch.no_grad():
                t_mask = mask if self.mask_teacher else None
                t1, t2 = self._encode(self.teacher.encoder, v1, v2, n_valid, t_mask)
                z1, z2 = (self.teacher.projector(t[mask]) for t in (t1, t2))
        else:
            h1, h2 = self._encode(self.student.encoder, v1, v2)
            q1, q2 = (self.predictor(self.student.projector(h[:, 0])) for h in (h1, h2))
            with torch.no_grad():
                t1, t2 = self._encode(self.teacher.encoder, v1, v2)
                z1, z2 = (self.teacher.projector(t[:, 0]) for t in (t1, t2))
        loss = (byol_loss(q1, z2) + byol_loss(q2, z1)) / 2
        rows = lambda a, b: F.normalize(torch.cat([a, b]).detach().float(), dim=-1)
        return loss, rows(q1, q2), rows(z1, z2)

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


def param_groups(module, weight_decay=0.0):
    """Two AdamW groups from one rule: decay tensors with ndim >= 2, not biases or norms."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [dict(params=decay, weight_decay=weight_decay, decay=True),
            dict(params=no_decay, weight_decay=0.0, decay=False)]

# ----------------------------------------------------------------------------------------------
# Masking (SPEC 4) and schedules (SPEC 3)


def group_mask(n_valid, n_tokens, span=5, prob=0.65, generator=None, min_spans=2):
    """wav2vec2-style span masking, one mask per clip, vectorised over the batch.

    Per clip: k = max(min_spans, int(prob * n / span + U[0,1))) span starts drawn without
    replacement from [0, n - span), each masking `span` tokens (spans may overlap): about 50%
    of tokens for span=5, prob=0.65. span=1 gives random (unstructured) masking.
    n_valid: (B,) valid tokens per clip; n_tokens: the padded length N. Returns (B, N) bool.
    """
    dev = n_valid.device
    B = n_valid.shape[0]
    n_starts = n_tokens - span if span > 1 else n_tokens
    u = torch.rand(B, device=dev, generator=generator)
    k = torch.clamp((prob * n_valid / span + u).floor().long(), min=min_spans)
    avail = (n_valid - span if span > 1 else n_valid).clamp(min=0)  # start positions per clip
    k = torch.minimum(k, avail)
    pos = torch.arange(max(n_starts, 0), device=dev)
    noise = torch.rand(B, max(n_starts, 0), device=dev, generator=generator)
    noise = noise.masked_fill(pos >= avail.unsqueeze(1), 2.0)      # never pick invalid starts
    rank = noise.argsort(1).argsort(1)                             # (B, n_starts)
    starts = (rank < k.unsqueeze(1)).float()
    starts = F.pad(starts, (span - 1, n_tokens - max(n_starts, 0)))  # (B, N + span - 1)
    # a token is masked when a span starts at one of the span-1 tokens before it or at it
    return F.max_pool1d(starts.unsqueeze(1), span, stride=1).squeeze(1).bool()  # (B, N)


def cosine_schedule(start, end, total_steps, warmup_steps=0, warmup_from=0.0):
    """Tensor of total_steps + 1 values indexed by step: linear warmup from `warmup_from` to
    `start` over warmup_steps, then cosine from `start` to `end` at the last step."""
    warm = torch.linspace(warmup_from, start, warmup_steps + 1)[:-1] if warmup_steps else \
        torch.zeros(0)
    n = total_steps - warmup_steps
    t = torch.arange(n + 1, dtype=torch.float64) / max(n, 1)
    cos = end + (start - end) * (1 + torch.cos(math.pi * t)) / 2
    return torch.cat([warm.double(), cos])


def ema_schedule(m0, total_steps):
    """EMA momentum: m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2, from m0 to 1."""
    return cosine_schedule(m0, 1.0, total_steps)



def collapse_std(rows, world=1):
    """Per-dimension std over rows (all ranks) of L2-normalised outputs, averaged over dims.
    About 1/sqrt(dim) when rows spread over the sphere; toward 0 on collapse."""
    r = rows.double()
    stats = torch.cat([torch.tensor([r.shape[0]], dtype=torch.float64, device=r.device),
                       r.sum(0), (r * r).sum(0)])
    if world > 1:
        torch.distributed.all_reduce(stats)
    n, s, ss = stats[0], stats[1:1 + r.shape[1]], stats[1 + r.shape[1]:]
    var = (ss / n - (s / n) ** 2).clamp(min=0) * n / (n - 1).clamp(min=1)
    return var.sqrt().mean().item()
