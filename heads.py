"""
Downstream heads over an AudioEncoder (runtime.py): the linear head of linear evaluation and
fine-tuning, the fine-tuning Classifier, the SED head and SedModel (what it trains, events in
a clip of any length), loading our fine-tuned checkpoints, and layer-wise lr decay. Section
numbers (R6, R7, R17) refer to REFERENCE.md.
"""
import torch
import torch.nn as nn

from metrics import detections, median_filter
from model import SAMPLE_RATE, TOKEN_S, Encoder, param_groups
from plumbing import UserError, autocast, load_checkpoint
from runtime import CKPT_KINDS, FINETUNED, AudioEncoder, our_kind, subtree


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
        if ae.encoder.mask_token is not None:  # pre-training's alone: never trained here (DDP
            ae.encoder.mask_token.requires_grad_(False)  # would wait for its gradient)

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
        self.ae.encoder.load_state_dict(subtree(state, "encoder."), strict=True)
        self.head.load_state_dict(subtree(state, "head."), strict=True)
        return self


class SedHead(nn.Module):
    """R7: strong s = sigmoid(W_s h) per frame; attention a = softmax over classes of
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
    (R17), so labels and the SED code are the same for every kind."""

    def __init__(self, ae, n_classes):
        super().__init__()
        self.ae, self.head = ae, SedHead(ae.dims()[0], n_classes)
        self.repeat = round(ae.frame_s / TOKEN_S)

    def forward(self, x, n, features=False):
        """x: front-end output (B, F, T), or with features=True the encoder's frames (B, N, D)
        computed before (a frozen encoder: sed.py --mode linear caches them); n: valid frames.
        -> (strong (B, N * repeat, C), weak (B, C))."""
        frames = x if features else self.ae.encode(x, n).frames
        s, w = self.head(frames, torch.arange(frames.shape[1], device=x.device) < n[:, None])
        return s.repeat_interleave(self.repeat, 1), w

    export, load_export = Classifier.export, Classifier.load_export

    def teach(self, student, x, n, wav, valid):
        """(strong, weak) as the teacher of `student` (an AudioEncoder): on the student's
        input when both share a front-end, else on its own front-end's view of the same
        waveforms (ASiT <-> ATST)."""
        if not self.ae.same_front(student):
            x, n = self.ae.features(wav, valid)
        return self(x, n)

    def trainable(self, mode):
        """What SED trains (R7): linear, the head only; finetune, also the last block and the
        final norm. The rest is frozen and stays in eval mode (train_mode)."""
        enc = self.ae.encoder
        self.requires_grad_(False)
        self.head.requires_grad_(True)
        if mode == "finetune":
            enc.blocks[-1].requires_grad_(True)
            enc.norm.requires_grad_(True)
        elif mode != "linear":
            raise SystemExit(f"--mode {mode!r}: linear or finetune")

    def train_mode(self, mode):
        self.eval()
        self.head.train()
        if mode == "finetune":
            self.ae.encoder.blocks[-1].train()

    @torch.no_grad()
    def events(self, wav, name, seconds, windows, threshold, dtype="auto"):
        """[(name, onset, offset, label)] in one 16 kHz clip of any length: strong scores,
        per-class median filter (windows, in 40 ms frames), threshold; times cut to the
        clip's `seconds`."""
        audio, lengths = self.ae.prepare(wav, SAMPLE_RATE)
        with autocast(audio.device, dtype):
            s, _ = self(*self.ae.features(audio, lengths))
        s = median_filter(s.float().cpu().numpy(), windows)
        det = detections(s, [name], self.classes, [threshold], TOKEN_S)
        return [(f, f"{min(a, seconds):.3f}", f"{min(b, seconds):.3f}", label)
                for f, a, b, label in det[threshold].itertuples(index=False)]


def on_grid(*strong):
    """Strong outputs and labels cut to their common number of 40 ms frames (ASiT's 160 ms
    frames cover 9.92 s of a 10 s clip: 248 label frames of 250)."""
    T = min(s.shape[1] for s in strong)
    return [s[:, :T] for s in strong]


def load_classifier(path, device="cpu", expect=FINETUNED):
    """A fine-tuned Classifier (atst-finetune) or SedModel (atst-sed), in eval mode, from one
    of our checkpoints of a kind in `expect`."""
    ck = load_checkpoint(path)
    kinds = {"atst-finetune": Classifier, "atst-sed": SedModel}
    if not isinstance(ck, dict) or ck.get("kind") not in expect:
        kind = ck.get("kind") if isinstance(ck, dict) else None
        what = CKPT_KINDS.get(kind, "not a fine-tuned checkpoint of ours")
        raise UserError(f"{path}: {what}; this needs " +
                        " or ".join(CKPT_KINDS[k] for k in expect))
    ae = AudioEncoder(Encoder(drop_path=0.0, **ck["encoder_args"]), our_kind(ck))
    ae.pool_frames(ck.get("frame_pool", ""))
    model = kinds[ck["kind"]](ae, len(ck["classes"])).load_export(ck["model"])
    model.classes, model.config = ck["classes"], ck.get("config", {})
    model.median_windows = ck.get("median_windows")  # SED: the windows validation chose
    return model.to(device).eval()


def layer_decay_groups(model, decay=0.75, weight_decay=0.0):
    """SGD groups with lr_scale for layer-wise lr decay (R6): head 1, final norm decay,
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
