"""prepare.py on miniature copies of every dataset in its distributed layout (conftest.
make_downloads): splits, counts, labels, the missing clip reported, AudioSet's file names and
display names with commas, DESED read by sed.py without flags, errors, fingerprints,
--resample."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import data as D
import desed as DS
import prepare
from conftest import AS_CLASSES, HERE
from plumbing import UserError


def manifest(root, name, split):
    path = os.path.join(root, name, f"{split}.csv")
    return D.read_manifest(path) if os.path.exists(path) else []


def info(root, name):
    with open(os.path.join(root, name, "info.json")) as f:
        return json.load(f)


def rel(rows, src):
    return {os.path.relpath(r["path"], src) for r in rows}


@pytest.mark.parametrize("name,counts,n_classes", [
    ("spcv2", dict(train=16, valid=4, test=4), 4), ("vox1", dict(train=12, valid=3, test=3), 3),
    ("nsynth", dict(train=12, valid=3, test=3), 11),
    ("fsd50k", dict(train=12, valid=4, test=4), 5), ("us8k", dict(train=20), 3),
    ("esc50", dict(train=15), 3)])
def test_clip_datasets_splits_labels_and_counts(prepared, downloads, name, counts, n_classes):
    """Each split as the dataset's own metadata defines it, disjoint, every clip found
    labelled as the metadata says, counts in info.json, and the class list from the dataset's
    own class file (NSynth's 11 families, FSD50K's vocabulary.csv with a class no clip has)
    as the label space the stages use."""
    root, src = prepared[0], downloads[name]
    rows = {s: manifest(root, name, s) for s in ("train", "valid", "test")}
    assert {s: len(r) for s, r in rows.items() if r} == counts
    paths = [rel(r, src) for r in rows.values()]
    assert sum(map(len, paths)) == len(set.union(*paths))                     # disjoint
    i = info(root, name)
    every = [r for s in rows.values() for r in s]
    labels = D.Labels.of_task(name, every, root)
    assert labels.classes == i["classes"] and len(i["classes"]) == n_classes
    assert {c for r in every for c in labels.split(r)} <= set(labels.classes)
    assert len(i["fingerprint"]) == 16 and i["version"] == prepare.INFO_VERSION
    assert D.dataset_copy(os.path.join(root, name))["classes"] == n_classes   # results: a count
    assert {k: v["found"] for k, v in i["splits"].items()} == counts
    if name == "nsynth":  # the WAV cut short is named with the reason, apart from missing ones
        assert i["splits"]["train"] == dict(listed=13, found=12, missing=0, unreadable=1)
        assert open(os.path.join(root, name, "unreadable.txt")).read() == \
            "train\tnsynth-train/audio/bass_electronic_000-072-100.wav\ttruncated: its header " \
            "gives 32,000 bytes of audio, the file holds 15,978\n"
        assert not os.path.exists(os.path.join(root, name, "missing.txt"))
    if name == "fsd50k":
        assert i["class_names"]["/m/01yrx"] == "Cat"
    rels = [os.path.relpath(r["path"], src) for s in rows.values() for r in s]
    if name == "spcv2":  # the folder is the label; valid / test are the lists; noise is no class
        assert all(r["label"] == os.path.dirname(p) for r, p in zip(rows["train"], rels))
        listed = open(os.path.join(src, "testing_list.txt")).read().split()
        assert rel(rows["test"], src) == set(listed) - {"yes/0badf00d_nohash_0.wav"}
        assert not any("_background_noise_" in p for p in rels)
        assert i["splits"]["test"] == dict(listed=5, found=4, missing=1, unreadable=0)
        assert open(os.path.join(root, name, "missing.txt")).read() == \
            "test\tyes/0badf00d_nohash_0.wav\n"
    if name == "vox1":   # speakers from two archives; the split file decides the split
        split = dict(line.split()[::-1] for line in open(os.path.join(src, "meta",
                                                                      "iden_split.txt")))
        for s, code in (("train", "1"), ("valid", "2"), ("test", "3")):
            assert {os.path.join(*p.split(os.sep)[-3:]) for p in rel(rows[s], src)} == \
                {k for k, v in split.items() if v == code}
        assert {r["label"] for r in rows["test"]} == {"id10001", "id10002", "id10003"}
    if name in ("us8k", "esc50"):                      # folds from the metadata
        meta = {"us8k": ("metadata/UrbanSound8K.csv", "slice_file_name", "class"),
                "esc50": ("meta/esc50.csv", "filename", "category")}[name]
        want = {r[meta[1]]: (r[meta[2]], r["fold"]) for r in csv.DictReader(
            open(os.path.join(src, meta[0])))}
        assert {os.path.basename(r["path"]): (r["label"], r["fold"]) for r in rows["train"]} \
            == want
        assert len({r["fold"] for r in rows["train"]}) == (10 if name == "us8k" else 5)
    if name == "fsd50k":                               # MIDs, ';'-separated, from quoted lists
        gt = {r["fname"]: r["mids"].replace(",", ";") for r in csv.DictReader(
            open(os.path.join(src, "FSD50K.ground_truth", "dev.csv")))}
        assert {os.path.basename(r["path"])[:-4]: r["labels"] for r in rows["valid"]} == \
            {k: v for k, v in gt.items() if int(k) >= 1012}
    if name == "nsynth":
        assert {r["label"] for r in rows["test"]} == {"bass", "guitar", "vocal"}


def test_audioset_names_labels_and_derived_sets(prepared, downloads):
    """Every download-tool naming scheme is matched (Y-prefixed, _start_end, _start, a YTID
    that itself starts with Y or '-'; nested folders; WAV and FLAC), labels are MIDs (a display
    name with a comma stays one class), the clip never downloaded is counted, and as2m / as1.9m
    / as200k are built from the right CSVs."""
    root, src = prepared[0], downloads["audioset"]
    segs = {}
    for part in ("balanced_train", "unbalanced_train", "eval"):
        for row in csv.reader(open(os.path.join(src, "metadata", f"{part}_segments.csv")),
                              skipinitialspace=True):
            if not row[0].startswith("#"):
                segs.setdefault(part, {})[row[0]] = row[3].replace(",", ";")
    ids = {y for part in segs.values() for y in part}
    got = lambda name, split: {prepare.youtube_id(
        os.path.basename(r["path"]).rsplit(".", 1)[0], ids): r["labels"]
        for r in manifest(root, name, split)}
    bal, unbal = got("as20k", "train"), got("as1.9m", "train")
    assert len(bal) == 10 and len(unbal) == 24 and got("as20k", "test") == segs["eval"]
    assert bal.items() < segs["balanced_train"].items()                 # labels as listed
    assert unbal.items() < segs["unbalanced_train"].items()
    assert got("as2m", "train") == {**bal, **unbal} and got("as2m", "test") == segs["eval"]
    assert got("as200k", "train") == unbal                               # fewer than 200k
    assert {"--PJHxphWEs", "Y0AW_wRJk3c"} <= got("as20k", "test").keys()
    classes = D.Labels(manifest(root, "as2m", "train")).classes
    assert sorted(classes) == sorted(mid for mid, _ in AS_CLASSES)       # 5, commas intact
    i = info(root, "as20k")
    assert i["splits"]["train"] == dict(listed=11, found=10, missing=1, unreadable=0)
    assert i["class_names"]["/m/05zppz"] == "Male speech, man speaking" and i["unlisted"] == 1
    assert info(root, "as2m")["splits"]["train"] == dict(listed=38, found=34, missing=2,
                                                         unreadable=2)
    assert len(open(os.path.join(root, "as2m", "missing.txt")).read().splitlines()) == 2
    bad = [line.split("\t") for line in open(os.path.join(root, "as1.9m", "unreadable.txt"))]
    assert {(s, p, why.strip()) for s, p, why in bad} == {       # the scraped copy's bad files
        ("train", "audio/unbal/part00/0TruncOgg00_30000_40000.ogg", "cannot open: Supported "
         "file format but file is malformed."),
        ("train", "audio/unbal/part00/0EmptyClip0_30000_40000.wav", "empty file (0 bytes)")}
    assert not os.path.exists(os.path.join(root, "as20k", "unreadable.txt"))


def test_youtube_ids_in_file_names():
    ids = {"--PJHxphWEs", "Yabcdefghij", "abc_def-123"}
    for stem, want in (("--PJHxphWEs", "--PJHxphWEs"), ("Y--PJHxphWEs", "--PJHxphWEs"),
                       ("--PJHxphWEs_30000_40000", "--PJHxphWEs"), ("Yabcdefghij", "Yabcdefghij"),
                       ("Y--PJHxphWEs_30.000", "--PJHxphWEs"), ("abc_def-123_0", "abc_def-123"),
                       ("abc_def-1234", None), ("--PJHxphWE", None), ("notes", None)):
        assert prepare.youtube_id(stem, ids) == want, stem


def test_desed_tree_is_read_by_sed_without_flags(prepared, downloads):
    """dcase2022: the TSVs list the clips found (the missing one dropped, counted), each clip's
    link goes to its 16 kHz twin where the `_16k` folder has it and it decodes (train_strong's
    stopped as it wrote 9.wav, cut short: 9.wav, 10.wav and 11.wav come from the 44.1 kHz
    folder, neither missing nor unreadable), and sed.py's
    default files resolve inside the folder."""
    import sed
    from types import SimpleNamespace
    root = prepared[0]
    c = SimpleNamespace(**{k: getattr(sed, k) for k in DS.SED_FILES})
    fs = DS.sed_files(c, DS.task_dir("dcase2022", root))
    strong = DS.read_strong(fs.train_strong_tsv)
    assert len(strong) == 12 and "12.wav" not in strong
    real = lambda folder, f: os.path.dirname(os.path.realpath(os.path.join(folder, f)))
    assert {f: os.path.basename(real(fs.train_strong_audio, f)) for f in strong} == {
        f"{k}.wav": "soundscapes" if k >= 9 else "soundscapes_16k" for k in range(12)}
    test = DS.read_strong(fs.test_tsv, ["Alarm_bell_ringing", "Dog", "Speech"],
                         DS.read_durations(fs.test_durations_tsv))
    assert {real(fs.test_audio, f) for f in test} == {
        os.path.join(downloads["dcase2022"], "audio", "validation", "validation_16k")}
    weak = DS.read_weak(fs.train_weak_tsv)
    assert {real(fs.train_weak_audio, f) for f in weak} == {
        os.path.join(downloads["dcase2022"], "audio", "train", "weak")}
    assert len(test) == 6 and len(weak) == 10
    i = info(root, "dcase2022")
    assert i["splits"]["train_strong"] == dict(listed=13, found=12, missing=1, unreadable=0)
    assert i["classes"] == ["Alarm_bell_ringing", "Dog", "Speech"]


def test_desed_links_replace_ours_and_keep_yours(downloads, tmp_path, monkeypatch):
    """A rerun replaces the links prepare.py made (an older run's link to a whole folder
    too); a file of the user's where the links go is named and kept, before any work;
    --resample says why it is not for DESED."""
    out = tmp_path / "out"
    (out / "dcase2022" / "audio").mkdir(parents=True)
    os.symlink(tmp_path, out / "dcase2022" / "audio" / "test")       # an older run's layout
    prepare.prepare("dcase2022", downloads["dcase2022"], str(out))
    assert len(os.listdir(out / "dcase2022" / "audio" / "test")) == 6
    os.remove(out / "dcase2022" / "audio" / "test" / sorted(os.listdir(
        out / "dcase2022" / "audio" / "test"))[0])
    mine = out / "dcase2022" / "audio" / "train_weak" / "mine.wav"
    mine.write_text("a user's file")
    with monkeypatch.context() as m, pytest.raises(UserError,
                                                   match=f"{mine} is in the way .* move it away"):
        m.setattr(prepare, "read_table", None)                      # said before any reading
        prepare.prepare("dcase2022", downloads["dcase2022"], str(out))
    assert mine.read_text() == "a user's file"
    os.remove(mine)
    prepare.prepare("dcase2022", downloads["dcase2022"], str(out))
    assert len(os.listdir(out / "dcase2022" / "audio" / "test")) == 6
    with pytest.raises(UserError, match="DCASE baseline's first training run"):
        prepare.prepare("dcase2022", downloads["dcase2022"], str(out), str(tmp_path / "r"))


def test_errors_name_what_is_missing(downloads, tmp_path):
    """A folder without its metadata, an empty folder, metadata whose clips are all absent:
    one line naming the file, from the command line too."""
    spc = tmp_path / "spc"
    shutil.copytree(downloads["spcv2"], spc)
    os.remove(spc / "testing_list.txt")
    with pytest.raises(UserError, match="testing_list.txt not found"):
        prepare.prepare("spcv2", str(spc), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    for name in ("us8k", "audioset", "dcase2022", "nsynth", "vox1", "fsd50k", "esc50"):
        with pytest.raises(UserError, match="not found|no "):
            prepare.prepare(name, str(tmp_path / "empty"), str(tmp_path / "out"))
    esc = tmp_path / "esc"
    shutil.copytree(downloads["esc50"], esc)
    shutil.rmtree(esc / "audio")
    with pytest.raises(UserError, match=r"no readable clip of the train split .*\(15 listed; "
                                        r"15 not found, e\.g\. audio/1-"):
        prepare.prepare("esc50", str(esc), str(tmp_path / "out"))
    p = subprocess.run([sys.executable, "prepare.py", "spcv2", str(spc), "--out",
                        str(tmp_path / "out")], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "testing_list" in p.stderr


def test_fingerprint_names_the_copy(downloads, tmp_path):
    """The same files elsewhere give the same fingerprint; one file changed or lost, another."""
    fps = []
    for k in range(3):
        src = tmp_path / f"esc{k}"
        shutil.copytree(downloads["esc50"], src)
        audio = sorted((src / "audio").iterdir())
        if k == 1:
            sf.write(audio[0], np.zeros(100, np.float32), 44100)
        if k == 2:
            os.remove(audio[0])
        fps.append(prepare.prepare("esc50", str(src), str(tmp_path / f"out{k}"))["esc50"]
                   ["fingerprint"])
    first = prepare.prepare("esc50", downloads["esc50"], str(tmp_path / "o"))["esc50"]
    assert fps[0] == first["fingerprint"] and len(set(fps)) == 3


def test_resample_writes_16k_mono_flac_once(downloads, tmp_path):
    """--resample: 16 kHz mono FLAC copies (the waveform the workers would compute, to 16-bit
    precision), manifests pointing at them, fingerprint of the download; a rerun converts
    nothing again."""
    out, copy = str(tmp_path / "out"), str(tmp_path / "copy")
    p = subprocess.run([sys.executable, "prepare.py", "us8k", downloads["us8k"], "--out", out,
                        "--resample", copy, "--workers", "2"], cwd=HERE, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    rows = D.read_manifest(os.path.join(out, "us8k", "train.csv"))
    assert len(rows) == 20 and all(r["path"].startswith(copy) and r["path"].endswith(".flac")
                                   for r in rows)
    i = info(out, "us8k")
    assert i["resampled"] == os.path.join(copy, "us8k")
    assert i["fingerprint"] == prepare.prepare("us8k", downloads["us8k"], str(tmp_path / "o"))[
        "us8k"]["fingerprint"]
    for r in rows[:2]:                                 # 44.1 kHz stereo and 22.05 kHz mono
        meta = sf.info(r["path"])
        assert (meta.samplerate, meta.channels, meta.format) == (16000, 1, "FLAC")
        orig = os.path.join(downloads["us8k"], os.path.relpath(r["path"], os.path.join(
            copy, "us8k")))[:-5] + ".wav"
        a, b = D.load_audio(r["path"])[0], D.load_audio(orig)[0]
        assert a.shape == b.shape and float((a - b).abs().max()) <= 2 ** -16  # rounded
        assert torch.equal(D.load_audio(r["path"], int16=True)[0], torch.from_numpy(
            D.pcm16(orig)))                  # the samples --shards packs, as workers hand them
    mtimes = [os.path.getmtime(r["path"]) for r in rows]
    p = subprocess.run([sys.executable, "prepare.py", "us8k", downloads["us8k"], "--out", out,
                        "--resample", copy], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0 and "resampling" not in p.stderr
    assert mtimes == [os.path.getmtime(r["path"]) for r in rows]


def test_relative_source_from_another_folder(downloads, tmp_path):
    """`prepare.py spcv2 downloads/speech_commands_v0.02 --out data` typed in another working
    folder: the manifests' paths resolve wherever they are read from."""
    (tmp_path / "downloads").mkdir()
    os.symlink(downloads["spcv2"], tmp_path / "downloads" / "speech_commands_v0.02")
    p = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), "spcv2",
                        "downloads/speech_commands_v0.02", "--out", "data", "--workers", "2"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "decoding 24 clips" in p.stderr                             # the progress bar
    for split, n in (("train", 16), ("valid", 4), ("test", 4)):
        assert len(D.read_manifest(str(tmp_path / "data" / "spcv2" / f"{split}.csv"))) == n
    assert info(str(tmp_path / "data"), "spcv2")["source"] == str(
        tmp_path / "downloads" / "speech_commands_v0.02")


def test_audioset_without_unbalanced_clips_writes_as20k(downloads, tmp_path, capsys):
    """The usual download for downstream use (balanced and eval clips, with or without
    unbalanced_train_segments.csv): as20k is written, the unbalanced sets are skipped with
    one line saying why, exit 0."""
    src = tmp_path / "audioset"
    shutil.copytree(downloads["audioset"], src)
    shutil.rmtree(src / "audio" / "unbal")
    p = subprocess.run([sys.executable, "prepare.py", "audioset", str(src), "--out",
                        str(tmp_path / "out"), "--workers", "2"], cwd=HERE, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert f"audioset: no readable clip of the 27 unbalanced_train_segments.csv lists under " \
        f"{src}: as20k only (as2m, as1.9m and as200k are made of the unbalanced clips)" \
        in p.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["as20k"]
    assert info(str(tmp_path / "out"), "as20k")["splits"]["train"]["found"] == 10
    os.remove(src / "metadata" / "unbalanced_train_segments.csv")
    assert list(prepare.prepare("audioset", str(src), str(tmp_path / "out2"))) == ["as20k"]
    assert f"audioset: no unbalanced_train_segments.csv under {src}: as20k only" in \
        capsys.readouterr().out


def test_bad_flags_are_one_line_before_the_scan(downloads, tmp_path, monkeypatch):
    """--workers 0 or negative, an --out or --resample folder that cannot be written: one
    line naming the flag, before the download is read; from the command line, no
    traceback."""
    monkeypatch.setitem(prepare.CLIP_SETS, "spcv2", None)              # never reached
    (tmp_path / "file").write_text("")
    src, out = downloads["spcv2"], str(tmp_path / "out")
    for kw, said in ((dict(workers=0), "--workers 0: give 1 or more processes"),
                     (dict(workers=-2), "--workers -2: give 1 or more processes"),
                     (dict(out=str(tmp_path / "file" / "data")), "--out .*file/data: cannot "
                      "write there .*is a file, not a folder"),
                     (dict(resample=str(tmp_path / "file" / "copy")), "--resample .*file/copy:"
                      " cannot write there")):
        with pytest.raises(UserError, match=said):
            prepare.prepare("spcv2", src, **dict(dict(out=out), **kw))
    p = subprocess.run([sys.executable, "prepare.py", "spcv2", src, "--out", out, "--workers",
                        "0"], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip() == \
        "error: --workers 0: give 1 or more processes"


def test_resample_records_unreadable_clips(downloads, tmp_path):
    """--resample: a clip the decode check refuses, and one that then fails to convert, are
    listed with the reason and counted, not silently dropped."""
    out, copy = str(tmp_path / "out"), str(tmp_path / "copy")
    i = prepare.prepare("nsynth", downloads["nsynth"], out, copy, workers=2)["nsynth"]
    assert i["splits"]["train"] == dict(listed=13, found=12, missing=0, unreadable=1)
    assert "bass_electronic_000-072-100.wav\ttruncated" in open(
        os.path.join(out, "nsynth", "unreadable.txt")).read()
    assert all(r["path"].startswith(copy) for r in manifest(out, "nsynth", "train"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.wav").write_bytes(b"RIFF")             # past the check somehow
    s = prepare.Split()
    s.add(str(tmp_path / "src"), "a.wav", label="x")
    prepare.resampled([s], str(tmp_path / "copy2"), 1)
    assert not s.rows and len(s.unreadable) == 1 and s.listed() == 1
    assert s.unreadable[0][0] == "a.wav" and s.unreadable[0][1].startswith("cannot convert: ")
