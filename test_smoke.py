"""The downstream stages end to end on the demo data from tiny pre-trained checkpoints (the
`pretrained` fixture, real pre-training runs of ATST-Frame, ATST-Clip and ASiT): linear_eval.py,
finetune.py, distill.py (C2F, and ATST-Frame teaching ASiT across front-ends), sed.py (linear,
fine-tune, ASiT teaching ATST-Frame, --predict); and every script's --help."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import heads as H
import runtime as R
import sed
from conftest import HERE, run
from plumbing import UserError, load_checkpoint
from test_plumbing import one_line_error

def test_downstream_scripts_end_to_end(pretrained, data_root, tmp_path):
    """linear_eval (ATST-Frame, ASiT), finetune (all three kinds) and distill (C2F; F2A: a
    fine-tuned ATST-Frame teaching ASiT, which has another front-end) on the demo tasks from
    tiny checkpoints, as the README's torchrun lines run them (2 processes, gloo; one
    fine-tuning with gradient accumulation); results written; the lr is chosen without
    looking at test; a second linear evaluation reads the features the first cached."""
    ck = {k: os.path.join(v, "ckpt.pt") for k, v in pretrained.items()}
    cache = str(tmp_path / "cache")
    res = str(tmp_path / "lin.json")
    p = run("linear_eval.py", "--ckpt", ck["frame"], "--data", "demo_events", "--num_workers",
            "1", "--cache_dir", cache, "--out", res, "--epochs", "50", data_root=data_root,
            nproc=2)
    assert "2 ranks (torchrun)" in p.stdout and "features (320 clips)" in p.stderr
    lin = json.load(open(res))
    assert lin["metric"] == "accuracy" and lin["test"] > 0.3 and lin["feature_dim"] == 4 * 64
    # the same run with the test labels flipped: same lr, same validation scores
    ev = os.path.join(data_root, "demo", "events")
    rows = open(os.path.join(ev, "test.csv")).read().splitlines()
    classes = sorted({r.split(",")[1] for r in rows[1:]})
    flip = [rows[0]] + [f"{os.path.join(ev, r.split(',')[0])},"
                        f"{classes[::-1][classes.index(r.split(',')[1])]}" for r in rows[1:]]
    (tmp_path / "flipped.csv").write_text("\n".join(flip) + "\n")
    res2 = str(tmp_path / "lin2.json")
    p = run("linear_eval.py", "--ckpt", ck["frame"], "--data", os.path.join(ev, "train.csv"),
            "--valid_csv", os.path.join(ev, "valid.csv"), "--test_csv",
            str(tmp_path / "flipped.csv"), "--num_workers", "1", "--cache_dir", cache, "--out",
            res2, "--epochs", "50", data_root=data_root, nproc=2)
    assert "features (" not in p.stderr                         # every split from the cache
    lin2 = json.load(open(res2))
    assert lin2["lr"] == lin["lr"] and lin2["valid_by_lr"] == lin["valid_by_lr"]
    assert lin2["test"] < lin["test"]
    res3 = str(tmp_path / "lin_asit.json")                      # ASiT: [CLS, mean] per block
    run("linear_eval.py", "--ckpt", ck["asit"], "--data", "demo_events", "--num_workers", "1",
        "--cache_dir", cache, "--out", res3, "--epochs", "50", data_root=data_root)
    lin3 = json.load(open(res3))
    assert lin3["kind"] == "asit" and lin3["feature_dim"] == 2 * 4 * 64 and lin3["test"] > 0.2
    # fine-tune every kind, then distill: C2F, and Frame -> ASiT (another front-end)
    ft = {}
    for kind, micro in (("frame", "0"), ("clip", "0"), ("asit", "8")):
        ft[kind] = str(tmp_path / f"ft_{kind}")
        p = run("finetune.py", "--ckpt", ck[kind], "--data", "demo_events", "--epochs", "1",
                "--num_workers", "1", "--micro_batch", micro, "--out_dir", ft[kind],
                data_root=data_root, nproc=2)
        assert f"batch 32 = {micro if micro != '0' else 16} x 2 ranks x " \
            f"{2 if micro == '8' else 1} accum" in p.stdout
        r = json.load(open(os.path.join(ft[kind], "result.json")))
        assert r["stage"] == "finetune" and r["kind"] == kind and 0 <= r["test"] <= 1
        assert R.load_encoder(os.path.join(ft[kind], "best.pt")).finetuned
    for student, teacher in (("frame", "clip"), ("asit", "frame")):
        out = str(tmp_path / f"kd_{student}")
        run("distill.py", "--ckpt", ck[student], "--teacher",
            os.path.join(ft[teacher], "best.pt"), "--data", "demo_events", "--epochs", "1",
            "--num_workers", "1", "--out_dir", out, data_root=data_root, nproc=2)
        r = json.load(open(os.path.join(out, "result.json")))
        assert r["stage"] == "distill" and r["kind"] == student and r["teacher_kind"] == teacher
    # a fine-tuned checkpoint where a pre-trained one is needed, and the other way round
    p = run("finetune.py", "--ckpt", os.path.join(ft["frame"], "best.pt"), "--data",
            "demo_events", "--out_dir", str(tmp_path / "bad"), data_root=data_root, check=False)
    assert p.returncode != 0 and "is a fine-tuned checkpoint" in p.stderr
    assert "Traceback" not in p.stderr                            # one line, no traceback
    p = run("distill.py", "--ckpt", ck["frame"], "--teacher", ck["clip"], "--data",
            "demo_events", "--out_dir", str(tmp_path / "bad2"), data_root=data_root, check=False)
    assert p.returncode != 0 and "a pre-training checkpoint" in p.stderr
    assert "this needs a fine-tuned classifier" in p.stderr and "Traceback" not in p.stderr


def test_three_processes_over_a_split_of_two_clips(pretrained, data_root, tmp_path):
    """linear_eval.py on 3 processes where validation and test hold the same 2 clips (the third
    rank's share is empty) and training 10 (shares of 4, 3 and 3): it finishes, and the
    features every rank gathered are each clip's own, in the manifest's order (equal to the
    Python API's for the clip alone)."""
    ev = os.path.join(data_root, "demo", "events")
    rows = [r.split(",") for r in open(os.path.join(ev, "train.csv")).read().splitlines()[1:]]
    rows = [(os.path.join(ev, p), label) for p, label in rows[:12]]  # the 8 classes in 0-9
    for name, part in (("train.csv", rows[:10]), ("two.csv", rows[10:])):
        (tmp_path / name).write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in part))
    ck = os.path.join(pretrained["frame"], "ckpt.pt")
    out, cache = str(tmp_path / "res.json"), tmp_path / "cache"
    run("linear_eval.py", "--ckpt", ck, "--data", str(tmp_path / "train.csv"), "--valid_csv",
        str(tmp_path / "two.csv"), "--test_csv", str(tmp_path / "two.csv"), "--cache_dir",
        str(cache), "--out", out, "--epochs", "5", "--lrs", "0.1", "--num_workers", "0",
        data_root=data_root, nproc=3)
    res = json.load(open(out))
    assert res["n"] == [10, 2, 2] and 0 <= res["test"] <= 1
    cached = sorted((torch.load(f) for f in cache.iterdir()), key=len)
    assert [len(x) for x in cached] == [2, 10]                 # valid and test: one file
    enc = R.load_encoder(ck)
    for feats, part in zip(cached, (rows[10:], rows[:10])):
        for x, (path, _) in zip(feats, part):
            wav = torch.from_numpy(sf.read(path, dtype="float32")[0])
            want = enc(wav, 16000, layers="all").clip[0].half()
            torch.testing.assert_close(x, want, atol=5e-3, rtol=5e-3)


def test_sed_demo_end_to_end_and_prediction_on_long_stereo_audio(pretrained, data_root,
                                                                  tmp_path, monkeypatch):
    """linear mode (ATST-Clip on 2 processes with cached frames, and on one process encoding
    every batch, accumulating 2 micro-batches a step; ASiT), and fine-tune mode on 2 processes
    accumulating 2 micro-batches, with an ASiT SED model teaching ATST-Frame (another
    front-end, 160 ms frames), on the demo SED task (once through renamed DESED files given by
    flags); PSDS reported with plots and TSVs; then events for a 25 s 44.1 kHz stereo file
    (ATST-Clip and ASiT models), for silence, for an empty folder."""
    ck = {k: os.path.join(v, "ckpt.pt") for k, v in pretrained.items()}
    sed_dir, desed = os.path.join(data_root, "demo", "sed"), tmp_path / "DESED"
    (desed / "metadata").mkdir(parents=True)
    (desed / "audio").mkdir()
    renamed = []                       # DESED's own names differ from this project's layout
    for flag, ours, theirs in (("train_strong_tsv", "train_strong.tsv", "metadata/synth.tsv"),
                               ("train_weak_tsv", "train_weak.tsv", "metadata/weak.tsv"),
                               ("test_tsv", "test.tsv", "metadata/val.tsv"),
                               ("test_durations_tsv", "test_durations.tsv", "metadata/dur.tsv"),
                               ("train_strong_audio", "audio/train_strong", "audio/synth_16k"),
                               ("train_weak_audio", "audio/train_weak", "audio/weak_16k"),
                               ("test_audio", "audio/test", "audio/val_16k")):
        if flag.endswith("_audio"):
            os.symlink(os.path.join(sed_dir, ours), desed / theirs)
        else:
            shutil.copy(os.path.join(sed_dir, ours), desed / theirs)
        renamed += [f"--{flag}", str(desed / theirs)]
    p = run("sed.py", "--ckpt", ck["frame"], "--data", "demo_sed", *renamed[:-1], "nowhere",
            data_root=data_root, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "nowhere not found (--test_audio nowhere" in p.stderr
    outs = {}
    for name, kind, nproc, extra in (
            ("lin", "clip", 2, ["--mode", "linear"]),
            ("lin_nc", "clip", 0, ["--mode", "linear", "--cache", "false", "--micro_batch", "16",
                                   *renamed]),
            ("asit", "asit", 0, ["--mode", "linear"]),
            ("a2f", "frame", 2, ["--mode", "finetune", "--cache", "false", "--micro_batch",
                                 "8"])):
        outs[name] = str(tmp_path / name)
        if name == "a2f":
            extra = extra + ["--teacher", os.path.join(outs["asit"], "best.pt")]
        p = run("sed.py", "--ckpt", ck[kind], "--data", "demo_sed", "--epochs", "1",
                "--num_workers", "1", "--out_dir", outs[name], *extra, data_root=data_root,
                nproc=nproc)
        assert "PSDS1" in p.stdout and (name != "lin_nc" or "= 16 x 1 ranks x 2 accum" in
                                        p.stdout)
        r = json.load(open(os.path.join(outs[name], "result.json")))
        assert all(0 <= r[k] <= 1 for k in ("psds1", "psds2", "psds1_exact", "psds2_exact"))
        for f in ("psd_roc_psds1.png", "psd_roc_psds2.png", "detections_0.50.tsv", "best.pt"):
            assert os.path.getsize(os.path.join(outs[name], f)) > 0
    assert json.load(open(os.path.join(outs["a2f"], "result.json")))["teacher"]
    # cached frozen frames train the same head as encoding every batch (the cache is exact),
    # and 2 ranks of 8 + 8 clips the same as one rank accumulating two micro-batches of 8 + 8
    # (DDP averages what accumulation averages)
    heads = [load_checkpoint(os.path.join(outs[n], "best.pt"))["model"] for n in ("lin",
                                                                                    "lin_nc")]
    for k in ("head.strong.weight", "head.attn.weight"):
        torch.testing.assert_close(heads[0][k], heads[1][k], rtol=1e-4, atol=1e-5)
    sr, t = 44100, np.arange(25 * 44100) / 44100
    noise = 0.01 * np.random.default_rng(0).standard_normal(len(t))
    tone = np.where((t > 3) & (t < 6), np.sin(2 * np.pi * 440 * t), 0) + noise
    sf.write(tmp_path / "long.wav", np.stack([tone, tone * 0.5], 1).astype(np.float32), sr)
    p = run("sed.py", "--predict", str(tmp_path / "long.wav"), "--ckpt",
            os.path.join(outs["lin"], "best.pt"), "--threshold", "0.05", "--out",
            str(tmp_path / "events.tsv"), data_root=data_root)
    rows = [r.split("\t") for r in open(tmp_path / "events.tsv").read().splitlines()[1:]]
    assert rows, "a threshold of 0.05 detects something"
    for f, a, b, label in rows:
        assert f == "long.wav" and 0 <= float(a) < float(b) <= 25.0
        assert label in json.load(open(os.path.join(outs["lin"], "result.json")))["classes"]
    p = run("sed.py", "--predict", str(tmp_path / "long.wav"), "--ckpt",      # ASiT, 160 ms
            os.path.join(outs["asit"], "best.pt"), "--threshold", "0.001", data_root=data_root)
    rows = [r.split("\t") for r in p.stdout.splitlines()[1:]]
    assert rows and all(0 <= float(a) < float(b) <= 25.0 for _, a, b, _ in rows)
    assert max(float(b) for _, _, b, _ in rows) >= 24.9            # up to the file's end
    sf.write(tmp_path / "quiet.wav", np.zeros(16000, np.float32), 16000)
    p = run("sed.py", "--predict", str(tmp_path / "quiet.wav"), "--ckpt",
            os.path.join(outs["lin"], "best.pt"), "--threshold", "0.999", data_root=data_root)
    assert p.stdout.splitlines() == ["filename\tonset\toffset\tevent_label"]
    assert "0 events in 1 files" in p.stderr                      # said, not silent
    (tmp_path / "empty").mkdir()
    p = run("sed.py", "--predict", str(tmp_path / "empty"), "--ckpt",
            os.path.join(outs["lin"], "best.pt"), data_root=data_root, check=False)
    assert p.returncode == 1 and "no audio files" in p.stderr and "Traceback" not in p.stderr
    # a folder as people have it: one name in two subfolders, one unreadable file (reported and
    # skipped, the rest written, exit status 1)
    for sub in ("kitchen", "garden"):
        (tmp_path / "rec" / sub).mkdir(parents=True)
        sf.write(tmp_path / "rec" / sub / "take1.wav", tone[:5 * sr].astype(np.float32), sr)
    (tmp_path / "rec" / "broken.wav").write_text("not audio")
    given = ",".join(str(tmp_path / "rec" / f) for f in ("kitchen/take1.wav",
                                                          "garden/take1.wav", "broken.wav"))
    p = run("sed.py", "--predict", given, "--ckpt",      # files of one name, named apart
            os.path.join(outs["lin"], "best.pt"), "--threshold", "0.001", data_root=data_root,
            check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert {r.split("\t")[0] for r in p.stdout.splitlines()[1:]} == {
        os.path.join("kitchen", "take1.wav"), os.path.join("garden", "take1.wav")}
    assert "skipped: --predict: cannot read audio file" in p.stderr and "broken.wav" in p.stderr
    assert "in 2 files; 1 files could not be read" in p.stderr
    # the median windows: the checkpoint's (the demo's 31), unless --median_window is set
    seen = []
    monkeypatch.setattr(H, "median_filter", lambda s, w: seen.append(w) or s)
    c = dict(ckpt=os.path.join(outs["lin"], "best.pt"), predict=str(tmp_path / "long.wav"),
             threshold=0.5, out=str(tmp_path / "e.tsv"), device="cpu", dtype="auto",
             median_window=7, class_windows="")
    sed.detect(SimpleNamespace(**c, set_by_user=[]))
    sed.detect(SimpleNamespace(**dict(c, median_window=3), set_by_user=["median_window"]))
    assert set(seen[0]) == {31} and set(seen[1]) == {3}
    with pytest.raises(UserError, match=f"--out {tmp_path} is a folder: give the TSV file"):
        sed.detect(SimpleNamespace(**dict(c, out=str(tmp_path)), set_by_user=[]))


HELP_RUNNER = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    buf, sys.argv, code = io.StringIO(), [script, "--help"], "no exit"
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
    out[script] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_killed_sed_run_resumes_after_its_last_epoch(pretrained, data_root, tmp_path):
    """sed.py killed after epoch 1 of 2 resumes after it and ends as an uninterrupted run."""
    args = ["--ckpt", os.path.join(pretrained["clip"], "ckpt.pt"), "--data", "demo_sed",
            "--mode", "linear", "--epochs", "2", "--num_workers", "0"]
    run("sed.py", *args, "--out_dir", str(tmp_path / "a"), data_root=data_root)
    killed = run("sed.py", *args, "--out_dir", str(tmp_path / "b"), data_root=data_root,
                 check=False, env=dict(ATST_DIE_AFTER_EPOCH="1"))
    assert killed.returncode == -9 and not (tmp_path / "b" / "result.json").exists()
    assert load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["epoch"] == 1
    p = run("sed.py", *args, "--out_dir", str(tmp_path / "b"), data_root=data_root)
    assert "after epoch 1" in p.stdout and "epoch 1/2" not in p.stdout
    a, b = (json.load(open(tmp_path / x / "result.json")) for x in "ab")
    assert all(a[k] == b[k] for k in ("psds1", "psds1_exact", "f1_intersection", "best_epoch"))
    ma, mb = (load_checkpoint(str(tmp_path / x / "best.pt"))["model"] for x in "ab")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    shutil.copy(args[1], tmp_path / "renamed.pt")   # the same checkpoint by another name, other lr
    args[1] = os.path.relpath(tmp_path / "renamed.pt", HERE)
    p = run("sed.py", *args, "--epochs", "4", "--lr", "0.3", "--out_dir", str(tmp_path / "b"),
            data_root=data_root, check=False)
    assert p.returncode == 1 and one_line_error(p) == (
        f"error: {tmp_path / 'b' / 'ckpt.pt'} is another run's (epochs 2, this run 4; lr 0.5, "
        "this run 0.3): use another --out_dir, or the settings it was trained with")
    args[1] = os.path.join(pretrained["frame"], "ckpt.pt")     # another run, the same folder
    p = run("sed.py", *args, "--out_dir", str(tmp_path / "b"), data_root=data_root, check=False)
    assert p.returncode == 1 and "is another run's (ckpt 'sha256 " in p.stderr


def test_every_script_prints_its_help():
    """--help renders every flag's comment (a '%' in a comment once broke argparse); the
    scripts run as __main__ one after another in one interpreter (one torch import)."""
    scripts = ("pretrain_frame.py", "pretrain_clip.py", "pretrain_asit.py", "linear_eval.py",
               "finetune.py", "distill.py", "sed.py", "demo.py", "bench.py", "tables.py",
               "hear.py", "data.py", "prepare.py", "embed.py")
    p = subprocess.run([sys.executable, "-c", HELP_RUNNER, *scripts], cwd=HERE,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    helps = json.loads(p.stdout.splitlines()[-1])
    for script in scripts:
        code, text = helps[script]
        assert code in (0, None) and "usage:" in text, (script, code, text[-300:])
        if script in ("linear_eval.py", "finetune.py", "distill.py", "sed.py"):
            assert "--random_init" in text, script                  # one switch, one name
        if script.startswith("pretrain"):
            assert "\nI/O:\n" in text and "\nmodel:\n" in text, script  # flags in groups
        assert "--die_at_step" not in text
