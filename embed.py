"""
Embeddings of your own audio, from any checkpoint load_encoder reads (ours, the released
ATST-Frame / ATST-Clip / ASiT files): every audio file of a folder (recursively), of
comma-separated files and folders, or of a manifest (CSV / TSV with a `path` column) -> one
`.npz` per file under --out, at the file's path inside the folder given (files given, or a
manifest's: inside the deepest folder holding them all), `.npz` added to the name. Each holds
`frames` (N, D) float32, one row per output frame (ATST 40 ms, ASiT 160 ms), `timestamps` (N,)
their centres in ms, `clip` (D',), `seconds`, and what made it (made_by: checkpoint and its
sha256, kind, layers, frame_pool, precision): numpy.load reads it without this repository (an
.npz is a zip of .npy arrays; one file per input keeps a run resumable and a reader simple).
The embeddings equal the Python API's (runtime.AudioEncoder) for the file alone.

    python embed.py my_audio/ --ckpt atstframe_base.ckpt --out emb/
    python embed.py my_list.csv --ckpt ASIT_ssl.pt --out emb_asit/ --layers all
    python embed.py --files_from list.txt --ckpt X.ckpt --out emb/   # one path a line
    torchrun --nproc_per_node=8 embed.py /data/audio --ckpt X.ckpt --out emb/    # files sharded

Files are decoded and resampled to 16 kHz mono in DataLoader workers, sorted by length and
batched with their valid lengths (`batch_seconds` of padded audio per batch); bf16 autocast on
CUDA. --out is locked for one job at a time. A rerun skips files whose output exists, after
checking that they were made as this run would make them (--out/embeddings.json): another
checkpoint or other settings are refused, not mixed in. A file that cannot be read is listed
at the end with the reason, the others are written, and the exit status is then 1.
"""
import json
import os
import sys
import time

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from tqdm import tqdm

from cluster import claim_out_dir, cleanup_distributed, decide, shared_work
from config import configure
from data import AudioError, load_audio, named_audio, on_device
from downstream import start
from loaders import make_loader, pad_collate
from model import SAMPLE_RATE
from plumbing import (UserError, digest, remove_partials, save_json, user_errors,
                      write_atomic)
from runtime import load_encoder

# -------------------------------------------------------------------------------- config
audio = ""                  # a folder, comma-separated files / folders, or a .csv / .tsv manifest
files_from = ""             # or a text file listing files / folders, one a line (commas kept)
ckpt = ""                   # any checkpoint load_encoder reads
out = "embeddings"          # output folder: one .npz per input file
layers = ""                 # blocks to return: '' = the last, all, or indices like 0,5,11
frame_pool = ""             # ASiT's 8 band tokens a frame: mean | concat; '' = the kind's (mean)
batch_seconds = 600.0       # padded audio per batch, seconds (memory ~ this x width x layers)
num_workers = -1            # DataLoader workers per rank (decode, resample); -1: CPUs / ranks - 1
device = "auto"             # auto (CUDA if torch sees it) | cpu | cuda (an error without CUDA)
dtype = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (CPU too) | fp32


RECORD = "embeddings.json"  # in --out: what made the embeddings there (made_by)


def made_by(c, enc, precision):
    """What shapes the numbers of an embedding: the checkpoint (by what it holds: the same file
    under another name is the same), kind, layers, frame pooling, precision. Written in
    --out/embeddings.json and in every .npz."""
    return dict(checkpoint=os.path.abspath(c.ckpt) if os.path.exists(c.ckpt) else c.ckpt,
                checkpoint_sha256=digest(c.ckpt) or "", kind=enc.kind,
                layers=c.layers or "last", frame_pool=enc.frame_pool, precision=precision)


def check_record(out, made, targets):
    """Embeddings already in `out` were made as this run makes them, else a UserError saying
    what differs: a rerun with another checkpoint or settings never keeps old numbers as
    new. Without a record (files written by an older version, or by hand) the first existing
    target's own fields are compared."""
    path = os.path.join(out, RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            then, where = json.load(f), path
    else:
        if not targets:
            return
        try:
            with np.load(targets[0]) as z:
                then, where = {k: z[k].item() for k in made if k in z.files}, targets[0]
        except (OSError, ValueError) as e:  # BadZipFile is an OSError
            raise UserError(f"--out {out}: {targets[0]} is not an embedding this script can "
                            f"read ({e}): give another --out") from None
    keys = [k for k in ("checkpoint_sha256", "kind", "layers", "frame_pool", "precision")
            if k in then]  # a file of an older version holds fewer
    if not then.get("checkpoint_sha256"):  # a Hub id, or a file from before the hash
        keys.append("checkpoint")
    differ = [f"{k} {then.get(k)!r}, this run {made[k]!r}" for k in keys
              if then.get(k) != made[k]]
    if differ:
        raise UserError(f"--out {out} holds embeddings made otherwise ({where}: " +
                        "; ".join(differ) + "): give another --out")


class Files(torch.utils.data.Dataset):
    """(index, mono 16 kHz waveform or None, error or None) of each file: read in workers."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, load_audio(self.paths[i])[0], None
        except AudioError as e:
            return i, None, str(e)


def samples_16k(path):
    """A file's length in 16 kHz samples from its header (1 when unreadable: the worker that
    reads it says why)."""
    try:
        info = sf.info(path)
        return max(1, int(info.frames * SAMPLE_RATE / info.samplerate))
    except (RuntimeError, sf.LibsndfileError):
        return 1


def batches_by_length(lengths, budget):
    """Indices sorted by length, cut into batches whose padded size stays within `budget`
    samples (a longer file alone)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out, cur = [], []
    for i in order:
        if cur and lengths[i] * (len(cur) + 1) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def collate(items):
    """(indices, padded waveforms, lengths) of the readable files, (index, error) of the rest."""
    good = [(w, len(w), torch.tensor(i)) for i, w, _ in items if w is not None]
    wav, lengths, idx = pad_collate(good) if good else (None, None, torch.zeros(0))
    return idx.tolist(), wav, lengths, [(i, e) for i, _, e in items if e is not None]


def save_npz(path, **arrays):
    """np.savez, atomically: a killed run leaves no torn file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def layer_list(layers):
    """--layers as AudioEncoder takes it: None (the last block), 'all' or block indices."""
    if layers in ("", "all"):
        return layers or None
    try:
        return [int(x) for x in layers.split(",")]
    except ValueError:
        raise UserError(f"--layers {layers!r}: give all, or block indices like 0,5,11") \
            from None


def main(cfg):
    c, d, t0 = start(cfg)
    layers = layer_list(c.layers)
    named = decide(lambda: named_audio(c.audio, c.files_from), d)  # one walk, on rank 0
    claim_out_dir(c.out, d, "out")  # locked for this job; rank 0 says what is done there
    target = {p: os.path.join(c.out, name + ".npz") for p, name in named.items()}
    paths = sorted(named)
    done = decide(lambda: [os.path.exists(target[p]) for p in paths], d)
    todo = [p for p, there in zip(paths, done) if not there]
    d.print(f"{len(named)} files, {len(named) - len(todo)} done before, {len(todo)} to embed")
    enc = load_encoder(c.ckpt, d.device).pool_frames(c.frame_pool)
    enc.layer_list(layers)  # an impossible block index is said before any work
    made = decide(lambda: made_by(c, enc, d.precision), d)  # the checkpoint hashed once
    decide(lambda: check_record(c.out, made, [target[p] for p, there in zip(paths, done)
                                              if there]), d)
    if d.master:
        save_json(made, os.path.join(c.out, RECORD))
        for folder in sorted({os.path.dirname(target[p]) for p in todo} - {c.out}):
            remove_partials(folder)  # what a killed run left (claim_out_dir did c.out)
    lengths = shared_work(todo, samples_16k, d)  # headers, each read by one rank
    batches = batches_by_length(lengths, int(c.batch_seconds * SAMPLE_RATE))[d.rank::d.world]
    loader = make_loader(Files(todo), d.device, c.num_workers, batch_sampler=batches,
                         collate_fn=collate)
    failed, seconds = [], 0.0
    for idx, wav, n, bad in tqdm(loader, disable=not d.master, desc="embedding", unit=" batch"):
        failed += [(todo[i], e) for i, e in bad]
        if not idx:
            continue
        e = enc(on_device(wav, d.device), SAMPLE_RATE, lengths=n.to(d.device, non_blocking=True),
                layers=layers, dtype=c.dtype)
        frames, stamps, clips = (x.cpu().numpy() for x in (e.frames, e.timestamps, e.clip))
        for k, (i, m, s) in enumerate(zip(idx, e.lengths.tolist(), n.tolist())):  # one copy
            save_npz(target[todo[i]], frames=frames[k, :m], timestamps=stamps[:m], clip=clips[k],
                     seconds=s / SAMPLE_RATE, **made)
            seconds += s / SAMPLE_RATE
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, (failed, seconds))
        failed, seconds = [f for p, _ in parts for f in p], sum(s for _, s in parts)
    dt = time.time() - t0
    d.print(f"embedded {len(todo) - len(failed)} files ({seconds / 3600:.3f} h of audio) in "
            f"{dt:.0f}s -> {c.out}" + "".join(f"\nfailed: {p}: {e}" for p, e in failed))
    cleanup_distributed()
    return failed


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):  # the audio may come first, as a positional
        argv = ["--audio", argv[0], *argv[1:]]
    cfg = configure(globals(), argv=argv)
    if not (cfg["audio"] or cfg["files_from"]) or not cfg["ckpt"]:
        raise SystemExit("embed.py needs the audio (a folder, files or a manifest; or "
                         "--files_from LIST) and --ckpt")
    with user_errors():
        if main(cfg):
            raise SystemExit(1)
