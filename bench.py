"""
Benchmark: one full pre-training step (front-end, views, teacher and student forwards,
student backward, AdamW, EMA) for a method, preset and batch on this device, next to the same
step done the way the reference code did it (fp32, hand-written attention, front-end and
augmentation per clip on the CPU: for ASiT torchaudio's per-clip Kaldi fbank and its Python
GMML loop); ours again with the encoders compiled (--compile) and, for ATST-Frame, with the
padding mask on the same whole batch; on CUDA the host syncs of each step; then the data path
(clips/s of one DataLoader worker reading 10 s files and the same clips packed in shards, files
opened, shared memory per batch, start-up over a 2M-row manifest).
Prints numbers; asserts nothing. Compare numbers as ratios within one run.

    python bench.py --preset tiny --batch 32
    python bench.py --preset small --batch 64 --method clip
    python bench.py --preset tiny --batch 32 --method asit
    python bench.py --preset base --batch 108          # one GPU's share of the paper's 864
"""
import contextlib
import dataclasses
import glob
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
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
from plumbing import write_table
from shards import write_shards

# -------------------------------------------------------------------------------- config
preset = "tiny"      # tiny | small | base
method = "frame"     # frame | clip | asit
batch = 32           # clips per step (one device)
steps = 5            # timed steps (after warmup_steps untimed ones)
warmup_steps = 2            # untimed steps first
reference = True     # also time the reference-style step
compile = True       # also time the step with the encoders compiled (compiling takes minutes)
device = "auto"      # auto (CUDA when torch sees it) | cpu | cuda
dtype = "auto"       # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32: the timed step's autocast
data_files = 48      # 10 s files written for the data-path benchmark (0 = skip it)
data_batches = 6     # batches timed per format
startup_rows = 2_000_000  # rows of the manifest the start-up is timed with (0 = skip it)
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


def host_syncs(step):
    """Host-device synchronisations in one call of step(), as CUDA's sync debug mode counts
    them (one warning each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def time_step(c, d, style, masked=False, compiled=False):
    """ms/step of one method's pre-training step on a batch of whole 10 s clips, ours or the
    reference's way; masked: the views give the encoders the padding mask anyway (every batch
    had it before whole batches went without); compiled: the encoders under torch.compile
    (compiled in the untimed warm-up steps). On CUDA, the host syncs of one more step."""
    mod, Model, views_name, n_tokens = METHODS[c.method]
    defaults = preset_config(mod, c.preset)
    torch.manual_seed(c.seed)
    m = Model(**mod.model_args(defaults)).to(d.device)
    if compiled:
        pretrain.compile_encoders(m)
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

        def views(w, v, g):  # each clip with its valid samples: ATST-Frame's padding mask
            v = pretrain.valid_samples(w, v)
            outs = [one_by_one(w[i:i + 1].cpu(), v[i:i + 1].cpu(), None)
                    for i in range(w.shape[0])]
            return tuple(None if o[0] is None else torch.cat(o).to(d.device) for o in zip(*outs))
        if c.method == "asit":
            views = reference_asit_views(defaults, np.random.default_rng(0))

        M.Attention.forward, saved = manual_attention, M.Attention.forward
        dd = dataclasses.replace(d, ctx=contextlib.nullcontext())
    else:
        views = views.to(d.device)
    if masked:
        whole = views
        views = lambda w, v, g: whole(w, pretrain.valid_samples(w, v), g)
    cuda = d.device.type == "cuda"
    if cuda:  # as the loader hands batches over
        wav, valid = wav.pin_memory(), valid.pin_memory()
    batches = iter(lambda: (wav, valid), None)
    gen = torch.Generator(device=d.device).manual_seed(0)

    def step():
        pretrain.run_step(m, m, opt, views, batches, 1, dd, gen, kwargs=kwargs)
        m.update_teacher(0.999)
    try:
        for i in range(c.warmup_steps + c.steps):
            if i == c.warmup_steps:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
            step()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.time() - t0) / c.steps
        syncs = f" | {host_syncs(step)} host syncs/step" if cuda else ""
    finally:
        if style == "reference":
            M.Attention.forward = saved
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
    name = style + ", compiled" * compiled + ", padding mask" * masked
    print(f"{name:28s} step: {dt * 1000:8.1f} ms/step | {c.batch / dt:7.1f} clips/s | "
          f"{mem_kind} {mem:.2f} GiB{mfu}{syncs}", flush=True)
    return dt


def time_variants(c, d, ours):
    """Our step against `ours` (no padding mask, not compiled), in this run: with the encoders
    compiled (--compile) and, for ATST-Frame, with the padding mask on the same whole batch."""
    frame = c.method == "frame"  # the one method whose views give a padding mask
    runs = [(True, False)] * frame + [(False, True), (True, True)][:1 + frame] * c.compile
    for masked, compiled in runs:
        dt = time_step(c, d, "ours", masked, compiled)
        print(f"  {dt / ours:.2f}x the time of ours without the mask, not compiled", flush=True)
    if d.device.type != "cuda":
        print("host syncs per step: not countable off CUDA (torch.cuda.set_sync_debug_mode)")


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


DATA_FORMATS = {  # name: (extension, sample rate, channels); the last is also read as shards
    "44.1 kHz stereo WAV (as downloaded)": ("wav", 44100, 2),
    "16 kHz mono WAV": ("wav", 16000, 1),
    "16 kHz mono FLAC (prepare.py --resample)": ("flac", 16000, 1)}
SHARDS = "16 kHz mono FLAC in shards (prepare.py --shards)"
READER = """
import sys, time, torch
from types import SimpleNamespace
from data import read_manifest
from loaders import stream_loader
one = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
it = iter(stream_loader(read_manifest(sys.argv[1]), 10.0, 8, one, 0, 0, workers=1))
w = next(it)[0]                                              # worker start-up
t0 = time.time()
for _ in range(int(sys.argv[2])):
    next(it)
print(time.time() - t0, w.numel() * w.element_size(), str(w.dtype)[6:])
"""
OPENS_CLIPS = 1000  # clips read under strace to count the files opened


def read_clips(manifest, batches, strace=""):
    """Reads `batches` batches of 8 ten-second crops of the manifest's rows with one
    DataLoader worker, in a child process: (clips/s, bytes of a batch's audio as the worker
    hands it over, its dtype); under strace, the files opened (beside the manifest) instead."""
    cmd = [sys.executable, "-c", READER, manifest, str(batches)]
    log = manifest + ".strace"
    if strace:
        cmd = [strace, "-f", "-qq", "-e", "trace=open,openat", "-o", log] + cmd
    out = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
                         capture_output=True, text=True).stdout.split()
    if strace:
        with open(log) as f:
            return sum(f'"{os.path.dirname(manifest)}/' in line and "ENOENT" not in line
                       and ".csv" not in line for line in f)
    return 8 * batches / float(out[-3]), int(out[-2]), out[-1]


def time_data(c, d):
    """The data path, files against shards: clips/s one DataLoader worker reads (read, mono,
    resample, crop) from 10 s clips of each format and from the 16 kHz FLAC clips packed in
    tar shards, with the bytes of a batch it hands over through shared memory (int16 from
    16-bit 16 kHz mono clips, else float32); files opened per 1,000 clips (strace, when
    installed); then the time to the end of the first step of a tiny pre-training over a
    manifest of c.startup_rows rows."""
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for name, (ext, sr, ch) in DATA_FORMATS.items():
            folder = os.path.join(tmp, f"{ext}{sr}{ch}")
            os.makedirs(folder)
            paths = [os.path.join(folder, f"{i}.{ext}") for i in range(c.data_files)]
            for p in paths:
                x = np.clip(rng.standard_normal((10 * sr, ch)) * 0.1, -1, 1)
                sf.write(p, x.astype(np.float32), sr, subtype="PCM_16")
            write_table(os.path.join(folder, "rows.csv"), ["path"], ([p] for p in paths))
        flac = os.path.join(tmp, "flac160001")
        where, _ = write_shards([(p, dict(source=p)) for p in sorted(
            glob.glob(os.path.join(flac, "*.flac")))], os.path.join(tmp, "shards"), 1)
        write_table(os.path.join(tmp, "shards", "rows.csv"), ["path", "shard_offset",
                                                              "shard_bytes"], where.values())
        manifests = {name: os.path.join(tmp, f"{e}{sr}{ch}", "rows.csv")
                     for name, (e, sr, ch) in DATA_FORMATS.items()}
        manifests[SHARDS] = os.path.join(tmp, "shards", "rows.csv")
        for name, manifest in manifests.items():
            rates[name], nbytes, dtype = read_clips(manifest, c.data_batches)
            print(f"data: {name:49s} 1 worker: {rates[name]:6.1f} clips/s | a batch of 8: "
                  f"{nbytes / 2**20:.2f} MiB of {dtype} through shared memory", flush=True)
        first, files = list(rates)[0], list(rates)[-2]
        print(f"data path: shards {rates[SHARDS] / rates[files]:.2f}x the clips/s of the same "
              f"FLAC files; {rates[SHARDS] / rates[first]:.2f}x those of 44.1 kHz stereo WAV")
        strace = shutil.which("strace")
        for name in (files, SHARDS) if strace else ():
            n = read_clips(manifests[name], OPENS_CLIPS // 8, strace)
            print(f"data: {name:49s} {n} files opened for {OPENS_CLIPS:,} clips", flush=True)
        if not strace:
            print("data: files opened not counted (no strace on this machine)")
        if c.startup_rows:
            time_startup(c, tmp, manifests[SHARDS])


def time_startup(c, tmp, shard_rows):
    """Seconds from launch to the end of step 1 of `pretrain_frame.py --preset tiny` over a
    manifest of c.startup_rows rows (repeating the shards' clips), and its peak memory."""
    big = os.path.join(tmp, "big.csv")
    with open(shard_rows) as f:
        header, *rows = f.read().splitlines()
    with open(big, "w") as f:
        f.write(header + "\n")
        f.writelines(rows[i % len(rows)] + "\n" for i in range(c.startup_rows))
    here = os.path.dirname(os.path.abspath(__file__))
    t0 = time.time()
    p = subprocess.run([sys.executable, "pretrain_frame.py", "--data", big, "--preset", "tiny",
                        "--max_steps", "1", "--num_workers", "1", "--seconds", "1",
                        "--out_dir", os.path.join(tmp, "startup")], cwd=here,
                       capture_output=True, text=True)
    dt = time.time() - t0
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    checked = re.search(r"checked in ([\d.]+) s", p.stdout)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"start-up: {c.startup_rows:,}-row manifest -> end of step 1 in {dt:.1f} s (files "
          f"checked in {checked.group(1)} s), peak RSS {peak:.2f} GiB", flush=True)


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
    time_variants(c, d, ours)
    if c.reference:
        ref = time_step(c, d, "reference")
        print(f"speed-up over the reference-style step: {ref / ours:.2f}x")
        if c.method == "asit":
            time_views(c, d)
    if c.data_files:
        time_data(c, d)
    if c.embed_files:
        time_embed(c, d)
