"""
I/O for every stage: config flags, the distributed preamble, checkpoints and logs, manifests
and named datasets, audio loading for DataLoader workers, and the built-in demo data.

    python data.py demo [--data_root DIR]            # generate the demo data (cached)
    python data.py manifest AUDIO_DIR OUT.csv        # manifest for a folder of audio files

Manifests (SPEC 8) are CSV files with a header: `path` (relative to the CSV's folder or
absolute), and `label` (single-label) or `labels` (multi-label, `;`-separated) when labelled.
A named dataset NAME lives at DATA_ROOT/NAME/{train,valid,test}.csv (README: "Data layout").
"""
import argparse
import contextlib
import csv
import datetime
import fcntl
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
import torchaudio
from tqdm import tqdm

from model import SAMPLE_RATE

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
NAMED = ("as1.9m", "as200k", "as20k", "as2m", "us8k", "spcv2", "vox1", "nsynth", "fsd50k",
         "dcase2022")
DEMO = {"demo": "pretrain", "demo_events": "events", "demo_tags": "tags", "demo_sed": "sed"}

# ----------------------------------------------------------------------------------------------
# Config: the commented globals of a stage script become --flags


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def config_keys(g):
    """The config globals of a script: public int/float/bool/str values with lower-case names
    (UPPER_CASE names are constants, imported or not)."""
    return [k for k, v in g.items() if not k.startswith("_") and not k.isupper()
            and type(v) in (int, float, bool, str)]


def configure(g, presets=None, argv=None, key="preset", help_files=()):
    """Expose every int/float/bool/str global defined so far in the script as --name (same type
    as its default; help = the comment on its line). `--<key> V` first applies presets[V] (when
    there is one) to the globals, then explicit flags override. Updates the globals; returns
    the config dict. help_files: more sources of comments (a script extending another's config)."""
    keys = config_keys(g)
    helps = {}
    for path in (*help_files, g["__file__"]):
        with open(path) as f:
            for line in f:
                m = re.match(r"^(\w+)\s*=.*?#\s*(.*)$", line)
                if m:
                    helps[m.group(1)] = m.group(2)
    argv = sys.argv[1:] if argv is None else argv
    if presets and key in keys:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument(f"--{key}", default=g[key])
        g[key] = pre.parse_known_args(argv)[0].__dict__[key]
        if key == "preset" and g[key] not in presets:
            raise SystemExit(f"--preset {g[key]!r}: choose one of {sorted(presets)}")
        g.update(presets.get(g[key], {}))
    parser = argparse.ArgumentParser(description=g.get("__doc__", "").split("\n\n")[0].strip())
    for k in keys:
        typ = str2bool if type(g[k]) is bool else type(g[k])
        parser.add_argument(f"--{k}", type=typ, default=g[k], help=(helps.get(k, "") +
                            f" (default {g[k]!r})").replace("%", "%%"))
    g.update(vars(parser.parse_args(argv)))
    return {k: g[k] for k in keys}

# ----------------------------------------------------------------------------------------------
# Distributed and precision preamble: torchrun -> nccl on CUDA, gloo on CPU; bf16 on CUDA


@dataclass
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    master: bool
    ctx: object  # autocast context (bf16 on CUDA, a no-op on CPU)

    def print(self, *a, **k):
        if self.master:
            print(*a, **k, flush=True)


def setup_distributed(device="auto"):
    cuda = torch.cuda.is_available() and device != "cpu"
    ddp = "RANK" in os.environ
    rank, local, world = 0, 0, 1
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
        torch.set_float32_matmul_precision("high")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        dev, ctx = torch.device("cpu"), contextlib.nullcontext()
    return Dist(rank, local, world, dev, rank == 0, ctx)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def my_shard(n, d):
    """Indices of n items this rank handles (round robin)."""
    return list(range(d.rank, n, d.world))


def gather_shards(mine, x, n, d):
    """Reassemble per-rank rows (x computed for indices `mine`) into all n rows, on CPU."""
    if d.world == 1:
        return x
    parts = [None] * d.world
    dist.all_gather_object(parts, (mine, x.cpu()))
    full = torch.zeros(n, *x.shape[1:], dtype=x.dtype)
    for idx, part in parts:
        full[idx] = part
    return full


def all_mean(x, d):
    """Mean of a float tensor over ranks (a no-op on one process)."""
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x

# ----------------------------------------------------------------------------------------------
# Checkpoints and logs


def save_atomic(obj, path, summary=None):
    """torch.save to a temporary file, fsync, then rename: a killed run never leaves a torn
    checkpoint. `summary` (JSON-able) is written beside it as PATH.json for people."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if summary is not None:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        os.replace(tmp, path + ".json")


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e


class Log:
    """One fixed-format line per interval on rank 0, plus the same fields in out_dir/log.jsonl."""

    def __init__(self, out_dir, master):
        self.path = os.path.join(out_dir, "log.jsonl") if master else None

    def __call__(self, rec, line):
        if self.path is None:
            return
        tqdm.write(line)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

# ----------------------------------------------------------------------------------------------
# Manifests and named datasets


def read_manifest(csv_path, label_col=None):
    """Rows of a CSV manifest as dicts, with `path` made absolute. Errors name file and row."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"manifest not found: {csv_path}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "path" not in cols:
            raise ValueError(f"{csv_path}: no 'path' column (columns: {cols}); "
                             "see SPEC 8 / README 'Data layout'")
        if label_col and label_col not in cols:
            raise ValueError(f"{csv_path}: no '{label_col}' column (columns: {cols})")
        root = os.path.dirname(os.path.abspath(csv_path))
        rows = []
        for i, r in enumerate(reader, start=2):  # line 1 is the header
            if not r["path"]:
                raise ValueError(f"{csv_path} line {i}: empty path")
            r["path"] = os.path.normpath(os.path.join(root, r["path"]))
            r["_where"] = f"{csv_path} line {i}"
            rows.append(r)
    if not rows:
        raise ValueError(f"{csv_path}: manifest is empty")
    return rows


def write_manifest(folder, out_csv):
    """Manifest of every audio file under `folder` (paths relative to the CSV's folder)."""
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith(AUDIO_EXTS))
    if not files:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTS)}) under {folder}")
    base = os.path.dirname(os.path.abspath(out_csv))
    os.makedirs(base, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([os.path.relpath(os.path.abspath(p), base)] for p in files)
    return len(files)


def default_data_root():
    return os.environ.get("ATST_DATA", "data")


def resolve_manifest(data, split="train", data_root=None):
    """`data` is a CSV path, a named dataset (DATA_ROOT/NAME/SPLIT.csv) or a demo name."""
    root = data_root or default_data_root()
    if data.endswith(".csv"):
        return data
    if data in DEMO:
        make_demo(root)
        return os.path.join(root, "demo", DEMO[data], f"{split}.csv")
    path = os.path.join(root, data, f"{split}.csv")
    if not os.path.isfile(path):
        known = ", ".join(NAMED + tuple(DEMO))
        raise FileNotFoundError(f"dataset {data!r}: expected {path} (data root {root!r}, set by "
                                f"--data_root or $ATST_DATA). Named datasets: {known}; "
                                "or pass a CSV manifest path. Layouts: README 'Data layout'.")
    return path

# ----------------------------------------------------------------------------------------------
# Audio loading (runs in DataLoader workers: read, mono, resample, crop; nothing else)


class AudioError(RuntimeError):
    pass


def load_audio(path, seconds=None, rng=None, where="", pad=True):
    """Mono 16 kHz float32 waveform and its valid samples. With `seconds`: a crop of that
    length, random (rng) or centred (no rng), of longer clips; shorter ones are zero-padded
    to it unless pad=False. Reads only the crop when the file is already at 16 kHz."""
    tag = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise AudioError(f"{tag}audio file not found: {path}")
    try:
        info = sf.info(path)
        sr, total = info.samplerate, info.frames
        start, count = 0, total
        if seconds is not None:
            need = math.ceil(seconds * sr)
            if total > need:
                start = int(rng.integers(0, total - need + 1)) if rng is not None else \
                    (total - need) // 2
                count = need
        x, _ = sf.read(path, start=start, frames=count, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:  # LibsndfileError is a RuntimeError
        raise AudioError(f"{tag}cannot read audio file {path}: {e}") from None
    if x.shape[0] == 0:
        raise AudioError(f"{tag}audio file has zero length: {path}")
    wav = torch.from_numpy(x.mean(1))
    if not torch.isfinite(wav).all():
        raise AudioError(f"{tag}audio file has NaN or infinite samples: {path}")
    if sr != SAMPLE_RATE:
        wav = torchaudio.functional.resample(wav, sr, SAMPLE_RATE)
    if seconds is None:
        return wav, wav.shape[0]
    n = int(round(seconds * SAMPLE_RATE))
    valid = min(wav.shape[0], n)
    return torch.nn.functional.pad(wav[:n], (0, n - valid) if pad else (0, 0)), valid


class ClipDataset(torch.utils.data.Dataset):
    """Random `seconds`-long crops of manifest rows. Items are (index, key) pairs from
    StreamSampler; the crop is drawn from an RNG seeded by (seed, key), so it does not depend
    on the worker count or on where a run was resumed."""

    def __init__(self, rows, seconds, seed=0):
        self.rows, self.seconds, self.seed = rows, seconds, seed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, item):
        idx, key = item
        r = self.rows[idx]
        rng = np.random.default_rng([self.seed, key])
        wav, valid = load_audio(r["path"], self.seconds, rng, r["_where"])
        return wav, valid


class StreamSampler(torch.utils.data.Sampler):
    """Endless stream of micro-batches of (index, key) for one rank. Micro-batch g of the whole
    run is the same on every launch: epoch e = g // per_epoch is a permutation seeded by
    (seed, e), split into world * batch blocks (the incomplete tail is dropped), rank r takes
    its slice. `start` skips to micro-batch `start` (resume)."""

    def __init__(self, n_items, batch, rank=0, world=1, seed=0, start=0):
        self.n, self.batch, self.rank, self.world, self.seed = n_items, batch, rank, world, seed
        self.start = start
        self.per_epoch = n_items // (batch * world)
        if self.per_epoch == 0:
            raise ValueError(f"the dataset has {n_items} clips but one micro-batch over all "
                             f"ranks needs {batch * world}")

    def __iter__(self):
        g, perm_epoch, perm = self.start, -1, None
        while True:
            e, b = divmod(g, self.per_epoch)
            if e != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed * 100003 + e)).tolist()
                perm_epoch = e
            base = (b * self.world + self.rank) * self.batch
            yield [(perm[base + i], e * self.n + base + i) for i in range(self.batch)]
            g += 1


def stream_loader(rows, seconds, batch, d, seed, start, workers):
    """DataLoader of (wav (B, S), valid (B,)) for pre-training, resumable at micro-batch start."""
    sampler = StreamSampler(len(rows), batch, d.rank, d.world, seed, start)
    return torch.utils.data.DataLoader(
        ClipDataset(rows, seconds, seed), batch_sampler=sampler, num_workers=workers,
        pin_memory=d.device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)

# ----------------------------------------------------------------------------------------------
# Labelled clips (downstream): label sets, held-out validation, padded batches


class Labels:
    """Classes of a task, from the training rows (sorted) unless given. Column `label` is
    single-label (targets: class index), `labels` multi-label (`;`-separated; multi-hot)."""

    def __init__(self, rows, classes=None):
        self.col = "labels" if "labels" in rows[0] else "label"
        if self.col not in rows[0]:
            raise ValueError(f"{rows[0]['_where'].split(' line')[0]}: no 'label' or 'labels' "
                             "column; labelled manifests need one (README 'Data layout')")
        self.multi = self.col == "labels"
        self.classes = list(classes) if classes else \
            sorted({c for r in rows for c in self.split(r)})
        self.index = {c: i for i, c in enumerate(self.classes)}

    def split(self, r):
        v = r.get(self.col)
        if v is None:
            raise ValueError(f"{r['_where']}: no '{self.col}' value")
        return [c for c in v.split(";") if c] if self.multi else [v]

    def encode(self, rows):
        """Targets for rows: (N,) long or (N, C) float. An unknown label is an error."""
        out = torch.zeros(len(rows), len(self.classes)) if self.multi else \
            torch.zeros(len(rows), dtype=torch.long)
        for i, r in enumerate(rows):
            for c in self.split(r):
                if c not in self.index:
                    raise ValueError(f"{r['_where']}: label {c!r} is not one of the "
                                     f"{len(self.classes)} training classes")
                if self.multi:
                    out[i, self.index[c]] = 1
                else:
                    out[i] = self.index[c]
        return out


def task_splits(data, data_root=None, test_csv="", valid_csv="", folds=0, fold=0,
                valid_frac=0.1, seed=0):
    """(train, valid, test) rows of a labelled task: a named dataset (DATA_ROOT/NAME/
    {train,valid,test}.csv; valid optional) or a train CSV with test_csv (and valid_csv).
    Without a valid split, a fixed valid_frac of train is held out: the test set is never used
    for choices. With folds > 0 (US8K), train rows carry a `fold` column; fold `fold` is the
    test set."""
    csv_given = data.endswith(".csv")
    train = read_manifest(resolve_manifest(data, "train", data_root))
    valid, test = [], []
    if folds:
        if "fold" not in train[0]:
            raise ValueError(f"{train[0]['_where'].split(' line')[0]}: --folds needs a 'fold' "
                             "column")
        test = [r for r in train if int(r["fold"]) == fold]
        train = [r for r in train if int(r["fold"]) != fold]
        if not test:
            raise ValueError(f"no rows of fold {fold} in {data}")
    else:
        if csv_given and not test_csv:
            raise ValueError(f"--data {data} is a CSV: give its test split with --test_csv")
        test = read_manifest(test_csv or resolve_manifest(data, "test", data_root))
        vpath = valid_csv or ("" if csv_given else
                              os.path.join(os.path.dirname(resolve_manifest(data, "train",
                                                                            data_root)),
                                           "valid.csv"))
        valid = read_manifest(vpath) if vpath and os.path.isfile(vpath) else []
    if not valid:
        train, valid = hold_out(train, valid_frac, seed)
    return train, valid, test


def hold_out(items, frac, seed):
    """(kept, held out): a fixed random `frac` of items (at least one) held out, order kept."""
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n = max(1, int(len(items) * frac))
    return [items[i] for i in sorted(perm[n:])], [items[i] for i in sorted(perm[:n])]


class LabelledClips(torch.utils.data.Dataset):
    """(wav, valid samples, target) of manifest rows. Training: a random `seconds` crop (RNG
    from (seed, epoch, index); call set_epoch), zero-padded. Evaluation: the centre
    `seconds` of longer clips, unpadded (pad_collate pads the batch)."""

    def __init__(self, rows, targets, seconds, train=False, seed=0):
        self.rows, self.targets, self.seconds, self.train, self.seed = rows, targets, seconds, \
            train, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        wav, valid = load_audio(r["path"], self.seconds, rng, r["_where"], pad=self.train)
        return wav, valid, self.targets[i]


def pad_collate(batch):
    """Zero-pad a list of (wav, valid, target) to the longest clip: (B, S), (B,), targets."""
    wavs, valid, targets = zip(*batch)
    out = torch.zeros(len(wavs), max(w.shape[0] for w in wavs))
    for i, w in enumerate(wavs):
        out[i, :w.shape[0]] = w
    return out, torch.tensor(valid), torch.stack(targets)


# ----------------------------------------------------------------------------------------------
# SED (DESED TSVs): strong `filename onset offset event_label`, weak `filename event_labels`,
# durations `filename duration`; strong labels <-> 40 ms frames (SPEC 7)

FRAME_S = 0.04  # one encoder token


def read_tsv(path, columns):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TSV not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        rows = [dict(r, _where=f"{path} line {i}") for i, r in enumerate(reader, start=2)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_durations(path):
    return {r["filename"]: float(r["duration"]) for r in read_tsv(path, ["filename", "duration"])}


def read_strong(path, classes=None, durations=None):
    """{filename: [(onset, offset, label), ...]}; rows without a label keep an empty clip.
    Errors name the row: unknown label, onset after offset, event past the clip's duration,
    clip missing from the durations; with durations (an evaluation set), also two events of
    one class overlapping in one clip (PSDS needs them merged)."""
    events, where = {}, {}
    for r in read_tsv(path, ["filename", "onset", "offset", "event_label"]):
        ev = events.setdefault(r["filename"], [])
        if not r["event_label"]:
            continue
        try:
            on, off = float(r["onset"]), float(r["offset"])
        except ValueError:
            raise ValueError(f"{r['_where']}: onset/offset are not numbers") from None
        if classes is not None and r["event_label"] not in classes:
            raise ValueError(f"{r['_where']}: event label {r['event_label']!r} is not in the "
                             f"class list ({', '.join(classes)})")
        if not 0 <= on < off:
            raise ValueError(f"{r['_where']}: onset {on} is not before offset {off}")
        if durations is not None:
            if r["filename"] not in durations:
                raise ValueError(f"{r['_where']}: clip {r['filename']} is missing from the "
                                 "durations file")
            if off > durations[r["filename"]] + FRAME_S:
                raise ValueError(f"{r['_where']}: event ends at {off} s, after the clip's "
                                 f"duration {durations[r['filename']]} s")
        if durations is not None:
            for a, b, lab in ev:
                if lab == r["event_label"] and on < b and a < off:
                    raise ValueError(f"{r['_where']}: overlaps {where[(a, b, lab, r['filename'])]}"
                                     f" ({lab} {a}-{b}); merge same-class events")
        where[(on, off, r["event_label"], r["filename"])] = r["_where"]
        ev.append((on, off, r["event_label"]))
    return events


def read_weak(path, classes=None):
    """{filename: [labels]} from a weak TSV (labels comma-separated)."""
    out = {}
    for r in read_tsv(path, ["filename", "event_labels"]):
        labels = [c for c in r["event_labels"].split(",") if c]
        bad = [c for c in labels if classes is not None and c not in classes]
        if bad:
            raise ValueError(f"{r['_where']}: event label(s) {bad} not in the class list")
        out[r["filename"]] = labels
    return out


def encode_strong(events, classes, n_frames):
    """(n_frames, C) 0/1 targets: frames floor(onset / 0.04) to ceil(offset / 0.04)."""
    y = torch.zeros(n_frames, len(classes))
    for on, off, label in events:
        a, b = int(math.floor(on / FRAME_S)), int(math.ceil(off / FRAME_S))
        y[a:min(b, n_frames), classes.index(label)] = 1
    return y


def decode_strong(active, classes):
    """Events (onset, offset, label) from (T, C) booleans: runs of active frames."""
    a = np.pad(np.asarray(active, dtype=np.int8), ((1, 1), (0, 0)))
    d = np.diff(a, axis=0)
    starts, ends = np.nonzero(d.T == 1), np.nonzero(d.T == -1)  # (class, frame), class-major
    return [(float(s * FRAME_S), float(e * FRAME_S), classes[c]) for c, s, e in
            zip(starts[0], starts[1], ends[1])]


class SedClips(torch.utils.data.Dataset):
    """(wav, valid samples, target) of SED clips: strong targets (T, C) or weak ones (C,)."""

    def __init__(self, audio_dir, files, targets, seconds=10.0):
        self.audio_dir, self.files, self.targets, self.seconds = audio_dir, files, targets, seconds

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        wav, valid = load_audio(os.path.join(self.audio_dir, self.files[i]), self.seconds,
                                where=f"{self.audio_dir} clip {self.files[i]}")
        return wav, valid, self.targets[i]


# ----------------------------------------------------------------------------------------------
# Demo data: deterministic synthetic sounds whose classes differ in spectro-temporal structure
# (pitch contour, modulation, envelope, bandwidth), never in loudness alone: every event and
# background gets a random gain, and pitch / band / rate are drawn per event.

DEMO_VERSION = 2
EVENTS = ("tone", "vibrato", "chirp_up", "chirp_down", "pluck", "clicks", "band_noise",
          "tremolo_noise")


def _bandpass(x, sr, lo, hi):
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, len(x))


def synth_event(kind, dur, rng, sr=SAMPLE_RATE):
    """One event of class `kind`, `dur` seconds, peak-normalised."""
    n = int(dur * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(150, 700)
    harm = lambda phase: sum(np.sin(k * phase) / k for k in range(1, 5))
    if kind == "tone":
        x = harm(2 * np.pi * f0 * t)
    elif kind == "vibrato":
        rate, depth = rng.uniform(5, 8), rng.uniform(0.04, 0.08)
        x = harm(2 * np.pi * f0 * t - depth * f0 / rate * np.cos(2 * np.pi * rate * t))
    elif kind in ("chirp_up", "chirp_down"):
        a, b = rng.uniform(200, 500), rng.uniform(2000, 4000)
        if kind == "chirp_down":
            a, b = b, a
        k = np.log(b / a) / max(dur, 1e-3)
        x = np.sin(2 * np.pi * a * (np.exp(k * t) - 1) / k)
    elif kind == "pluck":
        x = np.zeros(n)
        period = rng.uniform(0.15, 0.35)
        for s in np.arange(0, dur, period):
            m = t >= s
            x[m] += harm(2 * np.pi * f0 * (t[m] - s)) * np.exp(-(t[m] - s) * rng.uniform(15, 30))
    elif kind == "clicks":
        x = np.zeros(n)
        rate = rng.uniform(6, 14)
        for s in np.arange(rng.uniform(0, 1 / rate), dur, 1 / rate):
            i = int(s * sr)
            c = rng.standard_normal(min(80, n - i)) * np.exp(-np.arange(min(80, n - i)) / 15)
            x[i:i + len(c)] += c
    elif kind == "band_noise":
        c = rng.uniform(800, 4000)
        x = _bandpass(rng.standard_normal(n), sr, c / 1.3, c * 1.3)
    elif kind == "tremolo_noise":
        rate = rng.uniform(2, 4)
        x = rng.standard_normal(n) * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t)) ** 2
        x = _bandpass(x, sr, 100, 6000)
    else:
        raise ValueError(kind)
    ramp = np.minimum(1, np.minimum(t, dur - t) / 0.01)  # 10 ms fades: no clicks at the edges
    x = x * ramp
    return x / (np.abs(x).max() + 1e-9)


def _background(n, rng):
    """Pink-ish noise at a random level (about 25-45 dB below the events)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9) * 10 ** (rng.uniform(-45, -25) / 20)


def synth_scene(dur, n_events, rng, classes=EVENTS, min_len=0.4, max_len=3.0):
    """A `dur`-second scene: background + events at random times. Returns (audio, events)."""
    n = int(dur * SAMPLE_RATE)
    x = _background(n, rng)
    events = []
    # distinct classes per scene: same-class events never overlap (psds_eval rejects that)
    for k in rng.choice(len(classes), min(n_events, len(classes)), replace=False):
        kind = classes[k]
        length = min(rng.uniform(min_len, max_len), dur)
        onset = rng.uniform(0, dur - length)
        e = synth_event(kind, length, rng) * 10 ** (rng.uniform(-20, 0) / 20)
        i = int(onset * SAMPLE_RATE)
        x[i:i + len(e)] += e[:n - i]
        events.append((round(onset, 3), round(onset + length, 3), kind))
    return x / max(1.0, np.abs(x).max() / 0.99), events


def _write(path, x, sr=SAMPLE_RATE):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t" if path.endswith(".tsv") else ",")
        w.writerow(header)
        w.writerows(rows)


def make_demo(root=None, force=False):
    """Generate the demo data under ROOT/demo once (a lock makes concurrent ranks wait)."""
    root = root or default_data_root()
    out = os.path.join(root, "demo")
    stamp = os.path.join(out, "VERSION")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".demo.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and os.path.isfile(stamp) and open(stamp).read().strip() == str(DEMO_VERSION):
            return out
        t0 = time.time()
        _make_demo(out)
        with open(stamp, "w") as f:
            f.write(f"{DEMO_VERSION}\n")
        print(f"demo data written to {out} in {time.time() - t0:.1f}s", flush=True)
    return out


def _make_demo(out):
    rng = np.random.default_rng(1234)
    # unlabeled pre-training corpus: 10 s scenes with 2-6 events
    rows = []
    for i in range(256):
        x, _ = synth_scene(10.0, int(rng.integers(2, 7)), rng)
        _write(os.path.join(out, "pretrain", "audio", f"{i:04d}.wav"), x)
        rows.append([f"audio/{i:04d}.wav"])
    _write_csv(os.path.join(out, "pretrain", "train.csv"), ["path"], rows)
    # single-label task: one event of 1-4 s per clip; the test split is 22.05 kHz stereo so
    # that the resampling and down-mixing path is exercised
    for split, n in (("train", 320), ("valid", 80), ("test", 160)):
        rows = []
        for i in range(n):
            kind = EVENTS[i % len(EVENTS)]
            dur = rng.uniform(1.0, 4.0)
            x = _background(int(dur * SAMPLE_RATE), rng)
            x += synth_event(kind, dur, rng) * 10 ** (rng.uniform(-20, 0) / 20)
            name = f"audio/{split}_{i:04d}.wav"
            if split == "test":
                x = torchaudio.functional.resample(torch.from_numpy(x).float(), SAMPLE_RATE,
                                                   22050).numpy()
                x = np.stack([x, 0.8 * x], 1)
                _write(os.path.join(out, "events", name), x, 22050)
            else:
                _write(os.path.join(out, "events", name), x)
            rows.append([name, kind])
        _write_csv(os.path.join(out, "events", f"{split}.csv"), ["path", "label"], rows)
    # multi-label task: 6 s scenes with 1-3 events, tagged with the classes present
    for split, n in (("train", 240), ("valid", 60), ("test", 120)):
        rows = []
        for i in range(n):
            x, ev = synth_scene(6.0, int(rng.integers(1, 4)), rng)
            name = f"audio/{split}_{i:04d}.wav"
            _write(os.path.join(out, "tags", name), x)
            rows.append([name, ";".join(sorted({e[2] for e in ev}))])
        _write_csv(os.path.join(out, "tags", f"{split}.csv"), ["path", "labels"], rows)
    # SED task in the DESED layout: strong train, weak train, strong test with durations
    sed = os.path.join(out, "sed")
    for split, n in (("train_strong", 200), ("train_weak", 100), ("test", 100)):
        strong, weak, durs = [], [], []
        for i in range(n):
            x, ev = synth_scene(10.0, int(rng.integers(1, 4)), rng, min_len=0.3, max_len=4.0)
            name = f"{split}_{i:04d}.wav"
            _write(os.path.join(sed, "audio", split, name), x)
            strong += [[name, f"{a:.3f}", f"{b:.3f}", k] for a, b, k in ev]
            weak.append([name, ",".join(sorted({e[2] for e in ev}))])
            durs.append([name, "10.000"])
        if split == "train_weak":
            _write_csv(os.path.join(sed, f"{split}.tsv"), ["filename", "event_labels"], weak)
        else:
            _write_csv(os.path.join(sed, f"{split}.tsv"),
                       ["filename", "onset", "offset", "event_label"], strong)
        if split == "test":
            _write_csv(os.path.join(sed, "test_durations.tsv"), ["filename", "duration"], durs)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="demo data and manifests")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("demo", help="generate the demo data")
    a.add_argument("--data_root", default=default_data_root())
    a.add_argument("--force", action="store_true")
    a = sub.add_parser("manifest", help="write a manifest for a folder of audio files")
    a.add_argument("folder")
    a.add_argument("out_csv")
    args = p.parse_args()
    if args.cmd == "demo":
        print(make_demo(args.data_root, args.force))
    else:
        print(f"{write_manifest(args.folder, args.out_csv)} files -> {args.out_csv}")
