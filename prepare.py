"""
The datasets as their authors distribute them -> the manifests every stage reads (README
"Reproduce the tables"). One function per dataset reads the official metadata and finds the
clips it names; `write` then writes DATA_ROOT/NAME/{train,valid,test}.csv (absolute paths,
labels as the stages read them: README "Data layout") and DATA_ROOT/NAME/info.json: per split
the clips the metadata lists and the clips found, the classes, and a fingerprint of the copy
(a hash of the sorted relative paths and sizes of the files used). Every result file of a stage
records that copy, and results/tables.md names it beside each number. Listed clips that are
not on disk are counted, listed in DATA_ROOT/NAME/missing.txt and said; a missing metadata file,
or a split of which no clip is found, is an error.

    python prepare.py spcv2 /downloads/speech_commands_v0.02 --out $ATST_DATA
    python prepare.py us8k /downloads/UrbanSound8K --out $ATST_DATA
    python prepare.py vox1 /downloads/voxceleb1 --out $ATST_DATA    # wav/ + iden_split.txt
    python prepare.py nsynth /downloads/nsynth --out $ATST_DATA     # nsynth-{train,valid,test}
    python prepare.py fsd50k /downloads/FSD50K --out $ATST_DATA
    python prepare.py esc50 /downloads/ESC-50-master --out $ATST_DATA
    python prepare.py audioset /downloads/audioset --out $ATST_DATA  # as20k as2m as1.9m as200k
    python prepare.py dcase2022 /downloads/dcase/dataset --out $ATST_DATA
    python prepare.py audioset /downloads/audioset --out $ATST_DATA --resample /fast/as16k

--resample DIR converts the clips once to 16 kHz mono FLAC under DIR (parallel processes,
resumable) and writes the manifests against that copy, so that training workers stop
resampling 44.1 / 48 kHz audio every epoch. The fingerprint stays that of the download.
"""
import argparse
import csv
import datetime
import hashlib
import json
import os

import numpy as np
from tqdm import tqdm

from data import AUDIO_EXTS, read_table, to_flac16k
from plumbing import UserError, default_data_root, save_json, save_text, user_errors, write_table

INFO_VERSION = 1


class Split:
    """The clips of one split: rows found on disk (dicts with `path` (absolute), `rel` (relative
    to the download's root: fingerprint, missing list) and label columns), and the relative
    paths the metadata names that are not on disk."""

    def __init__(self):
        self.rows, self.missing = [], []

    def add(self, root, rel, **labels):
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            self.rows.append(dict(path=path, rel=rel, **labels))
        else:
            self.missing.append(rel)

    def listed(self):
        return len(self.rows) + len(self.missing)


def need(path, what):
    """A metadata file or folder that must exist; the error says what it is."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: {what}")
    return path


def walk(root, meta=()):
    """({path relative to root: absolute path} of every audio file under root (AUDIO_EXTS),
    {name: path} of the files named in `meta` found under it); a name found twice is an
    error."""
    audio, found = {}, {}
    for dp, dirs, files in tqdm(os.walk(root), desc=f"scanning {root}", unit=" folders",
                                leave=False):
        dirs.sort()
        for f in sorted(files):
            if f in meta:
                if f in found:
                    raise UserError(f"two copies of {f}: {found[f]} and {os.path.join(dp, f)}")
                found[f] = os.path.join(dp, f)
            elif f.lower().endswith(AUDIO_EXTS):
                audio[os.path.relpath(os.path.join(dp, f), root)] = os.path.join(dp, f)
    return audio, found


def fingerprint(splits):
    """sha256 of the sorted (relative path, size) of every clip used: two copies of a dataset
    get the same fingerprint only if they hold the same files of the same sizes."""
    h = hashlib.sha256()
    for rel, path in sorted({r["rel"]: r["path"] for s in splits.values() for r in s.rows}
                            .items()):
        h.update(f"{rel}\t{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:16]


def check(name, src, splits):
    for split, s in splits.items():
        if not s.rows:
            raise UserError(f"{name}: no clip of the {split} split found under {src} "
                            f"({s.listed()} listed, e.g. {s.missing[:2]}); is it the "
                            f"{name} download, unpacked?")


def write(out, name, src, splits, label_col, classes, resample="", workers=4, extra=None):
    """Manifests, info.json and missing.txt of one dataset under out/name; returns info."""
    check(name, src, splits)
    fp = fingerprint(splits)
    if resample:
        splits = resampled(splits, resample, workers)
    cols = ["path", label_col] + (["fold"] if "fold" in next(iter(splits.values())).rows[0]
                                  else [])
    for split, s in splits.items():
        write_table(os.path.join(out, name, f"{split}.csv"), cols,
                    ([r[c] for c in cols] for r in s.rows))
    return write_info(out, name, src, splits, classes, fp, resample, extra)


def write_info(out, name, src, splits, classes, fp, resample="", extra=None):
    """out/name/info.json (what stages record about this copy) and missing.txt; says both."""
    folder = os.path.join(out, name)
    missing = [f"{split}\t{rel}" for split, s in splits.items() for rel in s.missing]
    miss_path = os.path.join(folder, "missing.txt")
    if missing:
        save_text("".join(m + "\n" for m in missing), miss_path)
    elif os.path.exists(miss_path):
        os.remove(miss_path)
    info = dict(dataset=name, version=INFO_VERSION, source=os.path.abspath(src),
                prepared=datetime.datetime.now().isoformat(timespec="seconds"),
                fingerprint=fp, classes=len(classes),
                splits={k: dict(listed=s.listed(), found=len(s.rows), missing=len(s.missing))
                        for k, s in splits.items()},
                missing_list="missing.txt" if missing else None,
                resampled=os.path.abspath(resample) if resample else None, **(extra or {}))
    save_json(info, os.path.join(folder, "info.json"))
    counts = ", ".join(f"{k} {v['found']:,}" + (f" of {v['listed']:,}" if v["missing"] else "")
                       for k, v in info["splits"].items())
    print(f"{name}: {counts} clips, {len(classes)} classes, copy {fp} -> {folder}")
    if missing:
        print(f"  warning: {len(missing):,} of the clips the metadata lists are not in {src} "
              f"(they are listed in {miss_path}); results on this copy say so")
    return info


def join_labels(values):
    """The `labels` value of a multi-label row; a label holding ';' would split in two."""
    bad = [v for v in values if ";" in v or not v]
    if bad:
        raise UserError(f"labels {bad} are empty or hold ';' (the multi-label separator)")
    return ";".join(values)

# ----------------------------------------------------------------------------------------------
# One function per dataset: (splits, label column, classes[, extra info])


def spcv2(src):
    """Speech Commands V2: one folder per word (35), validation_list.txt and testing_list.txt
    name the valid and test clips, every other clip is train; _background_noise_ is not a
    class."""
    lists = {split: need(os.path.join(src, f), f"Speech Commands V2 names its {split} clips "
                         "there; give the unpacked speech_commands_v0.02 folder")
             for split, f in (("valid", "validation_list.txt"), ("test", "testing_list.txt"))}
    words = sorted(w for w in os.listdir(src) if os.path.isdir(os.path.join(src, w))
                   and not w.startswith(("_", ".")))
    splits = {k: Split() for k in ("train", "valid", "test")}
    held = set()
    for split, path in lists.items():
        with open(path) as f:
            for rel in (line.strip() for line in f):
                if rel:
                    held.add(rel)
                    splits[split].add(src, rel, label=rel.split("/")[0])
    for w in words:
        for f in sorted(os.listdir(os.path.join(src, w))):
            if f.endswith(".wav") and f"{w}/{f}" not in held:
                splits["train"].add(src, f"{w}/{f}", label=w)
    return splits, "label", words


def us8k(src):
    """UrbanSound8K: audio/fold1..10 and metadata/UrbanSound8K.csv; one train.csv with a
    `fold` column (linear_eval.py rotates the test fold over the 10)."""
    meta = need(os.path.join(src, "metadata", "UrbanSound8K.csv"), "UrbanSound8K's metadata")
    s = Split()
    for r in read_table(meta, ["slice_file_name", "fold", "class"]):
        s.add(src, os.path.join("audio", f"fold{r['fold']}", r["slice_file_name"]),
              label=r["class"], fold=r["fold"])
    return {"train": s}, "label", sorted({r["label"] for r in s.rows})


def esc50(src):
    """ESC-50: audio/*.wav and meta/esc50.csv (filename, fold 1-5, category); one train.csv
    with a `fold` column (--folds 5)."""
    meta = need(os.path.join(src, "meta", "esc50.csv"), "ESC-50's metadata")
    s = Split()
    for r in read_table(meta, ["filename", "fold", "category"]):
        s.add(src, os.path.join("audio", r["filename"]), label=r["category"], fold=r["fold"])
    return {"train": s}, "label", sorted({r["label"] for r in s.rows})


def vox1(src):
    """VoxCeleb1 identification: wav/idXXXXX/<video>/<n>.wav (dev and test archives unpacked
    anywhere under src) and iden_split.txt (1 train, 2 valid, 3 test); label = speaker."""
    found, meta = walk(src, ["iden_split.txt"])
    by_name = {os.path.join(*rel.split(os.sep)[-3:]): rel for rel in found}
    split_file = meta.get("iden_split.txt")
    if split_file is None:
        raise UserError(f"no iden_split.txt under {src}: VoxCeleb1's identification split "
                        "(from the dataset's website) must be in the folder")
    splits = {k: Split() for k in ("train", "valid", "test")}
    with open(split_file) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            part = line.split()
            if len(part) != 2 or part[0] not in ("1", "2", "3"):
                raise UserError(f"{split_file} line {i}: expected '1|2|3 idXXXXX/video/n.wav'")
            name = os.path.normpath(part[1])
            split = ("train", "valid", "test")[int(part[0]) - 1]
            splits[split].add(src, by_name.get(name, name), label=name.split(os.sep)[0])
    return splits, "label", sorted({r["label"] for s in splits.values() for r in s.rows})


def nsynth(src):
    """NSynth: nsynth-{train,valid,test}/examples.json + audio/<note>.wav; label = instrument
    family (11)."""
    splits = {}
    for split in ("train", "valid", "test"):
        folder = os.path.join(src, f"nsynth-{split}")
        meta = need(os.path.join(folder, "examples.json"), f"NSynth's {split} metadata "
                    f"(unpack nsynth-{split}.jsonwav.tar.gz into {src})")
        with open(meta) as f:
            notes = json.load(f)
        splits[split] = Split()
        for note in sorted(notes):
            splits[split].add(src, os.path.join(f"nsynth-{split}", "audio", f"{note}.wav"),
                              label=notes[note]["instrument_family_str"])
    return splits, "label", sorted({r["label"] for s in splits.values() for r in s.rows})


def fsd50k(src):
    """FSD50K: FSD50K.{dev,eval}_audio and FSD50K.ground_truth/{dev,eval}.csv (dev's `split`:
    train / val); multi-label, labels are the ontology's MIDs (display names in info.json)."""
    gt = os.path.join(src, "FSD50K.ground_truth")
    splits = {k: Split() for k in ("train", "valid", "test")}
    names = {}
    for part in ("dev", "eval"):
        meta = need(os.path.join(gt, f"{part}.csv"), f"FSD50K's {part} labels")
        for r in read_table(meta, ["fname", "labels", "mids"] + (["split"] if part == "dev"
                                                                 else [])):
            mids, shown = r["mids"].split(","), r["labels"].split(",")
            names.update(zip(mids, shown))
            split = "test" if part == "eval" else {"train": "train", "val": "valid"}.get(
                r["split"])
            if split is None:
                raise UserError(f"{r['_where']}: split {r['split']!r} is not train or val")
            splits[split].add(src, os.path.join(f"FSD50K.{part}_audio", f"{r['fname']}.wav"),
                              labels=join_labels(mids))
    return splits, "labels", sorted(names), dict(class_names=names)


AS_CSVS = ("class_labels_indices.csv", "balanced_train_segments.csv", "eval_segments.csv",
           "unbalanced_train_segments.csv")


def youtube_id(stem, ids):
    """The listed YouTube id a downloaded clip's file name holds, or None. Download tools write
    <YTID>, Y<YTID>, <YTID>_<start>[_<end>] or Y<YTID>_<start>...: a YTID is 11 characters
    ([A-Za-z0-9_-]), followed by the end of the name or a separator."""
    cands = [stem[:11]] if len(stem) == 11 or (len(stem) > 11 and not stem[11].isalnum()) \
        else []
    if stem.startswith("Y") and (len(stem) == 12 or (len(stem) > 12 and not stem[12].isalnum())):
        cands.append(stem[1:12])
    return next((c for c in cands if c in ids), None)


def read_segments(path, mids):
    """{YTID: [MIDs]} of an AudioSet segments CSV: '#' header lines, then `YTID, start, end,
    "mid,mid,..."` (a space after each comma, the labels quoted)."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.reader(f, skipinitialspace=True)
        for row in reader:
            if not row or row[0].startswith("#"):
                continue
            where = f"{path} line {reader.line_num}"
            if len(row) != 4:
                raise UserError(f"{where}: expected YTID, start_seconds, end_seconds, "
                                f"\"labels\" ({len(row)} fields)")
            labs = [m.strip() for m in row[3].split(",") if m.strip()]
            bad = [m for m in labs if m not in mids]
            if bad or not labs:
                raise UserError(f"{where}: label(s) {bad or '(none)'} not in "
                                "class_labels_indices.csv")
            out[row[0]] = labs
    if not out:
        raise UserError(f"{path}: no segments")
    return out


def audioset(src, seed=0, n200k=200_000):
    """AudioSet: a folder of downloaded clips (any audio format, nested folders, the common
    names of download tools: youtube_id) and the official CSVs anywhere under it. Several
    datasets: as20k (balanced train / eval), and with unbalanced_train_segments.csv as2m
    (balanced + unbalanced / eval), as1.9m (unbalanced) and as200k (a fixed-seed sample of
    200,000 of as1.9m's clips). Labels are MIDs: display names hold commas."""
    found, metas = walk(src, AS_CSVS)
    for f in AS_CSVS[:3]:
        if f not in metas:
            raise UserError(f"no {f} under {src}: put AudioSet's official CSVs (" +
                            ", ".join(AS_CSVS) + ") in the folder of the clips")
    classes = read_table(metas[AS_CSVS[0]], ["mid", "display_name"])
    names = {r["mid"]: r["display_name"] for r in classes}
    parts = {p: read_segments(metas[f], names) for p, f in
             (("balanced", AS_CSVS[1]), ("eval", AS_CSVS[2]), ("unbalanced", AS_CSVS[3]))
             if f in metas}
    ids = {y for p in parts.values() for y in p}
    clip, dupes = {}, 0
    for path in found.values():
        y = youtube_id(os.path.basename(path).rsplit(".", 1)[0], ids)
        if y is not None:
            dupes += y in clip
            clip.setdefault(y, path)

    def split(*names_):
        s = Split()
        for p in names_:
            for y, mids in parts[p].items():
                if y in clip:
                    s.rows.append(dict(path=clip[y], rel=os.path.relpath(clip[y], src),
                                       labels=join_labels(mids)))
                else:
                    s.missing.append(f"{p}:{y}")
        return s
    extra = dict(class_names=names, duplicates=dupes,
                 unlisted=len(found) - len(clip) - dupes)
    out = {"as20k": ({"train": split("balanced"), "test": split("eval")}, "labels",
                     sorted(names), extra)}
    if "unbalanced" in parts:
        unbal = split("unbalanced")
        out["as2m"] = ({"train": split("balanced", "unbalanced"), "test": split("eval")},
                       "labels", sorted(names), extra)
        out["as1.9m"] = ({"train": unbal}, "labels", sorted(names), extra)
        keep = np.sort(np.random.default_rng(seed).choice(len(unbal.rows), min(
            n200k, len(unbal.rows)), replace=False))
        sample = Split()
        sample.rows = [unbal.rows[i] for i in keep]
        out["as200k"] = ({"train": sample}, "labels", sorted(names),
                         dict(extra, sample=f"{len(keep)} of as1.9m's clips, seed {seed}"))
    else:
        print(f"no unbalanced_train_segments.csv under {src}: as20k only")
    if dupes or extra["unlisted"]:
        print(f"note: {src} holds {dupes} clips twice (the first is used) and "
              f"{extra['unlisted']} audio files that no CSV names")
    return out

# ----------------------------------------------------------------------------------------------
# DESED (DCASE 2022 task 4): the tree generate_dcase_task4_2022.py writes -> what sed.py's
# --data dcase2022 reads without flags (TSVs of the clips found, links to the audio folders)


STRONG = ["filename", "onset", "offset", "event_label"]
DESED = {  # ours: (DESED's metadata file, its columns, its audio folder (or the _16k twin))
    "train_strong": ("metadata/train/synthetic21_train/soundscapes.tsv", STRONG,
                     "audio/train/synthetic21_train/soundscapes"),
    "train_weak": ("metadata/train/weak.tsv", ["filename", "event_labels"], "audio/train/weak"),
    "test": ("metadata/validation/validation.tsv", STRONG, "audio/validation/validation")}


def dcase2022(src, out):
    """Writes out/dcase2022/: train_strong.tsv, train_weak.tsv, test.tsv, test_durations.tsv
    (rows of the clips found), audio/{train_strong,train_weak,test} (links to DESED's folders,
    the 16 kHz `_16k` ones where present), info.json, missing.txt."""
    folder = os.path.join(out, "dcase2022")
    splits, tables = {}, {}
    for ours, (tsv, columns, folder_name) in DESED.items():
        meta = need(os.path.join(src, tsv), f"DESED's {ours} labels (DCASE 2022 task 4 tree: "
                    "give its dataset/ folder)")
        audio = next((p for p in (os.path.join(src, folder_name + "_16k"),
                                  os.path.join(src, folder_name)) if os.path.isdir(p)), None)
        if audio is None:
            raise UserError(f"{os.path.join(src, folder_name)}[_16k] not found: DESED's "
                            f"{ours} audio")
        rows = read_table(meta, columns)
        s = Split()
        for name in dict.fromkeys(r["filename"] for r in rows):
            s.add(src, os.path.relpath(os.path.join(audio, name), src))
        splits[ours], tables[ours] = s, (meta, audio, rows)
    dur_path = need(os.path.join(src, "metadata/validation/validation_durations.tsv"),
                    "DESED's validation clip durations (PSDS needs them)")
    durations = read_table(dur_path, ["filename", "duration"])
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    for ours, (meta, audio, rows) in tables.items():
        ok = {os.path.basename(r["path"]) for r in splits[ours].rows}
        cols = [c for c in rows[0] if c != "_where"]
        write_table(os.path.join(folder, f"{ours}.tsv"), cols,
                    ([r[c] for c in cols] for r in rows if r["filename"] in ok))
        link = os.path.join(folder, "audio", ours)
        if os.path.islink(link):
            os.remove(link)
        elif os.path.exists(link):
            raise UserError(f"{link} exists and is not a link prepare.py made: move it away")
        os.symlink(os.path.abspath(audio), link)
    test_ok = {os.path.basename(r["path"]) for r in splits["test"].rows}
    write_table(os.path.join(folder, "test_durations.tsv"), ["filename", "duration"],
                ([r["filename"], r["duration"]] for r in durations if r["filename"] in test_ok))
    classes = sorted({r["event_label"] for r in tables["train_strong"][2] if r["event_label"]})
    return splits, classes

def resampled(splits, dest, workers):
    """The splits with every clip converted to dest/<relative path>.flac (data.to_flac16k);
    clips already converted are kept, unreadable ones are dropped and said."""
    jobs = {r["path"]: os.path.join(dest, os.path.splitext(r["rel"])[0] + ".flac")
            for s in splits.values() for r in s.rows}
    bad = to_flac16k(jobs, workers)
    for s in splits.values():
        s.rows = [dict(r, path=jobs[r["path"]]) for r in s.rows if r["path"] not in bad]
    return splits


# ----------------------------------------------------------------------------------------------
# One dataset, end to end; the command line

CLIP_SETS = dict(spcv2=spcv2, us8k=us8k, esc50=esc50, vox1=vox1, nsynth=nsynth, fsd50k=fsd50k)


def prepare(name, src, out, resample="", workers=4):
    """Prepare one download; returns {dataset: info}."""
    if not os.path.isdir(src):
        raise UserError(f"{src} is not a folder (the unpacked {name} download)")
    if name == "dcase2022":
        if resample:
            raise UserError("--resample: DESED's download script already writes 16 kHz "
                            "copies (the _16k folders), which prepare.py links")
        splits, classes = dcase2022(src, out)
        check(name, src, splits)
        return {name: write_info(out, name, src, splits, classes, fingerprint(splits))}
    sets = audioset(src) if name == "audioset" else {name: CLIP_SETS[name](src)}
    dest = os.path.join(resample, name) if resample else ""
    return {k: write(out, k, src, *v[:3], dest, workers, *v[3:]) for k, v in sets.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("dataset", choices=sorted([*CLIP_SETS, "audioset", "dcase2022"]))
    p.add_argument("src", help="the unpacked download (README 'Reproduce the tables')")
    p.add_argument("--out", default=default_data_root(),
                   help="data root the stages read ($ATST_DATA, else ./data)")
    p.add_argument("--resample", default="", help="make a 16 kHz mono FLAC copy here first")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes for --resample")
    a = p.parse_args()
    with user_errors():
        prepare(a.dataset, a.src, a.out, a.resample, a.workers)
