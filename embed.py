"""
Embeddings of your own audio, from any checkpoint load_encoder reads (ours, the released
ATST-Frame / ATST-Clip / ASiT files): every audio file of a folder (recursively), of
comma-separated files and folders, or of a manifest (CSV / TSV with a `path` column) -> one
`.npz` per file under --out, at the file's path inside its folder (a manifest's files: inside
their common folder), `.npz` added to the name. Each holds `frames` (N, D) float32, one row per
output frame (ATST 40 ms, ASiT 160 ms), `timestamps` (N,) their centres in ms, `clip` (D',) and
`kind`, `checkpoint`, `layers`, `seconds`: numpy.load reads it without this repository (an
.npz is a zip of .npy arrays; one file per input keeps a run resumable and a reader simple).
The embeddings equal the Python API's (runtime.AudioEncoder) for the file alone.

    python embed.py my_audio/ --ckpt atstframe_base.ckpt --out emb/
    python embed.py my_list.csv --ckpt ASIT_ssl.pt --out emb_asit/ --layers all
    torchrun --nproc_per_node=8 embed.py /data/audio --ckpt X.ckpt --out emb/    # files sharded

Files are decoded and resampled to 16 kHz mono in DataLoader workers, sorted by length and
batched with their valid lengths (`batch_seconds` of padded audio per batch); bf16 autocast on
CUDA. A rerun skips files whose output exists. A file that cannot be read is listed at the end
with the reason, the others are written, and the exit status is then 1.
"""
import os
import sys
import time

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from tqdm import tqdm

from cluster import check_shared, cleanup_distributed, decide, shared_work, together
from config import configure
from data import MANIFEST_EXTS, AudioError, load_audio, named_audio, read_manifest
from downstream import start
from loaders import pad_collate
from model import SAMPLE_RATE
from plumbing import check_writable, user_errors, write_atomic
from runtime import load_encoder

# -------------------------------------------------------------------------------- config
audio = ""                  # a folder, comma-separated files / folders, or a .csv / .tsv manifest
ckpt = ""                   # any checkpoint load_encoder reads
out = "embeddings"          # output folder: one .npz per input file
layers = ""                 # blocks to return: '' = the last, all, or indices like 0,5,11
frame_pool = ""             # ASiT's 8 band tokens a frame: mean | concat; '' = the kind's (mean)
batch_seconds = 600.0       # padded audio per batch, seconds (memory ~ this x width x layers)
num_workers = 4             # DataLoader workers per rank (decoding and resampling)
device = "auto"             # auto (CUDA if torch sees it) | cpu | cuda (an error without CUDA)
dtype = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (CPU too) | fp32


def inputs(spec):
    """{path: output name} of a folder, files or a manifest (the names of a manifest's files:
    their paths inside the folder all of them share)."""
    if spec.endswith(MANIFEST_EXTS) and os.path.isfile(spec):  # a missing file: listed at the end
        paths = [r["path"] for r in read_manifest(spec, check_files=False)]
        common = os.path.commonpath([os.path.dirname(p) for p in paths])
        return {p: os.path.relpath(p, common) for p in paths}
    return named_audio(spec)


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


def main(cfg):
    c, d, t0 = start(cfg)
    named = decide(lambda: inputs(c.audio), d)  # one walk of the folder, on rank 0
    together(lambda: check_writable(c.out, "out", folder=True), d)
    check_shared(c.out, d, "out")  # rank 0 says what is done there
    target = {p: os.path.join(c.out, name + ".npz") for p, name in named.items()}
    paths = sorted(named)
    done = decide(lambda: [os.path.exists(target[p]) for p in paths], d)
    todo = [p for p, there in zip(paths, done) if not there]
    d.print(f"{len(named)} files, {len(named) - len(todo)} done before, {len(todo)} to embed")
    enc = load_encoder(c.ckpt, d.device).pool_frames(c.frame_pool)
    layer_list = None if not c.layers else "all" if c.layers == "all" else \
        [int(x) for x in c.layers.split(",")]
    enc.layer_list(layer_list)  # an impossible block index is said before any work
    lengths = shared_work(todo, samples_16k, d)  # headers, each read by one rank
    batches = batches_by_length(lengths, int(c.batch_seconds * SAMPLE_RATE))[d.rank::d.world]
    loader = torch.utils.data.DataLoader(Files(todo), batch_sampler=batches, collate_fn=collate,
                                         num_workers=c.num_workers)
    failed, seconds = [], 0.0
    for idx, wav, n, bad in tqdm(loader, disable=not d.master, desc="embedding", unit=" batch"):
        failed += [(todo[i], e) for i, e in bad]
        if not idx:
            continue
        e = enc(wav.to(d.device), SAMPLE_RATE, lengths=n, layers=layer_list, dtype=c.dtype)
        frames, stamps, clips = (x.cpu().numpy() for x in (e.frames, e.timestamps, e.clip))
        for k, (i, m, s) in enumerate(zip(idx, e.lengths.tolist(), n.tolist())):  # one copy
            save_npz(target[todo[i]], frames=frames[k, :m], timestamps=stamps[:m], clip=clips[k],
                     kind=enc.kind, checkpoint=os.path.abspath(c.ckpt), layers=c.layers or "last",
                     frame_pool=enc.frame_pool, seconds=s / SAMPLE_RATE)
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
    if not cfg["audio"] or not cfg["ckpt"]:
        raise SystemExit("embed.py needs the audio (a folder, files or a manifest) and --ckpt")
    with user_errors():
        if main(cfg):
            raise SystemExit(1)
