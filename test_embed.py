"""embed.py: a folder of real recordings as people have them (mono and stereo, 8-48 kHz, 50 ms
to 70 s, a subfolder, an unreadable file) -> one .npz per readable file, equal to the Python
API's embeddings of the file alone; the bad file named; a rerun writes nothing; manifests."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import data as D
import embed
import heads as H
import plumbing as P
import runtime as R
from conftest import HERE, tiny_asit, tiny_encoder
from test_plumbing import one_line_error

FILES = {"a.wav": (16000, 1, 3.0), "sub/b.wav": (44100, 2, 12.0), "c.flac": (8000, 1, 0.05),
         "d.wav": (48000, 1, 70.0), "sub/a.wav": (22050, 2, 0.5)}


def _folder(root):
    rng = np.random.default_rng(0)
    for name, (sr, ch, sec) in FILES.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        x = rng.standard_normal((int(sec * sr), ch)) * 0.1
        sf.write(os.path.join(root, name), x.astype(np.float32), sr)
    with open(os.path.join(root, "broken.wav"), "w") as f:
        f.write("not audio")


def _ckpt(ae, path):
    P.save_atomic(dict(kind="atst-finetune", model=H.Classifier(ae, 2).export(),
                       classes=["x", "y"], encoder_args=ae.encoder.args,
                       encoder_kind=ae.kind), path)
    return path


def _embed(*args):
    return subprocess.run([sys.executable, "embed.py", *args, "--num_workers", "1",
                           "--batch_seconds", "40"], cwd=HERE, capture_output=True, text=True,
                          timeout=300)


def test_a_folder_of_recordings_to_one_file_each(tmp_path):
    rec, out = str(tmp_path / "rec"), str(tmp_path / "emb")
    _folder(rec)
    ck = _ckpt(tiny_encoder("frame"), str(tmp_path / "frame.pt"))
    p = _embed(rec, "--ckpt", ck, "--out", out)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "failed: " in p.stdout and "broken.wav: cannot read audio file" in p.stdout
    assert f"embedded {len(FILES)} files" in p.stdout
    enc = R.load_encoder(ck)
    for name, (sr, ch, sec) in FILES.items():
        got = np.load(os.path.join(out, name + ".npz"))
        x, rate = sf.read(os.path.join(rec, name), dtype="float32")
        want = enc(torch.from_numpy(x), sample_rate=rate)              # the file alone
        assert got["frames"].shape == want.frames[0].shape, name
        np.testing.assert_allclose(got["frames"], want.frames[0].numpy(), atol=2e-5)
        np.testing.assert_allclose(got["clip"], want.clip[0].numpy(), atol=2e-5)
        np.testing.assert_allclose(got["timestamps"], want.timestamps.numpy())
        assert str(got["kind"]) == "frame" and abs(float(got["seconds"]) - sec) < 1e-3
    assert not os.path.exists(os.path.join(out, "broken.wav.npz"))
    stamp = {f: os.path.getmtime(os.path.join(out, f + ".npz")) for f in FILES}
    assert str(got["checkpoint_sha256"]) == P.digest(ck) and str(got["precision"]) == "fp32"
    os.remove(tmp_path / "emb" / "sub" / "b.wav.npz")  # killed as it saved b.wav's
    (tmp_path / "emb" / "sub" / ".b.wav.npz.atst-partial-99").write_text("a killed save")
    (tmp_path / "emb" / "notes.tmp").write_text("a user's")
    shutil.copy(ck, tmp_path / "same.pt")   # the same weights by another name: the same run
    again = _embed(rec, "--ckpt", str(tmp_path / "same.pt"), "--out", out)
    assert f"{len(FILES) - 1} done before, 2 to embed" in again.stdout  # and broken.wav
    assert "embedded 1 files" in again.stdout and "a save interrupted" in again.stdout
    del stamp["sub/b.wav"]
    assert stamp == {f: os.path.getmtime(os.path.join(out, f + ".npz")) for f in stamp}
    assert sorted(os.listdir(tmp_path / "emb" / "sub")) == ["a.wav.npz", "b.wav.npz"]
    assert (tmp_path / "emb" / "notes.tmp").exists()
    other = _embed(rec, "--ckpt", ck, "--out", out, "--layers", "all")   # other settings
    assert one_line_error(other) == (f"error: --out {out} holds embeddings made otherwise "
                                     f"({out}/embeddings.json: layers 'last', this run 'all'): "
                                     "give another --out")
    assert stamp == {f: os.path.getmtime(os.path.join(out, f + ".npz")) for f in stamp}
    bad = _embed(rec, "--ckpt", ck, "--out", out, "--layers", "a,b")
    assert one_line_error(bad) == "error: --layers 'a,b': give all, or block indices like 0,5,11"


def test_a_rerun_compares_what_the_outputs_there_record(tmp_path):
    """Files of an older version (no hash, no precision) are compared on what they hold,
    their checkpoint by path; a Hub id (no hash) by its name; embeddings.json wins."""
    made = dict(checkpoint="/m/a.pt", checkpoint_sha256="ab12", kind="frame", layers="last",
                frame_pool="mean", precision="fp32")
    old = str(tmp_path / "x.wav.npz")
    np.savez(old, frames=np.zeros((1, 2)), kind="frame", checkpoint="/m/a.pt", layers="last",
             frame_pool="mean")
    embed.check_record(str(tmp_path), made, [old])                       # the same run
    with pytest.raises(P.UserError, match="checkpoint '/m/a.pt', this run '/m/b.pt'"):
        embed.check_record(str(tmp_path), dict(made, checkpoint="/m/b.pt"), [old])
    hub = dict(made, checkpoint="org/frame", checkpoint_sha256="")
    P.save_json(hub, str(tmp_path / embed.RECORD))
    embed.check_record(str(tmp_path), hub, [old])
    with pytest.raises(P.UserError, match="checkpoint 'org/frame', this run 'org/other'"):
        embed.check_record(str(tmp_path), dict(hub, checkpoint="org/other"), [old])


def test_inputs_are_named_by_their_path_inside_what_was_given(tmp_path):
    """Two files of one name in two folders get two outputs; a path holding a comma is one
    path; a list file names files relative to itself; a missing input is said at once."""
    for rel in ("a/x.wav", "b/x.wav", "b/c/y,z.wav"):
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        sf.write(tmp_path / rel, np.zeros(160, np.float32), 16000)
    t = str(tmp_path)
    assert sorted(D.named_audio(f"{t}/a/x.wav,{t}/b/x.wav").values()) == ["a/x.wav", "b/x.wav"]
    assert list(D.named_audio(f"{t}/b/c/y,z.wav").values()) == ["y,z.wav"]
    assert sorted(D.named_audio(t).values()) == ["a/x.wav", "b/c/y,z.wav", "b/x.wav"]
    assert sorted(D.named_audio(f"{t}/a,{t}/b").values()) == ["a/x.wav", "b/c/y,z.wav",
                                                              "b/x.wav"]
    (tmp_path / "b" / "list.txt").write_text("x.wav\nc/y,z.wav\n\n")
    assert D.named_audio("", f"{t}/b/list.txt") == {f"{t}/b/x.wav": "x.wav",
                                                    f"{t}/b/c/y,z.wav": "c/y,z.wav"}
    with pytest.raises(P.UserError, match=f"{t}/none not found: an audio file or folder you"):
        D.named_audio(f"{t}/a/x.wav,{t}/none")
    p = _embed(f"{t}/none", "--ckpt", "none.pt", "--out", f"{t}/emb")  # before any loading
    assert one_line_error(p) == f"error: {t}/none not found: an audio file or folder you named"


def test_a_manifest_and_every_block_of_asit(tmp_path):
    rec, out = str(tmp_path / "rec"), str(tmp_path / "emb")
    _folder(rec)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n" + "".join(f"rec/{n}\n" for n in ("a.wav", "sub/b.wav",
                                                                   "gone.wav")))
    ck = _ckpt(tiny_asit(), str(tmp_path / "asit.pt"))
    p = _embed(str(manifest), "--ckpt", ck, "--out", out, "--layers", "9")
    assert p.returncode == 1 and "layers [9]: this encoder has blocks 0 to 1" in p.stderr
    assert "Traceback" not in p.stderr and not any(f for _, _, f in os.walk(out))  # no work
    p = _embed(str(manifest), "--ckpt", ck, "--out", out, "--layers", "all")
    assert p.returncode == 1 and "gone.wav" in p.stdout + p.stderr  # listed, the rest written
    got = np.load(os.path.join(out, "sub", "b.wav.npz"))
    depth, dim = 2, 32
    frames = ((12 * 16000 - 400) // 160 + 1) // 16    # 25 ms Kaldi frames every 10 ms, 16 a frame
    assert got["frames"].shape == (frames, depth * dim) == (74, 64)
    assert got["clip"].shape == (2 * depth * dim,) and str(got["layers"]) == "all"
    assert got["timestamps"][0] == 80.0
    assert sorted(os.listdir(out)) == ["a.wav.npz", "embeddings.json", "sub"]
    # padded cost = longest x count <= budget: [1, 2] costs 4, with the 5 it would cost 15
    assert embed.batches_by_length([5, 1, 9, 2], 10) == [[1, 3], [0], [2]]
    assert embed.batches_by_length([3, 3, 4], 10) == [[0, 1], [2]]  # a plain sum would take all


def test_two_processes_share_the_files_and_write_what_one_would(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): each rank embeds its share of the batches, the
    failures of both are listed once, and the files equal a one-process run's."""
    rec = str(tmp_path / "rec")
    _folder(rec)
    ck = _ckpt(tiny_encoder("clip"), str(tmp_path / "clip.pt"))
    one = _embed(rec, "--ckpt", ck, "--out", str(tmp_path / "one"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", "embed.py", rec, "--ckpt", ck, "--out",
                          str(tmp_path / "two"), "--num_workers", "0", "--batch_seconds", "40"],
                         cwd=HERE, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == two.returncode == 1, two.stderr[-2000:]
    assert two.stdout.count("failed: ") == 1 and f"embedded {len(FILES)} files" in two.stdout
    for name in FILES:
        a, b = (np.load(str(tmp_path / d / (name + ".npz"))) for d in ("one", "two"))
        np.testing.assert_allclose(a["frames"], b["frames"], atol=2e-5)
        np.testing.assert_allclose(a["clip"], b["clip"], atol=2e-5)
