"""
The datasets as their authors distribute them -> the manifests every stage reads (README
"Reproduce the tables"). One function per dataset reads the official metadata and finds the
clips it names; `prepare` then writes DATA_ROOT/NAME/{train,valid,test}.csv (absolute paths,
or with --shards shards relative to the CSV; labels as the stages read them: README "Data
layout") and DATA_ROOT/NAME/info.json: per split the clips the metadata lists, found,
missing and unreadable, the class list (from the dataset's own class file: the label space
of every stage), and a fingerprint of the copy (a hash of the sorted relative paths and sizes
of the files used). Every result file of a stage records that
copy, and results/tables.md names it beside each number. Every clip found is decoded (its
header and last 0.1 s, data.decode_error, in --workers processes: a truncated or empty file
fails there); one that does not decode is left out, listed with the reason in
DATA_ROOT/NAME/unreadable.txt and said.
Listed clips that are not on disk are counted, listed in DATA_ROOT/NAME/missing.txt and said; a
missing metadata file, or a split of which no readable clip is found, is an error.

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
resampling 44.1 / 48 kHz audio every epoch (a clip that fails to convert is unreadable).
--shards packs that copy instead into tar shards of --shard_mb under DATA_ROOT/DATASET/shards
(shards.py; one set for AudioSet's four datasets), the manifests naming each clip's shard by
a relative path and its byte span in it. The fingerprint stays that of the download.

    python prepare.py audioset /downloads/audioset --out $ATST_DATA --shards
"""
import argparse
import csv
import datetime
import hashlib
import json
import os

import numpy as np
from tqdm import tqdm

from data import AUDIO_EXTS, decode_errors, need, read_table, to_flac16k
from plumbing import (UserError, check_writable, default_data_root, save_json, save_text,
                      user_errors, write_table)
from shards import SHARD_MB, write_shards

INFO_VERSION = 2  # 2: classes is the list, unreadable clips counted and listed


class Split:
    """The clips of one split: rows found on disk (dicts with `path` (absolute), `rel` (relative
    to the download's root: fingerprint, lists) and label columns), the relative paths the
    metadata names that are not on disk, and (relative path, why) of the clips found that do
    not decode."""

    def __init__(self):
        self.rows, self.missing, self.unreadable = [], [], []

    def add(self, root, rel, **labels):
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            self.rows.append(dict(path=path, rel=rel, **labels))
        else:
            self.missing.append(rel)

    def drop(self, bad):
        """Moves the rows whose clip is in `bad` ({path: why}) to the unreadable ones."""
        self.unreadable += [(r["rel"], bad[r["path"]]) for r in self.rows if r["path"] in bad]
        self.rows = [r for r in self.rows if r["path"] not in bad]

    def listed(self):
        return len(self.rows) + len(self.missing) + len(self.unreadable)


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


def fingerprint(src, splits):
    """sha256 of the sorted (relative path, size) of every clip used, in the download: two
    copies of a dataset get the same fingerprint only if they hold the same files of the same
    sizes."""
    h = hashlib.sha256()
    for rel in sorted({r["rel"] for s in splits.values() for r in s.rows}):
        h.update(f"{rel}\t{os.path.getsize(os.path.join(src, rel))}\n".encode())
    return h.hexdigest()[:16]


def drop_unreadable(splits, workers):
    """Decodes every clip of `splits` (Split objects) once (data.decode_errors) and moves
    those that fail to each split's unreadable ones."""
    bad = decode_errors(sorted({r["path"] for s in splits for r in s.rows}), workers)
    for s in splits:
        s.drop(bad)


def check(name, src, splits):
    for split, s in splits.items():
        if not s.rows:
            why = [f"{len(items)} {what}, e.g. {items[0]}" for items, what in (
                (s.missing, "not found"), ([f"{r}: {w}" for r, w in s.unreadable],
                                           "unreadable")) if items]
            raise UserError(f"{name}: no readable clip of the {split} split under {src} ("
                            + "; ".join([f"{s.listed()} listed"] + why) + f"); is it the "
                            f"{name} download, unpacked?")


def write_info(out, name, src, splits, classes, resample="", extra=None):
    """out/name/info.json (what stages record about this copy), missing.txt and
    unreadable.txt (each removed when empty: an earlier run's); says what they hold."""
    folder, fp = os.path.join(out, name), fingerprint(src, splits)
    lists = {"missing.txt": [f"{k}\t{rel}" for k, s in splits.items() for rel in s.missing],
             "unreadable.txt": [f"{k}\t{rel}\t{why}" for k, s in splits.items()
                                for rel, why in s.unreadable]}
    for f, lines in lists.items():
        if lines:
            save_text("".join(line + "\n" for line in lines), os.path.join(folder, f))
        elif os.path.exists(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
    info = dict(dataset=name, version=INFO_VERSION, source=src,
                prepared=datetime.datetime.now().isoformat(timespec="seconds"),
                fingerprint=fp, classes=list(classes),
                splits={k: dict(listed=s.listed(), found=len(s.rows), missing=len(s.missing),
                                unreadable=len(s.unreadable)) for k, s in splits.items()},
                missing_list="missing.txt" if lists["missing.txt"] else None,
                unreadable_list="unreadable.txt" if lists["unreadable.txt"] else None,
                resampled=resample or None, **(extra or {}))
    save_json(info, os.path.join(folder, "info.json"))
    counts = ", ".join(f"{k} {v['found']:,}" + (f" of {v['listed']:,}" if v["found"] <
                                                v["listed"] else "")
                       for k, v in info["splits"].items())
    print(f"{name}: {counts} clips, {len(classes)} classes, copy {fp} -> {folder}")
    for f, said in (("missing.txt", f"of the clips the metadata lists are not in {src}"),
                    ("unreadable.txt", "of the clips found do not decode and are left out")):
        if lists[f]:
            print(f"  warning: {len(lists[f]):,} {said} (they are listed in "
                  f"{os.path.join(folder, f)}); results on this copy say so")
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
    s, rows = Split(), read_table(meta, ["slice_file_name", "fold", "class"])
    for r in rows:
        s.add(src, os.path.join("audio", f"fold{r['fold']}", r["slice_file_name"]),
              label=r["class"], fold=r["fold"])
    return {"train": s}, "label", sorted({r["class"] for r in rows})


def esc50(src):
    """ESC-50: audio/*.wav and meta/esc50.csv (filename, fold 1-5, category); one train.csv
    with a `fold` column (--folds 5)."""
    meta = need(os.path.join(src, "meta", "esc50.csv"), "ESC-50's metadata")
    s, rows = Split(), read_table(meta, ["filename", "fold", "category"])
    for r in rows:
        s.add(src, os.path.join("audio", r["filename"]), label=r["category"], fold=r["fold"])
    return {"train": s}, "label", sorted({r["category"] for r in rows})


def vox1(src):
    """VoxCeleb1 identification: wav/idXXXXX/<video>/<n>.wav (dev and test archives unpacked
    anywhere under src) and iden_split.txt (1 train, 2 valid, 3 test); label = speaker."""
    found, meta = walk(src, ["iden_split.txt"])
    by_name = {os.path.join(*rel.split(os.sep)[-3:]): rel for rel in found}
    split_file = meta.get("iden_split.txt")
    if split_file is None:
        raise UserError(f"no iden_split.txt under {src}: VoxCeleb1's identification split "
                        "(from the dataset's website) must be in the folder")
    splits, speakers = {k: Split() for k in ("train", "valid", "test")}, set()
    with open(split_file) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            part = line.split()
            if len(part) != 2 or part[0] not in ("1", "2", "3"):
                raise UserError(f"{split_file} line {i}: expected '1|2|3 idXXXXX/video/n.wav'")
            name = os.path.normpath(part[1])
            split = ("train", "valid", "test")[int(part[0]) - 1]
            speakers.add(name.split(os.sep)[0])
            splits[split].add(src, by_name.get(name, name), label=name.split(os.sep)[0])
    return splits, "label", sorted(speakers)


NSYNTH_FAMILIES = ("bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed",
                   "string", "synth_lead", "vocal")  # instrument_family 0-10 (R8)


def nsynth(src):
    """NSynth: nsynth-{train,valid,test}/examples.json + audio/<note>.wav; label = instrument
    family (the 11 of NSYNTH_FAMILIES, whichever a split holds)."""
    splits = {}
    for split in ("train", "valid", "test"):
        folder = os.path.join(src, f"nsynth-{split}")
        meta = need(os.path.join(folder, "examples.json"), f"NSynth's {split} metadata "
                    f"(unpack nsynth-{split}.jsonwav.tar.gz into {src})")
        with open(meta) as f:
            notes = json.load(f)
        splits[split] = Split()
        for note in sorted(notes):
            family = notes[note].get("instrument_family_str")
            if family not in NSYNTH_FAMILIES:
                raise UserError(f"{meta}: note {note}: instrument_family_str {family!r} is not "
                                f"one of NSynth's {len(NSYNTH_FAMILIES)} families")
            splits[split].add(src, os.path.join(f"nsynth-{split}", "audio", f"{note}.wav"),
                              label=family)
    return splits, "label", NSYNTH_FAMILIES


def fsd50k(src):
    """FSD50K: FSD50K.{dev,eval}_audio and FSD50K.ground_truth/{dev,eval}.csv (dev's `split`:
    train / val); multi-label, labels are the ontology's MIDs; the classes are the 200 of
    vocabulary.csv (`index,display name,MID` lines; the names go to info.json)."""
    gt = os.path.join(src, "FSD50K.ground_truth")
    splits = {k: Split() for k in ("train", "valid", "test")}
    vocab = need(os.path.join(gt, "vocabulary.csv"), "FSD50K's class list")
    with open(vocab, newline="") as f:
        lines = list(csv.reader(f))
    if not lines or any(len(line) != 3 for line in lines):
        raise UserError(f"{vocab}: expected lines 'index,display name,MID'")
    names = {mid: shown for _, shown, mid in lines}
    for part in ("dev", "eval"):
        meta = need(os.path.join(gt, f"{part}.csv"), f"FSD50K's {part} labels")
        for r in read_table(meta, ["fname", "mids"] + (["split"] if part == "dev" else [])):
            mids = r["mids"].split(",")
            if any(m not in names for m in mids):
                raise UserError(f"{r['_where']}: MID(s) {[m for m in mids if m not in names]}"
                                f" not in {vocab}")
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


def audioset(src, workers=4, seed=0, n200k=200_000):
    """AudioSet: a folder of downloaded clips (any audio format, nested folders, the common
    names of download tools: youtube_id) and the official CSVs anywhere under it. Several
    datasets: as20k (balanced train / eval), and where unbalanced_train_segments.csv and a
    readable clip of it are there as2m (balanced + unbalanced / eval), as1.9m (unbalanced)
    and as200k (a fixed-seed sample of 200,000 of as1.9m's readable clips); they are skipped,
    and said, otherwise. Labels are MIDs: display names hold commas."""
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

    segs = {p: Split() for p in parts}
    for p, listed in parts.items():
        for y, mids in listed.items():
            if y in clip:
                segs[p].rows.append(dict(path=clip[y], rel=os.path.relpath(clip[y], src),
                                         labels=join_labels(mids)))
            else:
                segs[p].missing.append(f"{p}:{y}")
    drop_unreadable(segs.values(), workers)  # before as200k draws its sample

    def split(*names_):  # a Split of its own per set: resampled() updates each one
        s = Split()
        for p in names_:
            s.rows += segs[p].rows
            s.missing += segs[p].missing
            s.unreadable += segs[p].unreadable
        return s
    extra = dict(class_names=names, duplicates=dupes,
                 unlisted=len(found) - len(clip) - dupes)
    out = {"as20k": ({"train": split("balanced"), "test": split("eval")}, "labels",
                     sorted(names), extra)}
    if "unbalanced" in segs and segs["unbalanced"].rows:
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
    else:  # the usual download for downstream use: the balanced and eval clips alone
        said = f"no {AS_CSVS[3]}" if "unbalanced" not in segs else \
            f"no readable clip of the {segs['unbalanced'].listed():,} {AS_CSVS[3]} lists"
        print(f"audioset: {said} under {src}: as20k only (as2m, as1.9m and as200k are made of "
              "the unbalanced clips)")
    if dupes or extra["unlisted"]:
        print(f"note: {src} holds {dupes} clips twice (the first is used) and "
              f"{extra['unlisted']} audio files that no CSV names")
    return out

# ----------------------------------------------------------------------------------------------
# DESED (DCASE 2022 task 4): the tree generate_dcase_task4_2022.py writes -> what sed.py's
# --data dcase2022 reads without flags (TSVs of the clips found, folders of links to them)


STRONG = ["filename", "onset", "offset", "event_label"]
DESED = {  # ours: (DESED's metadata file, its columns, its audio folder (or the _16k twin))
    "train_strong": ("metadata/train/synthetic21_train/soundscapes.tsv", STRONG,
                     "audio/train/synthetic21_train/soundscapes"),
    "train_weak": ("metadata/train/weak.tsv", ["filename", "event_labels"], "audio/train/weak"),
    "test": ("metadata/validation/validation.tsv", STRONG, "audio/validation/validation")}


def dcase2022(src, out, workers):
    """Writes out/dcase2022/: train_strong.tsv, train_weak.tsv, test.tsv, test_durations.tsv
    (rows of the clips found that decode), audio/{train_strong,train_weak,test}/ (a link per
    clip: to its 16 kHz twin in the `_16k` folder where that is there and decodes, else to
    DESED's clip; the DCASE baseline's first training run writes the `_16k` folders, and one
    that stopped leaves them half-written, its last clip cut short); returns (splits, the
    classes of the three TSVs)."""
    folder = os.path.join(out, "dcase2022")
    old = {ours: our_links(os.path.join(folder, "audio", ours)) for ours in DESED}
    splits, tables = {}, {}
    for ours, (tsv, columns, folder_name) in DESED.items():
        meta = need(os.path.join(src, tsv), f"DESED's {ours} labels (DCASE 2022 task 4 tree: "
                    "give its dataset/ folder)")
        audio = [f for f in (folder_name + "_16k", folder_name)
                 if os.path.isdir(os.path.join(src, f))]
        if not audio:
            raise UserError(f"{os.path.join(src, folder_name)}[_16k] not found: DESED's "
                            f"{ours} audio")
        rows = read_table(meta, columns)
        s = Split()
        for name in dict.fromkeys(r["filename"] for r in rows):
            there = [os.path.join(f, name) for f in audio]
            s.add(src, next((p for p in there if os.path.isfile(os.path.join(src, p))),
                            there[-1]))
        splits[ours], tables[ours] = s, rows
    dur_path = need(os.path.join(src, "metadata/validation/validation_durations.tsv"),
                    "DESED's validation clip durations (PSDS needs them)")
    durations = read_table(dur_path, ["filename", "duration"])
    drop_unreadable(splits.values(), workers)
    for ours, s in splits.items():  # a `_16k` clip a stopped run left cut short: DESED's own
        fast, orig = DESED[ours][2] + "_16k" + os.sep, DESED[ours][2] + os.sep
        back = {rel: orig + rel[len(fast):] for rel, _ in s.unreadable if rel.startswith(fast)
                and os.path.isfile(os.path.join(src, orig + rel[len(fast):]))}
        bad = decode_errors([os.path.join(src, b) for b in back.values()], workers)
        for rel, b in back.items():
            if os.path.join(src, b) not in bad:
                s.unreadable = [u for u in s.unreadable if u[0] != rel]
                s.add(src, b)
    check("dcase2022", src, splits)
    for ours, rows in tables.items():
        ok = {os.path.basename(r["path"]): r["path"] for r in splits[ours].rows}
        cols = [c for c in rows[0] if c != "_where"]
        write_table(os.path.join(folder, f"{ours}.tsv"), cols,
                    ([r[c] for c in cols] for r in rows if r["filename"] in ok))
        for link in old[ours]:
            os.remove(link)
        os.makedirs(os.path.join(folder, "audio", ours), exist_ok=True)
        for name, path in ok.items():
            os.symlink(path, os.path.join(folder, "audio", ours, name))
    test_ok = {os.path.basename(r["path"]) for r in splits["test"].rows}
    write_table(os.path.join(folder, "test_durations.tsv"), ["filename", "duration"],
                ([r["filename"], r["duration"]] for r in durations if r["filename"] in test_ok))
    return splits, sorted({c for rows in tables.values() for r in rows for c in (
        r.get("event_label") or r.get("event_labels") or "").split(",") if c})


def our_links(path):
    """The links at `path` that an earlier run made, to be replaced (its link to a whole
    folder, or the links in its folder of links); anything else there is an error, said before
    the work and never deleted."""
    if os.path.islink(path):
        return [path]
    if not os.path.exists(path):
        return []
    theirs = [e.path for e in os.scandir(path) if not e.is_symlink()] if os.path.isdir(path) \
        else [path]
    if theirs:
        raise UserError(f"{theirs[0]} is in the way of the links prepare.py writes in {path}: "
                        "move it away")
    return [e.path for e in os.scandir(path)]


def resampled(splits, dest, workers):
    """Converts the clips of `splits` (Split objects) to dest/<relative path>.flac
    (data.to_flac16k; clips converted before are kept) and points their rows there; a clip
    that fails to convert is moved to its split's unreadable ones."""
    jobs = {r["path"]: os.path.join(dest, os.path.splitext(r["rel"])[0] + ".flac")
            for s in splits for r in s.rows}
    bad = {p: f"cannot convert: {why}" for p, why in to_flac16k(jobs, workers).items()}
    for s in splits:
        s.drop(bad)
        s.rows = [dict(r, path=jobs[r["path"]]) for r in s.rows]


def sharded(splits, folder, workers, shard_mb):
    """Packs the clips of `splits` (Split objects; a clip in several is packed once) into tar
    shards in `folder` (shards.write_shards) and points their rows there: `path` the shard,
    `shard_offset` and `shard_bytes` the clip in it; a clip that fails to convert is moved to
    its split's unreadable ones."""
    clips = {}
    for s in splits:
        for r in s.rows:
            clips.setdefault(r["path"], dict(source=r["rel"], **{
                k: v for k, v in r.items() if k not in ("path", "rel")}))
    where, bad = write_shards(list(clips.items()), folder, workers, shard_mb)
    for s in splits:
        s.drop({p: f"cannot convert: {why}" for p, why in bad.items()})
        s.rows = [dict(r, path=where[r["path"]][0], shard_offset=where[r["path"]][1],
                       shard_bytes=where[r["path"]][2]) for r in s.rows]


# ----------------------------------------------------------------------------------------------
# One dataset, end to end; the command line

CLIP_SETS = dict(spcv2=spcv2, us8k=us8k, esc50=esc50, vox1=vox1, nsynth=nsynth, fsd50k=fsd50k)


def prepare(name, src, out, resample="", workers=4, shards=False, shard_mb=SHARD_MB):
    """Prepare one download; returns {dataset: info}. The flags are checked before the scan;
    every set is checked before any is written."""
    if workers < 1:
        raise UserError(f"--workers {workers}: give 1 or more processes")
    if not os.path.isdir(src):
        raise UserError(f"{src} is not a folder (the unpacked {name} download)")
    if name == "dcase2022" and (resample or shards):
        raise UserError(f"--{'resample' if resample else 'shards'}: not for dcase2022 (sed.py "
                        "resamples DESED's clips as it reads them; the 16 kHz `_16k` folders "
                        "that the DCASE baseline's first training run writes are linked where "
                        "they are there)")
    if resample and shards:
        raise UserError("--resample and --shards: give one (the shards hold a 16 kHz mono "
                        "copy of the clips)")
    if not shard_mb > 0:
        raise UserError(f"--shard_mb {shard_mb}: give the size of a shard in MB, > 0")
    check_writable(out, "out", folder=True)
    if resample:
        check_writable(resample, "resample", folder=True)
    src = os.path.abspath(src)  # manifests hold absolute paths, whatever the working folder
    if name == "dcase2022":
        splits, classes = dcase2022(src, out, workers)
        return {name: write_info(out, name, src, splits, classes)}
    if name == "audioset":
        sets = audioset(src, workers)  # decodes its clips before drawing as200k
    else:
        sets = {name: CLIP_SETS[name](src)}
        drop_unreadable(sets[name][0].values(), workers)
    dest = os.path.join(os.path.abspath(resample), name) if resample else ""
    if dest:
        resampled([s for v in sets.values() for s in v[0].values()], dest, workers)
    packed = os.path.join(os.path.abspath(out), name, "shards") if shards else ""
    if packed:  # one set of shards for the datasets of a download (as2m, as20k, ...)
        sharded([s for v in sets.values() for s in v[0].values()], packed, workers, shard_mb)
    for k, v in sets.items():
        check(k, src, v[0])
    for k, (splits, label_col, *_) in sets.items():
        cols = ["path", label_col] + (["fold"] if "fold" in splits["train"].rows[0] else []) \
            + (["shard_offset", "shard_bytes"] if packed else [])
        folder = os.path.join(out, k)
        for split, s in splits.items():  # shards by relative path: the data root can move
            write_table(os.path.join(folder, f"{split}.csv"), cols, (
                [os.path.relpath(r["path"], os.path.abspath(folder)) if packed else r["path"]]
                + [r[c] for c in cols[1:]] for r in s.rows))
    return {k: write_info(out, k, src, v[0], v[2], dest, dict(
        *v[3:], **({"shards": os.path.relpath(packed, os.path.abspath(os.path.join(out, k)))}
                   if packed else {}))) for k, v in sets.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("dataset", choices=sorted([*CLIP_SETS, "audioset", "dcase2022"]))
    p.add_argument("src", help="the unpacked download (README 'Reproduce the tables')")
    p.add_argument("--out", default=default_data_root(),
                   help="data root the stages read ($ATST_DATA, else ./data)")
    p.add_argument("--resample", default="", help="make a 16 kHz mono FLAC copy here first")
    p.add_argument("--shards", action="store_true",
                   help="write the clips as tar shards (16 kHz mono FLAC) under OUT/DATASET/"
                        "shards, the manifests pointing into them")
    p.add_argument("--shard_mb", type=float, default=SHARD_MB, help="MB per shard")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode (and with --resample or --shards convert) the "
                        "clips")
    a = p.parse_args()
    if a.shard_mb != SHARD_MB and not a.shards:
        p.error("--shard_mb sizes the shards of --shards: give --shards too")
    with user_errors():
        prepare(a.dataset, a.src, a.out, a.resample, a.workers, a.shards, a.shard_mb)
