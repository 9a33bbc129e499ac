"""
Pre-training views (REFERENCE.md R4-R5), batched on the device: Mixup, Random Resized Crop,
frequency warping on normalised log-mel (B, F, T), waveform crops and group masking. Every
random draw comes from an explicit torch.Generator, so a step is reproducible from its seed;
the only state is the Mixup bank, which the training script saves with its checkpoint. Nothing
here runs in DataLoader workers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _uniform(shape, lo, hi, g, device):
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)


def _randint_upto(high, g):
    """Per-row integer in [0, high] (high: (B,) long tensor)."""
    return (torch.rand(high.shape, generator=g, device=high.device) * (high + 1)).floor().long()


def resample_boxes(x, top, height, left, width, size=None):
    """Crop the box (top, left, height, width) from x (B, F, T) and resize it to (F, T) with
    bicubic, align_corners=True interpolation: one box per clip, one grid_sample call. Boxes
    are float (B,) tensors in x's coordinates; taps past x's edges repeat the edge, as
    F.interpolate does at the edges of a cropped tensor."""
    B, Fm, T = size or x.shape
    dev = x.device
    Hx, Wx = x.shape[1:]
    u = torch.linspace(0, 1, Fm, device=dev)                        # output rows
    v = torch.linspace(0, 1, T, device=dev)                         # output columns
    rows = top[:, None] + u[None] * (height[:, None] - 1)           # (B, F) input rows
    cols = left[:, None] + v[None] * (width[:, None] - 1)           # (B, T) input columns
    gy = rows / max(Hx - 1, 1) * 2 - 1                              # to [-1, 1], align_corners
    gx = cols / max(Wx - 1, 1) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(B, Fm, T), gy[:, :, None].expand(B, Fm, T)], -1)
    out = F.grid_sample(x.unsqueeze(1), grid, mode="bicubic", padding_mode="border",
                        align_corners=True)                          # (B, 1, F, T)
    return out.squeeze(1)


class RandomResizedCrop(nn.Module):
    """BYOL-A RRC: x centred on a zero canvas of (F*1.0, T*1.5); a box of h = U(0.6,1.5)*F,
    w = U(0.6,1.5)*T (clipped to the canvas) at a random offset, resized back to (F, T)."""

    def __init__(self, virtual_scale=(1.0, 1.5), freq_scale=(0.6, 1.5), time_scale=(0.6, 1.5)):
        super().__init__()
        self.virtual_scale, self.freq_scale = virtual_scale, freq_scale
        self.time_scale = time_scale

    def forward(self, x, g=None):
        B, Fm, T = x.shape
        dev = x.device
        cF, cT = int(Fm * self.virtual_scale[0]), int(T * self.virtual_scale[1])
        h = (_uniform(B, *self.freq_scale, g, dev) * Fm).long().clamp(1, cF)
        w = (_uniform(B, *self.time_scale, g, dev) * T).long().clamp(1, cT)
        i, j = _randint_upto(cF - h, g), _randint_upto(cT - w, g)
        pf, pt = (cF - Fm) // 2, (cT - T) // 2
        canvas = F.pad(x, (pt, cT - T - pt, pf, cF - Fm - pf))      # x centred on zeros
        return resample_boxes(canvas, i.float(), h.float(), j.float(), w.float(), (B, Fm, T))

    def extra_repr(self):
        return f"virtual={self.virtual_scale}, freq={self.freq_scale}, time={self.time_scale}"


class FreqWarp(nn.Module):
    """ATST-Frame frequency warping: crop mel bins [i, i+h) and resize them to F, time untouched.
    rule='code' draws h = clip(int(U(0.6,1.5)*F), 1, F) like the reference (56% of draws leave
    the input unchanged); rule='paper' draws h uniformly from the integers [0.6F, F]."""

    def __init__(self, rule="code", scale=(0.6, 1.5)):
        super().__init__()
        assert rule in ("code", "paper"), rule
        self.rule, self.scale = rule, scale

    def forward(self, x, g=None):
        B, Fm, T = x.shape
        dev = x.device
        if self.rule == "code":
            h = (_uniform(B, *self.scale, g, dev) * Fm).long().clamp(1, Fm)
        else:
            lo = int(round(self.scale[0] * Fm))
            h = lo + _randint_upto(torch.full((B,), Fm - lo, device=dev), g)
        i = _randint_upto(Fm - h, g)
        zeros, full = torch.zeros(B, device=dev), torch.full((B,), float(T), device=dev)
        return resample_boxes(x, i.float(), h.float(), zeros, full)

    def extra_repr(self):
        return f"rule={self.rule}, scale={self.scale}"


class Mixup(nn.Module):
    """BYOL-A log-mixup-exp with a FIFO bank of the last `bank_size` un-mixed clips (per rank):
    x' = log((1 - a) exp(x) + a exp(z) + eps), a = ratio * U(0,1), z a random bank clip.
    The bank is read before the batch is pushed (the first batch is left unmixed); it is held
    in bf16 to halve its memory (values are in [-1, 1]; the error is far below the mixing)."""

    def __init__(self, bank_size=2000, ratio=0.4):
        super().__init__()
        self.bank_size, self.ratio = bank_size, ratio
        self.register_buffer("bank", torch.zeros(0), persistent=True)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=True)
        self.seen = 0  # host copy of `count`: reading the buffer would sync the GPU each step

    def forward(self, x, g=None):
        n = min(self.seen, self.bank_size)
        if n == 0:
            return x
        B = x.shape[0]
        idx = (torch.rand(B, generator=g, device=x.device) * n).long()
        z = self.bank[idx].to(x.dtype)
        if z.shape[-1] != x.shape[-1]:
            raise ValueError(f"Mixup bank holds clips of {z.shape[-1]} frames, got {x.shape[-1]}")
        a = (self.ratio * torch.rand(B, 1, 1, generator=g, device=x.device)).to(x.dtype)
        eps = torch.finfo(x.dtype).eps
        return torch.log((1 - a) * x.exp() + a * z.exp() + eps)

    @torch.no_grad()
    def push(self, x):
        """Add un-mixed clips (B, F, T) to the FIFO (a ring buffer on the device)."""
        if self.bank.numel() == 0:
            self.bank = torch.zeros(self.bank_size, *x.shape[1:], dtype=torch.bfloat16,
                                    device=x.device)
        B = min(x.shape[0], self.bank_size)
        pos = (self.seen + torch.arange(B, device=x.device)) % self.bank_size
        self.bank[pos] = x[-B:].to(self.bank.dtype)
        self.seen += x.shape[0]
        self.count.fill_(self.seen)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the bank is allocated lazily, so take the saved shape before the strict copy
        key = prefix + "bank"
        if key in state_dict:
            self.bank = torch.empty_like(state_dict[key], device=self.count.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "count" in state_dict:
            self.seen = int(state_dict[prefix + "count"])

    def extra_repr(self):
        return f"bank_size={self.bank_size}, ratio={self.ratio}"


def random_crops(x, n, valid=None, g=None, shift=None):
    """One random crop of n samples along the last axis of x (B, ..., S) per clip, by gather
    (ATST-Clip segments, on the waveform as the reference). The crop starts inside the clip's
    real audio: start ~ U{0 .. valid - n}; a clip shorter than n (valid <= n) is taken from its
    start, so its crop is the clip followed by the zero padding (the reference pads only such
    clips). valid: (B,) real samples per clip (default: all of S). shift: (B,) circular rolls
    of the real audio applied before cropping (ASiT), gathered in the same pass."""
    B, S = x.shape[0], x.shape[-1]
    if S < n:
        raise ValueError(f"crop of {n} from an input of {S}: read longer clips")
    valid = torch.full((B,), S, device=x.device) if valid is None else valid.clamp(max=S)
    start = _randint_upto((valid - n).clamp(min=0), g)
    idx = start[:, None] + torch.arange(n, device=x.device)         # (B, n)
    if shift is not None:                                           # rolled[t] = x[t - shift]
        v = valid.clamp(min=1)[:, None]
        idx = torch.where(idx < v, (idx - shift[:, None]) % v, idx)
    return x.gather(-1, idx.view(B, *[1] * (x.dim() - 2), n).expand(*x.shape[:-1], n))


def roll_shifts(valid, g, p=0.5):
    """ASiT's roll: with probability p a clip's real audio is rolled circularly by a uniform
    offset in [0, valid] (random_crops applies it). (B,) offsets, 0 for the others."""
    shift = _randint_upto(valid, g)
    return shift * (torch.rand(valid.shape, generator=g, device=valid.device) < p)


def group_mask(n_valid, n_tokens, span=5, prob=0.65, generator=None, min_spans=2):
    """wav2vec2-style span masking (R4), one mask per clip, vectorised over the batch.

    Per clip: k = max(min_spans, int(prob * n / span + U[0,1))) span starts drawn without
    replacement from [0, n - span), each masking `span` tokens (spans may overlap): about 50%
    of tokens for span=5, prob=0.65. span=1 gives random (unstructured) masking of a `prob`
    share of the tokens, as the reference's random mode.
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


def gmml(x, g, p_replace=0.5, zeros=(0.5, 0.7), replace=0.3, max_block=0.3, align=1,
         chunk=62):
    """ASiT's group masking (R13), batched on the device: x (B, F, T) clean crops ->
    (corrupted, mask), mask 1 on corrupted pixels. Per clip, with probability 1 - p_replace
    ("zeros") a target share a ~ U(zeros) of the T x F pixels is set to 0; else ("replace") a
    share `replace` is pasted from the clean crop of a random clip of the batch (maybe
    itself) at the same place. Rectangles as the reference draws them: top-left corner uniform
    (aligned to `align`), height in [align, max_block * T), width in [align, max_block * F),
    clipped at the edges, overlaps allowed, added in order until the covered share reaches the
    target. Candidates are drawn `chunk` (<= 62, the bits of an int64) at a time for the whole
    batch; pixel (f, t) belongs to the first candidate covering it, so the covered share after
    k candidates is a cumulative count, and a clip keeps its candidates up to the first that
    reaches its target."""
    B, Fm, T = x.shape
    dev = x.device
    use_replace = torch.rand(B, generator=g, device=dev) < p_replace
    target = torch.where(use_replace, torch.full((B,), replace, device=dev),
                         _uniform(B, *zeros, g, dev)) * (Fm * T)
    donor = (torch.rand(B, generator=g, device=dev) * B).long()

    def spans(n, size):  # (B, n) starts and lengths along an axis of `size` pixels
        start = (torch.rand(B, n, generator=g, device=dev) * (size - align)).long()
        start = start // align * align
        hi = int(size * max_block)
        length = align + (torch.rand(B, n, generator=g, device=dev) * (hi - align)).long()
        length = torch.minimum(length, size - start)
        return start, (length.float() / align).round().long() * align

    inf = float("inf")
    first = torch.full((B, Fm, T), inf, device=dev, dtype=torch.float64)  # first cover
    f, t, done = torch.arange(Fm, device=dev), torch.arange(T, device=dev), 0
    bit = 2 ** torch.arange(chunk, device=dev)                       # candidate j -> bit j
    while True:
        (t0, th), (f0, fw) = spans(chunk, T), spans(chunk, Fm)
        rows = (f >= f0[..., None]) & (f < (f0 + fw)[..., None])      # (B, chunk, F)
        cols = (t >= t0[..., None]) & (t < (t0 + th)[..., None])      # (B, chunk, T)
        # the candidates covering (f, t) are the common bits of its row and column sets;
        # the lowest common bit is the first of them (x & -x keeps it; log2 is exact)
        both = (rows * bit[:, None]).sum(1)[:, :, None] & (cols * bit[:, None]).sum(1)[:, None]
        low = (both & -both).double()                                 # (B, F, T)
        first = torch.minimum(first, torch.where(both > 0, done + low.log2(), inf))
        done += chunk
        counts = torch.zeros(B, done + 1, device=dev).scatter_add_(
            1, first.clamp(max=done).long().view(B, -1), torch.ones(B, Fm * T, device=dev))
        covered = counts[:, :done].cumsum(1)                         # after candidate k
        if (covered[:, -1] >= target).all():
            break
    n_used = (covered < target[:, None]).sum(1) + 1                 # up to the first hit
    mask = first < n_used[:, None, None]
    fill = torch.where(use_replace[:, None, None], x[donor], torch.zeros_like(x))
    return torch.where(mask, fill, x), mask.to(x.dtype)


def mixup_labels(x, y, alpha, rng):
    """Mixup with labels for fine-tuning: per clip lambda ~ Beta(alpha, alpha) and a partner
    from a permutation of the batch; x' = l x + (1 - l) x[perm], and the same for the soft
    targets y (B, C). Draws come from the numpy Generator `rng` (a few numbers per batch)."""
    B = x.shape[0]
    perm = torch.from_numpy(rng.permutation(B)).to(x.device)
    lam = torch.from_numpy(rng.beta(alpha, alpha, B)).float().to(x.device)
    xl, yl = lam.view(B, *([1] * (x.dim() - 1))), lam.view(B, 1)
    return xl * x + (1 - xl) * x[perm], yl * y + (1 - yl) * y[perm]
