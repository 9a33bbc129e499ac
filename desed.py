"""
The DESED data of sound event detection (DCASE 2022 task 4): finding a task's files, its TSVs
(strong `filename onset offset event_label`, weak `filename event_labels`, durations
`filename duration`, errors naming the row), strong labels on the 40 ms frame grid (R7), and
the clips. prepare.py writes the TSVs from the DESED tree; demo.py writes a demo in the same
layout.
"""
import math
import os
from types import SimpleNamespace

import torch

from data import DataError, load_audio, read_table
from demo import make_demo
from loaders import read_or_replace
from model import TOKEN_S
from plumbing import UserError, default_data_root, write_table

CLIP_SECONDS = 10.0  # every DESED clip is (cut or padded to) 10 s
CLIP_FRAMES = round(CLIP_SECONDS / TOKEN_S)  # 250 label frames of 40 ms


def task_dir(data, data_root=""):
    """DATA_ROOT/<name>/ (demo_sed lives under demo/sed) or a folder given directly."""
    if os.path.isdir(data):
        return data
    root = data_root or default_data_root()
    if data == "demo_sed":
        return os.path.join(make_demo(root), "sed")
    path = os.path.join(root, data)
    if not os.path.isdir(path):
        raise UserError(f"SED dataset {data!r}: expected the folder {path} "
                        "(README 'Sound event detection' shows the layout)")
    return path


SED_FILES = ("train_strong_tsv", "train_weak_tsv", "test_tsv", "test_durations_tsv",
             "train_strong_audio", "train_weak_audio", "test_audio")


def sed_files(c, root):
    """The DESED files and folders of the flags above, resolved against the task folder; a
    missing one is an error naming it and its flag."""
    paths = {k: os.path.join(root, getattr(c, k)) for k in SED_FILES}
    for k, p in paths.items():
        if not (os.path.isdir(p) if k.endswith("_audio") else os.path.isfile(p)):
            raise UserError(f"{p} not found (--{k} {getattr(c, k)}, relative to the --data "
                            f"folder {root}); README 'Sound event detection' shows the flags")
    return SimpleNamespace(**paths)



def read_task(fs):
    """(strong, weak, classes, test) of a task's files (sed_files): the training labels,
    the class list (every label of either), the test labels checked against it and the
    durations."""
    strong = read_strong(fs.train_strong_tsv)
    weak = read_weak(fs.train_weak_tsv)
    classes = sorted({e[2] for ev in strong.values() for e in ev} |
                     {lab for labels in weak.values() for lab in labels})
    return strong, weak, classes, read_strong(fs.test_tsv, classes,
                                              read_durations(fs.test_durations_tsv))


def reference_files(out_dir, name, strong, files, write=True):
    """Strong labels and durations of `files` as DESED TSVs in out_dir (PSDS reads them):
    their paths."""
    gt = os.path.join(out_dir, f"{name}_strong.tsv")
    dur = os.path.join(out_dir, f"{name}_durations.tsv")
    if write:
        write_table(gt, ["filename", "onset", "offset", "event_label"],
                    ([f, *ev] for f in files for ev in strong[f]))
        write_table(dur, ["filename", "duration"], ([f, CLIP_SECONDS] for f in files))
    return gt, dur


def read_durations(path):
    return {r["filename"]: float(r["duration"])
            for r in read_table(path, ["filename", "duration"])}


def read_strong(path, classes=None, durations=None):
    """{filename: [(onset, offset, label), ...]}; rows without a label keep an empty clip.
    Errors name the row: unknown label, onset after offset, event past the clip's duration,
    clip missing from the durations; with durations (an evaluation set), also two events of
    one class overlapping in one clip (PSDS needs them merged)."""
    events, where = {}, {}
    for r in read_table(path, ["filename", "onset", "offset", "event_label"]):
        ev = events.setdefault(r["filename"], [])
        if not r["event_label"]:
            continue
        try:
            on, off = float(r["onset"]), float(r["offset"])
        except ValueError:
            raise DataError(f"{r['_where']}: onset/offset are not numbers") from None
        if classes is not None and r["event_label"] not in classes:
            raise DataError(f"{r['_where']}: event label {r['event_label']!r} is not in the "
                            f"class list ({', '.join(classes)})")
        if not 0 <= on < off:
            raise DataError(f"{r['_where']}: onset {on} is not before offset {off}")
        if durations is not None:
            if r["filename"] not in durations:
                raise DataError(f"{r['_where']}: clip {r['filename']} is missing from the "
                                "durations file")
            if off > durations[r["filename"]] + TOKEN_S:
                raise DataError(f"{r['_where']}: event ends at {off} s, after the clip's "
                                f"duration {durations[r['filename']]} s")
        if durations is not None:
            for a, b, lab in ev:
                if lab == r["event_label"] and on < b and a < off:
                    raise DataError(f"{r['_where']}: overlaps {where[(a, b, lab, r['filename'])]}"
                                    f" ({lab} {a}-{b}); merge same-class events")
        where[(on, off, r["event_label"], r["filename"])] = r["_where"]
        ev.append((on, off, r["event_label"]))
    return events


def read_weak(path, classes=None):
    """{filename: [labels]} from a weak TSV (labels comma-separated)."""
    out = {}
    for r in read_table(path, ["filename", "event_labels"]):
        labels = [c for c in r["event_labels"].split(",") if c]
        bad = [c for c in labels if classes is not None and c not in classes]
        if bad:
            raise DataError(f"{r['_where']}: event label(s) {bad} not in the class list")
        out[r["filename"]] = labels
    return out


def encode_strong(events, classes, n_frames):
    """(n_frames, C) 0/1 targets: frames floor(onset / 0.04) to ceil(offset / 0.04)."""
    y = torch.zeros(n_frames, len(classes))
    for on, off, label in events:
        a, b = int(math.floor(on / TOKEN_S)), int(math.ceil(off / TOKEN_S))
        y[a:min(b, n_frames), classes.index(label)] = 1
    return y


class SedClips(torch.utils.data.Dataset):
    """(wav (int16 from a 16 kHz mono 16-bit file, else float32: loaders.pad_collate batches
    them, data.on_device), valid samples, target) of SED clips: strong targets (T, C)
    or weak ones (C,). Training (train): a clip that fails to decode is replaced by another
    (with its target), drawn from (seed, index) (loaders.read_or_replace, whose messages come
    4th); otherwise it ends the run, as a replaced one would change a reported score. No item
    depends on the epoch: persistent DataLoader workers read what fresh ones would."""

    def __init__(self, audio_dir, files, targets, seconds=CLIP_SECONDS, train=False, seed=0):
        self.audio_dir, self.files, self.targets, self.seconds = audio_dir, files, targets, seconds
        self.train, self.seed = train, seed

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        if self.train:
            return read_or_replace(self.read, i, len(self.files), (self.seed, i))
        return self.read(i)

    def read(self, i, rng=None):
        wav, valid = load_audio(os.path.join(self.audio_dir, self.files[i]), self.seconds,
                                where=f"{self.audio_dir} clip {self.files[i]}", int16=True)
        return wav, valid, self.targets[i]
