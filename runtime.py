"""
The inference runtime: audio of any length, rate and channel count in, embeddings out, for
every kind of encoder in model.KINDS; and every checkpoint layout the project reads (its own
files, the released ATST-Frame / ATST-Clip / ASiT weights) turned into one ready AudioEncoder.
Stages use it through load_encoder, AudioEncoder.features and AudioEncoder.encode; users
through load_encoder(...)(audio, sample_rate). Section numbers refer to REFERENCE.md.

    from runtime import load_encoder
    enc = load_encoder("atstframe_base.ckpt", device="cuda")
    e = enc(wav, sample_rate=44100)      # e.frames (B, N, D), e.timestamps (ms), e.clip (B, D')
"""
import math
import numbers
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from model import HOP, KINDS, SAMPLE_RATE, Encoder
from plumbing import UserError, autocast, load_checkpoint

# ----------------------------------------------------------------------------------------------
# Embeddings from audio of any length (R6, R17)


class LayerError(UserError, ValueError):
    """A block index the encoder does not have."""


class Embeddings(NamedTuple):
    frames: torch.Tensor      # (B, N, D * layers): one row per output frame (ATST 40 ms, ASiT
                              # 160 ms: the mean of a time column's 8 patch tokens); zero past
                              # `lengths`
    timestamps: torch.Tensor  # (N,) centre of each frame, ms: ATST 20, 60, ...; ASiT 80, 240, ...
    clip: torch.Tensor        # (B, D * layers) Frame: mean of frames; Clip, ASiT: [CLS, mean]
                              # per layer
    lengths: torch.Tensor     # (B,) valid frames per clip


# a time column's tokens -> one output frame: their mean, or side by side per layer (tokens
# per frame x wider; the same for a kind of one token a frame)
FRAME_POOLS = ("mean", "concat")


class AudioEncoder(nn.Module):
    """Front-end + Encoder: the inference and embedding entry point (what load_encoder returns)
    for every kind of model.KINDS ("frame", "clip", "asit"), all it does that differs between
    kinds read from the kind's row (front-end, frames per token, chunk, pooling).

    enc(audio, sample_rate) -> Embeddings. audio: (S,), (B, S) or (B, C, S) (channels are
    averaged), any sample rate (resampled to 16 kHz on the device); `lengths` gives the valid
    samples of a padded batch. Audio longer than one chunk (Frame 10 s, Clip 6 s, ASiT 5.92 s)
    is cut into consecutive chunks that are encoded separately and concatenated: every output
    frame of the clip is kept. The clip embedding averages per-chunk embeddings (Clip and ASiT:
    the chunk's CLS and its frame mean); a trailing chunk counts only when longer than half a
    chunk (R6). A clip shorter than one output frame (ATST 30 ms, ASiT 175 ms) is zero-padded
    to one. `layers`: None (last block), "all", or block indices; outputs are concatenated.

    Stages call the two halves: features(wav, lengths) -> (front-end output, valid frames),
    then encode(x, n). `unit` is the front-end frames per output frame (4 / 16), `frame_s` the
    output frame hop in seconds (0.04 / 0.16)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder, kind):
        super().__init__()
        row = KINDS[kind]  # everything kind-specific comes from its row
        self.encoder, self.kind, self.name, self.row = encoder, kind, row.name, row
        self.front = row.front()
        self.unit, self.per_frame, self.frame_pool = row.unit, row.per_frame, row.frame_pool
        self.frame_s = self.unit * HOP / SAMPLE_RATE
        self.min_samples = row.front.samples_for(self.unit)         # one output frame
        self.chunk = min(row.chunk, encoder.max_tokens // self.per_frame)

    def frames_in(self, samples):
        """Valid output frames of clips of `samples` samples (tensor)."""
        return self.row.front.frames(samples) // self.unit

    def same_front(self, other):
        """Whether `other` takes this encoder's inputs (ATST-Clip and ATST-Frame share a
        front-end; ASiT has its own)."""
        return self.row.front is other.row.front

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
            raise LayerError(f"layers {bad}: this encoder has blocks 0 to {L - 1}")
        return sorted(set(layers))

    def pool_frames(self, how):
        """Set how a time column's tokens become one output frame (FRAME_POOLS); '' keeps the
        kind's own. Returns self."""
        if how and how not in FRAME_POOLS:
            raise UserError(f"--frame_pool {how!r}: one of {', '.join(FRAME_POOLS)}")
        self.frame_pool = how or self.row.frame_pool
        return self

    def dims(self, layers=None):
        """(frame embedding size, clip embedding size) for a choice of layers."""
        n = self.encoder.dim * len(self.layer_list(layers))
        frame = n * (self.per_frame if self.frame_pool == "concat" else 1)
        return frame, frame + (n if self.row.clip_pool == "cls+mean" else 0)

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
        if audio.numel() == 0:  # before the shape checks, which would read it as transposed
            raise ValueError(f"empty audio (0 samples, shape {tuple(audio.shape)}): every clip "
                             "needs at least one sample")
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
        if (lengths <= 0).any():
            raise ValueError(f"lengths {lengths.tolist()}: every clip needs at least one sample")
        if sample_rate != SAMPLE_RATE:
            audio = torchaudio.functional.resample(audio, sample_rate, SAMPLE_RATE)
            lengths = (lengths * SAMPLE_RATE + sample_rate - 1) // sample_rate
        return audio, lengths

    def encode(self, x, n, layers=None, chunk_batch=None):
        """Front-end output (B, F, T) with valid output frames n (B,) -> Embeddings, chunked;
        keeps the graph (fine-tuning calls it in train mode). chunk_batch bounds chunks per
        call. An output frame is one token (ATST) or a time column's tokens (ASiT): their mean,
        or with frame_pool "concat" the tokens side by side, per layer."""
        B, Fm, dev = x.shape[0], x.shape[1], x.device
        r, C, P = self.unit, self.chunk, self.per_frame
        N = x.shape[-1] // r
        K = max(1, -(-N // C))                                        # chunks per clip
        x = F.pad(x[..., :N * r], (0, (K * C - N) * r))
        chunks = x.reshape(B, Fm, K, C * r).transpose(1, 2).reshape(B * K, Fm, C * r)
        n_valid = (n[:, None] - torch.arange(K, device=dev) * C).clamp(0, C).flatten()
        keep = torch.arange(B, device=dev) if K == 1 else \
            (n_valid > 0).nonzero().squeeze(1)                        # chunks holding audio
        layers = self.layer_list(layers)
        cls_tok = int(self.encoder.cls_token is not None)             # sequence offset
        with_cls = self.row.clip_pool == "cls+mean"
        L, D = len(layers), self.encoder.dim * len(layers)
        Df = self.dims(layers)[0]                                     # frame size
        frames = torch.zeros(B * K, C, Df, device=dev)
        cls = torch.zeros(B * K, D, device=dev)
        step = chunk_batch or len(keep)
        for i in range(0, len(keep), step):
            idx = keep[i:i + step]
            out = torch.cat(self.encoder(chunks[idx], n_valid[idx] * P, layers=layers), -1)
            out = out.float()                                         # (b, [1+]C P, D)
            tok = out[:, cls_tok:].unflatten(1, (C, P))               # (b, C, P, L dim)
            frames[idx] = tok.mean(2) if self.frame_pool == "mean" else \
                tok.unflatten(-1, (L, -1)).transpose(2, 3).flatten(2)  # (b, C, L P dim)
            if with_cls:
                cls[idx] = out[:, 0]
        valid = torch.arange(C, device=dev) < n_valid[:, None]        # (B*K, C)
        frames = frames * valid[..., None]
        mean = frames.sum(1) / n_valid.clamp(min=1)[:, None]          # (B*K, Df)
        if with_cls:  # per layer [CLS, mean]
            mean = torch.cat([cls.view(-1, L, D // L), mean.view(-1, L, Df // L)], 2)
            mean = mean.reshape(B * K, D + Df)
        counts = ((n_valid > C // 2) | (torch.arange(B * K, device=dev) % K == 0)) & (n_valid > 0)
        w = counts.float().view(B, K, 1)
        clip = (mean.view(B, K, -1) * w).sum(1) / w.sum(1)
        frames = frames.view(B, K * C, Df)[:, :N]
        stamps = (torch.arange(N, device=dev) + 0.5) * (self.frame_s * 1000)  # centres, ms
        return Embeddings(frames, stamps, clip, n)


def random_weights(ae, seed=0):
    """The same AudioEncoder with a freshly initialised encoder of the same shape: the
    random-weights baseline every stage offers as --random_init."""
    torch.manual_seed(seed)
    dev = next(ae.parameters()).device
    ae.encoder = Encoder(**dict(ae.encoder.args, drop_path=0.0)).to(dev).eval()
    ae.source += ", random weights"
    return ae


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts (R9, R18): every file we write names its encoder kind; the structure is
# read only for the released files, whose layout fixes their kind

CKPT_KINDS = {  # our checkpoint kinds, as errors name them
    "atst-pretrain": "a pre-training checkpoint (pretrain_frame.py / pretrain_clip.py)",
    "asit-pretrain": "an ASiT pre-training checkpoint (pretrain_asit.py)",
    "atst-finetune": "a fine-tuned classifier (best.pt of finetune.py / distill.py)",
    "atst-sed": "an SED model (best.pt of sed.py)"}
FINETUNED = ("atst-finetune", "atst-sed")
# released checkpoints -> our names; every other encoder key is named alike
OFFICIAL_NAMES = {"patch_embed.patch_embed.weight": "patch_embed.weight",
                  "patch_embed.patch_embed.bias": "patch_embed.bias",
                  "mask_embed": "mask_token",
                  "norm_frame.weight": "norm.weight", "norm_frame.bias": "norm.bias"}
ASIT_NAMES = {"patch_embed.proj.weight": "patch_embed.weight",  # Conv2d(1, D, 16, 16) (R18)
              "patch_embed.proj.bias": "patch_embed.bias"}


def subtree(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def kind_of(args):
    """The kind whose row fixes these Encoder arguments (structure, for files that do not
    name their kind); an error when no row or more than one fits."""
    fixed = [f for f in next(iter(KINDS.values())).encoder_args() if f != "max_tokens"]
    hits = [k for k, row in KINDS.items()
            if all(args.get(f) == getattr(row, f) for f in fixed)]
    if len(hits) != 1:
        raise ValueError(f"an encoder with {', '.join(f'{f}={args.get(f)}' for f in fixed)} "
                         f"is {'more than one' if hits else 'none'} of the known kinds "
                         f"{sorted(KINDS)}{': ' + str(hits) if hits else ''}")
    return hits[0]


def our_kind(ck):
    """The encoder kind one of our checkpoints names (files from before the field was
    written: the pre-training method, or the kind whose row the stored arguments fit)."""
    if "encoder_kind" in ck:
        return ck["encoder_kind"]
    if ck.get("kind") == "asit-pretrain":
        return "asit"
    if ck.get("kind") == "atst-pretrain":
        return ck["model_args"]["method"]
    return kind_of(ck["encoder_args"])


def encoder_state(ck, path="checkpoint"):
    """(encoder state dict in our names, kind, Encoder args the file states (the rest is read
    from the weights), description) from any supported file: ours (pre-training:
    teacher.encoder; fine-tuning / SED: encoder + encoder_args), ATST-Frame Lightning
    (model.teacher.encoder / fine-tuned encoder.encoder), DINO-style training checkpoints
    (`teacher`, with module. / backbone. prefixes: ATST-Clip, and ASiT's training script), the
    flat `model.`-prefixed ASiT release (ASIT_ssl.pt; ASIT_weak / ASIT_strong heads are left
    out)."""
    kind = ck.get("kind") if isinstance(ck, dict) else None
    if kind in CKPT_KINDS or isinstance(ck, dict) and "encoder_args" in ck:
        try:
            enc_kind = our_kind(ck)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
    if kind in ("atst-pretrain", "asit-pretrain"):
        return subtree(ck["model"], "teacher.encoder."), enc_kind, \
            dict(heads=ck["model_args"]["heads"]), \
            f"our {KINDS[enc_kind].name} pre-training checkpoint"
    if isinstance(ck, dict) and "encoder_args" in ck:
        return subtree(ck["model"], "encoder."), enc_kind, dict(ck["encoder_args"]), \
            f"our {kind or 'downstream'} checkpoint"
    if isinstance(ck, dict) and "state_dict" in ck:  # PyTorch Lightning (ATST-Frame)
        sd = ck["state_dict"]
        for prefix, what in (("model.teacher.encoder.", "released ATST-Frame (teacher)"),
                             ("encoder.encoder.", "released fine-tuned ATST")):
            if any(k.startswith(prefix) for k in sd):
                sd = _rename(subtree(sd, prefix))
                return sd, "clip" if "cls_token" in sd else "frame", {}, what
    if isinstance(ck, dict) and "teacher" in ck:  # DINO-style (ATST-Clip, ASiT's script)
        sd = {k[len("module."):] if k.startswith("module.") else k: v
              for k, v in ck["teacher"].items()}
        if any(k.startswith("backbone.") for k in sd):
            sd = subtree(sd, "backbone.")
        else:  # no backbone prefix: everything but the DINO projection head
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        if "patch_embed.proj.weight" in sd:
            return _rename(sd), "asit", {}, "ASiT training checkpoint (teacher backbone)"
        return _rename(sd), "clip", {}, "released ATST-Clip (DINO-style teacher)"
    if isinstance(ck, dict) and any(k.startswith("model.") for k in ck) and \
            all(torch.is_tensor(v) for v in ck.values()):  # the ASiT release
        heads = [k for k in ck if k.split(".")[0] in ("weak_head", "strong_head") or
                 k.startswith(("model.weak_head.", "model.strong_head."))]
        sd = subtree({k: v for k, v in ck.items() if k not in heads}, "model.")
        return _rename(sd), "asit", {}, \
            "released fine-tuned ASiT" if heads else "released ASiT (ASIT_ssl)"
    keys = list(ck)[:8] if isinstance(ck, dict) else type(ck).__name__
    raise UserError(f"{path}: not a checkpoint layout load_encoder knows (top-level keys: "
                    f"{keys}); see README 'Use a released checkpoint'")


def _rename(sd):
    """Released names -> ours, and ASiT's Conv2d patch weight (D, 1, 16, 16) -> (D, 256)
    (time offset, mel offset: the order Encoder.tokenize flattens a patch in)."""
    if "patch_embed.proj.weight" not in sd:
        return {OFFICIAL_NAMES.get(k, k): v for k, v in sd.items()}
    out = {ASIT_NAMES.get(k, k): v for k, v in sd.items()}
    out["patch_embed.weight"] = sd["patch_embed.proj.weight"].flatten(1)
    return out


def load_encoder(path, device="cpu", pretrained=False):
    """A ready AudioEncoder (front-end + encoder, eval mode) from any supported checkpoint
    file, a folder export.py wrote, or the Hub id of one (org/name). The kind comes from the
    file (ours name it; a release's layout fixes it), the size from the weights; loading is
    strict and a missing or unexpected key is an error that lists them. pretrained=True
    refuses fine-tuned checkpoints (for stages that start from pre-training)."""
    from export import HUB_ID, hub_folder, read_portable  # the portable format's reader
    if not os.path.exists(path) and HUB_ID.fullmatch(path) and \
            not path.endswith((".pt", ".pth", ".ckpt", ".bin")):
        path = hub_folder(path)
    if os.path.isdir(path):
        state, kind, stated, what, finetuned = read_portable(path)
    else:
        ck = load_checkpoint(path)
        state, kind, stated, what = encoder_state(ck, path)
        finetuned = (isinstance(ck, dict) and ck.get("kind") in FINETUNED) \
            or what.startswith("released fine-tuned")
    need = [k for k in ("pos_embed", "blocks.0.attn.qkv.weight") if k not in state]
    if need:  # the keys that give the encoder's size
        raise UserError(f"{path} ({what}): " + (f"missing encoder keys {need}" if any(
            k.startswith("blocks.") for k in state) else f"no encoder weights found (keys: "
            f"{list(state)[:8]})"))
    row = KINDS[kind]
    dim = state["pos_embed"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    args = dict(dim=dim, depth=depth, heads=max(1, dim // 64), cls_token="cls_token" in state,
                mask_token="mask_token" in state, max_tokens=state["pos_embed"].shape[1] - 1,
                tokens=row.tokens, qkv_bias=row.qkv_bias)
    unknown = sorted(set(stated) - set(args))
    differ = [f"{k} {stated[k]!r} (the weights: {args[k]!r})" for k in
              ("dim", "depth", "cls_token", "mask_token", "max_tokens")
              if k in stated and stated[k] != args[k]]
    if unknown or differ:  # a hand-edited or mismatched config.json / encoder_args
        raise UserError(f"{path} ({what}): " + (
            f"unknown encoder arguments {unknown} (an Encoder takes {sorted(args)})" if unknown
            else "its stated encoder arguments disagree with its weights: " + ", ".join(differ)))
    enc = Encoder(drop_path=0.0, **dict(args, **stated))
    expected, got = set(enc.state_dict()), set(state)
    if expected != got:
        raise UserError(f"{path} ({what}): encoder keys do not match an encoder of "
                        f"{row.name}, dim {dim}, depth {depth}; missing: "
                        f"{sorted(expected - got)}; unexpected: {sorted(got - expected)}")
    bad = [k for k, v in enc.state_dict().items() if v.shape != state[k].shape]
    if bad:
        raise UserError(f"{path} ({what}): shapes differ from an encoder of {row.name}, "
                        f"dim {dim}, depth {depth}: " + ", ".join(
                            f"{k} {tuple(state[k].shape)} (expected "
                            f"{tuple(enc.state_dict()[k].shape)})" for k in bad[:4]))
    enc.load_state_dict(state, strict=True)
    ae = AudioEncoder(enc, kind).to(device).eval()
    ae.source, ae.finetuned = what, finetuned
    if pretrained and ae.finetuned:
        raise UserError(f"{path} is a fine-tuned checkpoint ({what}); this stage starts from "
                        "a pre-trained one")
    return ae
