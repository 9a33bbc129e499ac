"""
Benchmark: one full pre-training step (front-end, views, teacher and student forwards,
student backward, AdamW, EMA) for a method, preset and batch on this device, next to the same
step done the way the reference code did it (fp32, hand-written attention, front-end and
augmentation per clip on the CPU: for ASiT torchaudio's per-clip Kaldi fbank and its Python
GMML loop); then the data path (clips/s of one DataLoader worker reading 10 s files).
Prints numbers; asserts nothing. Compare numbers as ratios within one run.

    python bench.py --preset tiny --batch 32
    python bench.py --preset small --batch 64 --method clip
    python bench.py --preset tiny --batch 32 --method asit
    python bench.py --preset base --batch 108          # one GPU's share of the paper's 864
"""
import contextlib
import dataclasses
import math
import os
import resource
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch

import model as M
import pretrain
import pretrain_asit
import pretrain_clip
import pretrain_frame
import runtime
from augment import Mixup
from cluster import setup_distributed
from config import configure, script_config
from loaders import stream_loader

# -------------------------------------------------------------------------------- config
preset = "tiny"      # tiny | small | base
method = "frame"     # frame | clip | asit
batch = 32           # clips per step (one device)
steps = 5            # timed steps (after warmup_steps untimed ones)
warmup_steps = 2            # untimed steps first
reference = True     # also time the reference-style step
device = "auto"      # auto (CUDA when torch sees it) | cpu | cuda
dtype = "auto"       # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32: the timed step's autocast
data_files = 48      # 10 s files written for the data-path benchmark (0 = skip it)
data_batches = 6     # batches timed per format
embed_files = 16     # 10 s files embed.py embeds per kind, at this preset's size (0 = skip)
seed = 0                    # initial weights
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def manual_attention(self, x, attn_mask=None):
    """Attention the way the reference wrote it: explicit scores, softmax, fp32."""
    B, N, D = x.shape
    q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.heads)
    if attn_mask is not None:
        a = a.masked_fill(~attn_mask, float("-inf"))
    x = a.softmax(-1) @ v
    return self.proj(x.transpose(1, 2).reshape(B, N, D))


def step_flops(model_args, n_tokens, batch):
    """Matmul FLOPs of one step: per token per block 24 D^2 + 4 N D; the student runs two
    views forward and backward (x3), the teacher two views forward (heads not counted)."""
    D, L = model_args["dim"], model_args["depth"]
    per_view = batch * n_tokens * L * (24 * D * D + 4 * n_tokens * D)
    return per_view * (2 * 3 + 2)


# method -> (script, model class, views class, tokens per view at the default crop)
METHODS = {"frame": (pretrain_frame, M.ATST, "FrameViews", M.KINDS["frame"].max_tokens),
           "clip": (pretrain_clip, M.ATST, "ClipViews", M.KINDS["clip"].chunk),
           "asit": (pretrain_asit, pretrain_asit.ASiT, "AsitViews", M.KINDS["asit"].max_tokens)}


def preset_config(mod, preset):
    """A pre-training script's config for --preset, as the script itself resolves it."""
    return SimpleNamespace(**script_config(mod, "--preset", preset))


def reference_gmml(x, rng, p_replace=0.5, zeros=(0.5, 0.7), replace=0.3, max_block=0.3):
    """ASiT's corruption the way the reference code does it: per clip, a Python loop adding
    one rectangle at a time until the target share is covered (zeros for every crop in the
    workers, then the replace pass over the batch in the collate function)."""
    B, Fm, T = x.shape
    out, masks = x.clone(), torch.zeros_like(x)
    hi_t, hi_f = int(T * max_block), int(Fm * max_block)

    def rectangles(target):
        mask = torch.zeros(Fm, T)
        while mask.sum() < target * Fm * T:
            r, c = rng.integers(0, T - 1), rng.integers(0, Fm - 1)
            h, w = min(rng.integers(1, hi_t), T - r), min(rng.integers(1, hi_f), Fm - c)
            mask[c:c + w, r:r + h] = 1
        return mask.bool()
    for i in range(B):
        masks[i] = rectangles(rng.uniform(*zeros))
        out[i] = x[i].masked_fill(masks[i].bool(), 0)
    for i in range(B):
        donor = x[rng.integers(B)]
        if rng.random() < p_replace:
            m = rectangles(replace)
            out[i], masks[i] = torch.where(m, donor, x[i]), m
    return out, masks


def reference_asit_views(c, rng):
    """The ASiT data path per clip as the reference: roll, two crops, torchaudio's Kaldi
    fbank of each, then the Python GMML loops."""
    import torchaudio
    n = int(c.crop_sec * M.SAMPLE_RATE)

    def views(wav, valid, g):
        crops = [[], []]
        for w in wav.cpu():
            if rng.random() < c.roll_prob:
                w = torch.roll(w, int(rng.integers(0, len(w) + 1)))
            for k in range(2):
                start = int(rng.integers(0, len(w) - n + 1))
                x = w[start:start + n]
                fb = torchaudio.compliance.kaldi.fbank(
                    (x - x.mean())[None], htk_compat=True, sample_frequency=16000,
                    use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0,
                    frame_shift=10)
                crops[k].append(((fb[:fb.shape[0] // 16 * 16] - M.ASIT_MEAN) /
                                 (2 * M.ASIT_STD)).T)
        clean = [torch.stack(cr) for cr in crops]
        corrupt, mask = zip(*(reference_gmml(x, rng) for x in clean))
        return tuple(torch.cat(t).to(wav.device) for t in (clean, corrupt, mask))
    return views


def time_step(c, d, style):
    mod, Model, views_name, n_tokens = METHODS[c.method]
    defaults = preset_config(mod, c.preset)
    torch.manual_seed(c.seed)
    m = Model(**mod.model_args(defaults)).to(d.device)
    opt = torch.optim.AdamW(M.param_groups(m, 0.05), lr=1e-4, eps=1e-6,
                            fused=d.device.type == "cuda")
    views = getattr(mod, views_name)(defaults)
    kwargs = dict(teacher_temp=0.04) if c.method == "asit" else {}
    wav = torch.randn(c.batch, 160000) * 0.1
    valid = torch.full((c.batch,), 160000)
    dd = d
    if style == "reference":  # per clip on the CPU, then to the device; fp32; hand attention
        for n, mix in views.named_modules():  # one push so that Mixup mixes from the first step
            if isinstance(mix, Mixup):
                mix.push(torch.zeros(1, 64, int(n.split(".")[-1]) if "." in n else 1001))
        one_by_one = views

        def views(w, v, g):
            outs = [one_by_one(w[i:i + 1].cpu(), v[i:i + 1].cpu(), None)
                    for i in range(w.shape[0])]
            return tuple(None if o[0] is None else torch.cat(o).to(d.device) for o in zip(*outs))
        if c.method == "asit":
            views = reference_asit_views(defaults, np.random.default_rng(0))

        M.Attention.forward, saved = manual_attention, M.Attention.forward
        dd = dataclasses.replace(d, ctx=contextlib.nullcontext())
    else:
        views = views.to(d.device)
    batches = iter(lambda: (wav, valid), None)
    gen = torch.Generator(device=d.device).manual_seed(0)
    cuda = d.device.type == "cuda"
    try:
        for i in range(c.warmup_steps + c.steps):
            if i == c.warmup_steps:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
            pretrain.run_step(m, m, opt, views, batches, 1, dd, gen, kwargs=kwargs)
            m.update_teacher(0.999)
        if cuda:
            torch.cuda.synchronize()
    finally:
        if style == "reference":
            M.Attention.forward = saved
    dt = (time.time() - t0) / c.steps
    mem = (torch.cuda.max_memory_allocated() if cuda else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    mfu = ""
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            flops = step_flops(mod.model_args(defaults), n_tokens, c.batch)
            mfu = f" | MFU {flops / dt / peak:.1%}"
    mem_kind = "peak CUDA memory" if cuda else "peak RSS (process)"
    print(f"{style:9s} step: {dt * 1000:8.1f} ms/step | {c.batch / dt:7.1f} clips/s | "
          f"{mem_kind} {mem:.2f} GiB{mfu}", flush=True)
    return dt


def time_views(c, d):
    """The ASiT data path alone (roll, crops, Kaldi fbank, GMML on a batch): ours batched on
    the device against the reference's per-clip way, in one run."""
    defaults = preset_config(pretrain_asit, c.preset)
    wav = (torch.randn(c.batch, 160000) * 0.1).to(d.device)
    valid = torch.full((c.batch,), 160000, device=d.device)
    ours = pretrain_asit.AsitViews(defaults).to(d.device)
    ref = reference_asit_views(defaults, np.random.default_rng(0))
    g = torch.Generator(device=d.device).manual_seed(0)
    times = {}
    for name, fn in (("ours", ours), ("reference", ref)):
        fn(wav, valid, g)                                          # warm-up
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(3):
            fn(wav, valid, g)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = (time.time() - t0) / 3
        print(f"ASiT views {name:9s}: {times[name] * 1000:8.1f} ms/batch | "
              f"{c.batch / times[name]:7.1f} clips/s", flush=True)
    print(f"speed-up of the ASiT data path: {times['reference'] / times['ours']:.2f}x")


DATA_FORMATS = {  # name: (extension, sample rate, channels)
    "44.1 kHz stereo WAV (as downloaded)": ("wav", 44100, 2),
    "16 kHz mono WAV": ("wav", 16000, 1),
    "16 kHz mono FLAC (prepare.py --resample)": ("flac", 16000, 1)}


def time_data(c, d):
    """Clips/s one DataLoader worker reads (read, mono, resample, crop) from 10 s files of
    each format: what prepare.py --resample saves the training workers."""
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for name, (ext, sr, ch) in DATA_FORMATS.items():
            rows = []
            for i in range(c.data_files):
                p = os.path.join(tmp, f"{i}_{sr}_{ch}.{ext}")
                sf.write(p, (rng.standard_normal((10 * sr, ch)) * 0.1).astype(np.float32), sr)
                rows.append(dict(path=p, _where=p))
            one = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
            loader = stream_loader(rows, 10.0, 8, one, 0, 0, workers=1)
            it = iter(loader)
            next(it)  # worker start-up
            t0 = time.time()
            for _ in range(c.data_batches):
                next(it)
            rates[name] = 8 * c.data_batches / (time.time() - t0)
            print(f"data: {name:42s} 10 s clips, 1 worker: {rates[name]:7.1f} clips/s",
                  flush=True)
            del it, loader
    first, last = list(rates)[0], list(rates)[-1]
    print(f"data path after prepare.py --resample: {rates[last] / rates[first]:.2f}x the "
          "clips/s of 44.1 kHz stereo WAV")


def time_embed(c, d):
    """embed.py end to end (decoding 44.1 kHz stereo 10 s files in one worker, resampling,
    batching, encoding, writing .npz) for an encoder of each kind at this preset's size with
    random weights: files/s and hours of audio per second of wall time."""
    import embed
    import heads
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(c.embed_files):
            x = (rng.standard_normal((10 * 44100, 2)) * 0.1).astype(np.float32)
            sf.write(os.path.join(tmp, f"{i}.wav"), x, 44100)
        for kind, row in M.KINDS.items():
            args = {k: v for k, v in pretrain_frame.MODEL_PRESETS[c.preset].items()
                    if k in ("dim", "depth", "heads")}
            ae = runtime.AudioEncoder(M.Encoder(**args, **row.encoder_args()), kind)
            ck = os.path.join(tmp, f"{kind}.pt")
            torch.save(dict(kind="atst-finetune", model=heads.Classifier(ae, 1).export(),
                            classes=["x"], encoder_args=ae.encoder.args, encoder_kind=kind), ck)
            cfg = dict(script_config(embed, "--audio", tmp, "--ckpt", ck, "--device",
                                     d.device.type, "--dtype", c.dtype, "--num_workers", "1",
                                     "--out", os.path.join(tmp, f"out_{kind}")))
            t0 = time.time()
            with contextlib.redirect_stdout(None):
                embed.main(cfg)
            dt = time.time() - t0
            print(f"embed.py {row.name:10s} ({c.preset}, 10 s 44.1 kHz stereo files): "
                  f"{c.embed_files / dt:6.2f} files/s | {c.embed_files * 10 / 3600 / dt:.4f} "
                  "h of audio/s", flush=True)


if __name__ == "__main__":
    cfg = configure(globals())
    c = SimpleNamespace(**cfg)
    d = setup_distributed(c.device, c.dtype)
    name = torch.cuda.get_device_name() if d.device.type == "cuda" else "cpu"
    print(f"device {d.device} ({name}"
          f", {torch.get_num_threads()} threads) | preset {c.preset} | method {c.method} | "
          f"batch {c.batch} | torch {torch.__version__}", flush=True)
    ours = time_step(c, d, "ours")
    if c.reference:
        ref = time_step(c, d, "reference")
        print(f"speed-up over the reference-style step: {ref / ours:.2f}x")
        if c.method == "asit":
            time_views(c, d)
    if c.data_files:
        time_data(c, d)
    if c.embed_files:
        time_embed(c, d)
