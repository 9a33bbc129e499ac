"""data.py: manifests, bad input, audio loading, labels and task splits, DESED TSVs; and the
demo data of demo.py."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import data as D
import desed as DS
from conftest import _clip, _truncated


def test_bad_input_errors_name_the_file(tmp_path):
    good = tmp_path / "a.wav"
    sf.write(good, np.zeros(1600, np.float32), 16000)
    (tmp_path / "bad.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    for name, msg in (("missing.wav", "not found"), ("bad.wav", "cannot read"),
                      ("empty.wav", "zero length"), ("nan.wav", "NaN")):
        with pytest.raises(D.AudioError, match=msg) as e:
            D.load_audio(str(tmp_path / name), 1.0, np.random.default_rng(0), "m.csv line 3")
        assert name in str(e.value) and "m.csv line 3" in str(e.value)
    (tmp_path / "empty.csv").write_text("path\n")
    with pytest.raises(ValueError, match="empty.csv: manifest is empty"):
        D.read_manifest(str(tmp_path / "empty.csv"))
    (tmp_path / "nopath.csv").write_text("file\na.wav\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        D.read_manifest(str(tmp_path / "nopath.csv"))
    with pytest.raises(FileNotFoundError, match="expected .*as20k"):
        D.resolve_manifest("as20k", "train", str(tmp_path))
    (tmp_path / "gone.csv").write_text("path\na.wav\nb.wav\n")
    with pytest.raises(D.AudioError, match="1 of 2 audio files listed in .*gone.csv do not "
                       "exist: .*gone.csv line 3: .*b.wav"):
        D.read_manifest(str(tmp_path / "gone.csv"))


def test_decode_check_catches_truncated_and_empty_clips(tmp_path):
    """decode_error on what libsndfile makes of each bad file: a WAV cut short (opened as a
    shorter clip; its header gives more), an Ogg cut short (malformed, or no frames), a FLAC
    cut short (its header's frame count, no frames at the end), an empty file, NaN samples;
    a whole clip and a streamed WAV (header sizes 0xFFFFFFFF: "unknown") pass."""
    t = lambda name, keep: _truncated(str(tmp_path / name), keep, seconds=2.0) or \
        D.decode_error(str(tmp_path / name))
    assert t("whole.wav", 1.0) is None and t("whole.ogg", 1.0) is None
    assert t("cut.wav", 0.5) == "truncated: its header gives 64,000 bytes of audio, the file " \
        "holds 31,978"
    assert t("empty.wav", 0) == "empty file (0 bytes)"
    assert t("cut.ogg", 0.3).startswith("cannot open: ")
    for flac in ("cut.flac", "late.flac"):                  # the header opens; the end fails
        assert t(flac, 0.5 if flac == "cut.flac" else 0.9).startswith(
            "truncated or corrupt: its last 0.1 s do not decode")
    x = np.zeros(1600, np.float32)
    x[-1] = np.nan
    sf.write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")
    assert D.decode_error(str(tmp_path / "nan.wav")) == "NaN or infinite samples"
    _clip(str(tmp_path / "stream.wav"))
    head = bytearray(open(tmp_path / "stream.wav", "rb").read())
    head[4:8] = head[40:44] = (0xFFFFFFFF).to_bytes(4, "little")   # RIFF and data sizes
    (tmp_path / "stream.wav").write_bytes(bytes(head))
    assert D.decode_error(str(tmp_path / "stream.wav")) is None


def test_manifest_of_a_folder_skips_what_cannot_be_read(tmp_path):
    """python data.py manifest: .oga and other libsndfile formats are found; corrupt and
    0-byte files are left out and listed; an empty folder is an error."""
    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    sf.write(tmp_path / "b.oga", np.zeros(1600, np.float32), 16000, format="OGG",
             subtype="VORBIS")
    (tmp_path / "corrupt.flac").write_text("not audio")
    (tmp_path / "zero.wav").write_bytes(b"")
    n, skipped = D.write_manifest(str(tmp_path), str(tmp_path / "m.csv"))
    assert n == 2 and sorted(os.path.basename(p) for p, _ in skipped) == ["corrupt.flac",
                                                                          "zero.wav"]
    assert [os.path.basename(r["path"]) for r in D.read_manifest(str(tmp_path / "m.csv"))] == \
        ["a.wav", "b.oga"]
    (tmp_path / "none").mkdir()
    with pytest.raises(D.UserError, match="no audio files"):
        D.write_manifest(str(tmp_path / "none"), str(tmp_path / "n.csv"))


def test_load_audio_crops_pads_resamples(tmp_path):
    sr = 44100
    t = np.arange(int(2.5 * sr)) / sr
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], 1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, sr)
    wav, valid = D.load_audio(str(tmp_path / "s.wav"), 4.0)
    assert wav.shape == (64000,) and abs(valid - 40000) <= 2 and wav[valid:].abs().max() == 0
    assert abs(wav[:valid].abs().max().item() - 0.5) < 0.02  # mono = mean of the channels
    wav, valid = D.load_audio(str(tmp_path / "s.wav"), 1.0, np.random.default_rng(0))
    assert wav.shape == (16000,) and valid == 16000
    assert D.write_manifest(str(tmp_path), str(tmp_path / "m" / "all.csv")) == (1, [])
    assert D.read_manifest(str(tmp_path / "m" / "all.csv"))[0]["path"] == str(tmp_path / "s.wav")


def test_demo_data_is_real_audio_with_labels(data_root):
    rows = D.read_manifest(D.resolve_manifest("demo_events", "test", data_root), "label")
    assert len({r["label"] for r in rows}) == 8
    info = sf.info(rows[0]["path"])
    assert info.samplerate == 22050 and info.channels == 2
    tags = D.read_manifest(D.resolve_manifest("demo_tags", "train", data_root), "labels")
    assert any(";" in r["labels"] for r in tags)
    wav, valid = D.load_audio(D.read_manifest(D.resolve_manifest("demo", "train", data_root))[0]
                              ["path"], 10.0)
    assert valid == 160000 and wav.abs().max() > 0.05


def test_labels_and_bad_labels():
    rows = [dict(label=c, _where=f"t.csv line {i + 2}") for i, c in enumerate("bab")]
    lab = D.Labels(rows)
    assert lab.classes == ["a", "b"] and lab.encode(rows).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"u.csv line 7: label 'c' is not one of the 2"):
        lab.encode([dict(label="c", _where="u.csv line 7")])
    multi = D.Labels([dict(labels="x;y", _where="m"), dict(labels="y", _where="m")])
    assert multi.multi and multi.encode([dict(labels="y;x", _where="m")]).tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="no 'label' or 'labels' column"):
        D.Labels([dict(path="a.wav", _where="v.csv line 2")])


def test_label_space_of_a_task(tmp_path, data_root):
    """Labels.of_task: the class list prepare.py recorded in info.json (a class no clip has
    included); without one (hand-written manifests, an older info.json), the classes of all
    the task's rows, so that a class only in held-out or test rows is one of them; the demo
    tasks keep the classes of their training rows."""
    (tmp_path / "a.wav").write_bytes(b"")
    held = torch.randperm(10, generator=torch.Generator().manual_seed(0))[0]  # hold_out's pick
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(
        f"a.wav,{'only_held' if i == held else 'x'}\n" for i in range(10)))
    (tmp_path / "test.csv").write_text("path,label\na.wav,x\na.wav,only_test\n")
    task = str(tmp_path / "train.csv")
    splits = D.task_splits(task, test_csv=str(tmp_path / "test.csv"))
    rows = [r for s in splits for r in s]
    assert "only_held" in {r["label"] for r in splits[1]} - {r["label"] for r in splits[0]}
    assert D.Labels.of_task(task, rows).classes == ["only_held", "only_test", "x"]
    D.Labels.of_task(task, rows).encode(splits[2])                     # test encodes
    info = dict(dataset="t", fingerprint="f", classes=["only_held", "only_test", "unused", "x"])
    (tmp_path / "info.json").write_text(json.dumps(info))
    assert D.Labels.of_task(task, rows).classes == info["classes"]
    assert D.task_copy(task)["classes"] == 4                         # result files: a count
    (tmp_path / "info.json").write_text(json.dumps(dict(info, classes=3)))  # INFO_VERSION 1
    assert D.task_classes(task) is None and D.task_copy(task)["classes"] == 3
    for demo in ("demo_events", "demo_tags"):
        train, valid, test = D.task_splits(demo, data_root)
        assert D.Labels.of_task(demo, train + valid + test, data_root).classes == \
            D.Labels(train).classes

def test_sed_tsv_errors_name_the_row(tmp_path):
    def tsv(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)
    head = "filename\tonset\toffset\tevent_label\n"
    durs = {"a.wav": 10.0}
    cases = [(head + "a.wav\t1\t2\tcat\n", "line 2: event label 'cat' is not in the class"),
             (head + "a.wav\t1\t2\tdog\na.wav\t3\t2\tdog\n", "line 3: onset 3.0 is not before"),
             (head + "a.wav\t1\t12\tdog\n", "line 2: event ends at 12.0 s, after"),
             (head + "b.wav\t1\t2\tdog\n", "line 2: clip b.wav is missing from the durations"),
             (head + "a.wav\t1\t3\tdog\na.wav\t2\t4\tdog\n", "line 3: overlaps")]
    for i, (text, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            DS.read_strong(tsv(f"s{i}.tsv", text), ["dog"], durs)
    with pytest.raises(ValueError, match=r"w.tsv line 2: event label\(s\) \['cat'\]"):
        DS.read_weak(tsv("w.tsv", "filename\tevent_labels\na.wav\tdog,cat\n"), ["dog"])


def _manifest(path, rows, header="path,label"):
    path.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:                                   # the files must exist; their content not
        (path.parent / r[0]).touch()
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return str(path)


def test_task_splits_hold_out_valid_and_never_use_test(tmp_path):
    """A named dataset without valid.csv: a fixed 10% of train is held out for validation,
    disjoint from what trains; test is its own file. With valid.csv it is used as is. A CSV
    needs --test_csv. --folds: fold k is the test set and the other folds train."""
    rows = [(f"a{i}.wav", "xy"[i % 2]) for i in range(50)]
    _manifest(tmp_path / "task" / "train.csv", rows)
    _manifest(tmp_path / "task" / "test.csv", [("t.wav", "x")])
    train, valid, test = D.task_splits("task", str(tmp_path), seed=3)
    names = lambda rs: {os.path.basename(r["path"]) for r in rs}
    assert len(valid) == 5 and len(train) == 45 and not names(train) & names(valid)
    assert names(train) | names(valid) == {r[0] for r in rows} and names(test) == {"t.wav"}
    assert names(D.task_splits("task", str(tmp_path), seed=3)[1]) == names(valid)  # fixed
    assert names(D.task_splits("task", str(tmp_path), seed=4)[1]) != names(valid)
    _manifest(tmp_path / "task" / "valid.csv", [("v.wav", "y")])
    train, valid, _ = D.task_splits("task", str(tmp_path))
    assert len(train) == 50 and names(valid) == {"v.wav"}
    with pytest.raises(ValueError, match="give its test split with --test_csv"):
        D.task_splits(str(tmp_path / "task" / "train.csv"))
    folds = [(f"f{i}.wav", "x", str(1 + i % 5)) for i in range(20)]
    _manifest(tmp_path / "us" / "train.csv", folds, "path,label,fold")
    train, valid, test = D.task_splits("us", str(tmp_path), folds=5, fold=2)
    assert names(test) == {f"f{i}.wav" for i in range(1, 20, 5)}
    assert not names(test) & (names(train) | names(valid)) and len(train) + len(valid) == 16


def test_manifests_as_people_have_them(tmp_path):
    """A CSV saved by a spreadsheet (byte-order mark), a .tsv manifest given as --data, and
    comma-separated multi-labels, which would silently become one combined class: an error
    that says how to write them (a single label holding a comma ends with ';')."""
    (tmp_path / "a.wav").touch()
    (tmp_path / "b.wav").touch()
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label\na.wav,dog\n".encode("utf-8"))
    assert D.read_manifest(str(tmp_path / "bom.csv"))[0]["label"] == "dog"
    (tmp_path / "m.tsv").write_text("path\tlabel\na.wav\tdog, barking\nb.wav\tcat\n")
    assert D.resolve_manifest(str(tmp_path / "m.tsv")) == str(tmp_path / "m.tsv")
    rows = D.read_manifest(D.resolve_manifest(str(tmp_path / "m.tsv")))
    assert [r["label"] for r in rows] == ["dog, barking", "cat"]      # single-label: as is
    assert D.manifest_name(str(tmp_path / "m.tsv")) == "m" and D.manifest_name("as1.9m") == \
        "as1.9m"
    (tmp_path / "tags.csv").write_text('path,labels\na.wav,"dog,cat"\n')
    rows = D.read_manifest(str(tmp_path / "tags.csv"))
    with pytest.raises(D.DataError, match=r"tags.csv line 2: labels 'dog,cat' hold commas and "
                       r"no ';': separate multi-labels with ';' \('a;b'\); a single label "
                       r"holding a comma ends with ';' \('dog,cat;'\)"):
        D.Labels(rows)
    one = D.Labels([dict(labels="Male speech, man speaking;", _where="x"),
                    dict(labels="Speech;Male speech, man speaking", _where="x")])
    assert one.classes == ["Male speech, man speaking", "Speech"]
    with pytest.raises(D.DataMissing, match="manifest not found") as e:
        D.read_manifest(str(tmp_path / "gone.csv"))
    assert isinstance(e.value, FileNotFoundError)         # also a UserError: one line
