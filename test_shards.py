"""prepare.py --shards (shards.py): a prepared dataset's clips packed into tar shards in the
WebDataset layout, read by every stage through the same --data name, clip for clip what the
16 kHz copy as files gives; packing resumes after a kill; pre-training and fine-tuning run from
shards on two ranks, killed and resumed, to the weights the files give."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import data as D
import shards
from conftest import HERE, run, run_together
from loaders import Clips, stream_loader
from plumbing import UserError, load_checkpoint

SETS = {"as2m": ("train", "test"), "as20k": ("train", "test"), "as1.9m": ("train",),
        "as200k": ("train",)}


@pytest.fixture(scope="module")
def copies(downloads, tmp_path_factory):
    """(data root of the AudioSet miniature as 16 kHz FLAC files (--resample), the same as
    shards of at most 60 kB (--shards), through the command line)."""
    root = tmp_path_factory.mktemp("shards")
    files, packed = str(root / "files"), str(root / "packed")
    p = subprocess.run([sys.executable, "prepare.py", "audioset", downloads["audioset"], "--out",
                        packed, "--shards", "--shard_mb", "0.06", "--workers", "2"], cwd=HERE,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import prepare
    prepare.prepare("audioset", downloads["audioset"], files, str(root / "copy"), workers=2)
    return files, packed


def test_shards_hold_every_clip_as_the_files_do(copies, downloads, tmp_path):
    """Same rows, labels and samples as the FLAC copy; the WebDataset layout (KEY.flac then
    KEY.json, a 9-digit key, the JSON naming the source), one shard list for the four sets,
    shards no bigger than asked unless one clip is; the data root can move."""
    files, packed = copies
    folder = os.path.join(packed, "audioset", "shards")
    listed = json.load(open(os.path.join(folder, "shards.json")))
    tars = sorted(f for f in os.listdir(folder) if f.endswith(".tar"))
    assert [s["url"] for s in listed["shardlist"]] == tars and len(tars) > 10
    sources = []
    for name in tars:
        with tarfile.open(os.path.join(folder, name)) as tar:
            names = tar.getnames()
            assert [n.split(".", 1)[1] for n in names] == ["flac", "json"] * (len(names) // 2)
            assert all(len(n.split(".")[0]) == 9 for n in names)
            assert names[::2] == [n.replace(".json", ".flac") for n in names[1::2]]
            sources += [json.load(tar.extractfile(n))["source"] for n in names[1::2]]
            last = tar.getmembers()[-1]
        assert last.offset_data + last.size <= 60_000 or len(names) == 2  # ~25 kB a clip
    assert sum(s["nsamples"] for s in listed["shardlist"]) == len(sources) == len(set(sources))
    assert all(os.path.isfile(os.path.join(downloads["audioset"], s)) for s in sources)
    with pytest.raises(UserError, match="lists clips in tar shards"):  # embed.py, --predict
        D.named_audio(os.path.join(packed, "as20k", "test.csv"))
    moved = str(tmp_path / "moved")
    shutil.copytree(packed, moved)                     # manifests name shards relatively
    for name, splits in SETS.items():
        assert D.read_info(os.path.join(packed, name))["shards"] == "../audioset/shards"
        for split in splits:
            a = D.read_manifest(os.path.join(moved, name, f"{split}.csv"))
            b = D.read_manifest(os.path.join(files, name, f"{split}.csv"))
            assert [r["labels"] for r in a] == [r["labels"] for r in b] and len(a) > 5
            assert all(r["path"].startswith(moved) for r in a)
            for i in range(len(a)):
                xa, xb = (Clips(rows).read(i, 0.5, np.random.default_rng(1)) for rows in (a, b))
                assert xa[0].dtype == torch.int16 and torch.equal(xa[0], xb[0])
                assert xa[1] == xb[1]


def test_a_loader_gives_the_same_batches_from_shards_and_files(copies):
    """The pre-training stream over each: the same clips in the same order, sample for
    sample, in int16 (half of float32's bytes)."""
    files, packed = copies
    one = type("D", (), dict(rank=0, world=1, device=torch.device("cpu")))
    got = []
    for root in copies:
        rows = D.read_manifest(os.path.join(root, "as2m", "train.csv"))
        it = iter(stream_loader(rows, 1.0, 8, one, 0, 0, workers=2))
        got.append([next(it) for _ in range(6)])            # 48 crops of 34 clips: 2 epochs
    for (wa, va, ma), (wb, vb, mb) in zip(*got):
        assert wa.dtype == torch.int16 and torch.equal(wa, wb) and torch.equal(va, vb)
        assert list(ma) == list(mb) == [""] * 8
    assert D.on_device(got[0][0][0], "cpu").dtype == torch.float32


def test_packing_resumes_after_a_kill_and_keeps_to_its_folder(downloads, tmp_path):
    """A shard being written when the run was killed is removed, finished ones are kept
    (never rewritten), the rest packed; a clip that does not convert is said, not packed; a
    folder of other clips' shards is an error."""
    found = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(downloads["esc50"]) for f in fs
                   if f.endswith(".wav"))[:9]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVE")
    clips = [(p, dict(source=os.path.basename(p))) for p in found[:5]] + [
        (str(broken), dict(source="broken.wav"))] + [(p, dict(source=p)) for p in found[5:]]
    folder = str(tmp_path / "sh")
    where, bad = shards.write_shards(clips, folder, 2, shard_mb=0.06)
    assert list(bad) == [str(broken)] and len(where) == 9
    tars = sorted(f for f in os.listdir(folder) if f.endswith(".tar"))
    assert len(tars) >= 3
    os.remove(os.path.join(folder, tars[-1]))                      # killed while writing it
    debris = os.path.join(folder, f".{tars[-1]}.atst-partial-99")
    open(debris, "wb").write(b"half a shard")
    os.remove(os.path.join(folder, tars[1]))                       # and one deleted by hand
    kept = {f: os.path.getmtime(os.path.join(folder, f)) for f in tars[:1] + tars[2:-1]}
    again, bad = shards.write_shards(clips, folder, 1, shard_mb=0.06)
    assert list(bad) == [str(broken)] and not os.path.exists(debris)
    assert kept == {f: os.path.getmtime(os.path.join(folder, f)) for f in kept}
    for p, (tar, offset, size) in again.items():                   # every clip, its own
        x, n = D.load_audio(tar, member=(offset, size), int16=True)
        assert torch.equal(x, torch.from_numpy(D.pcm16(p)))       # 44.1 kHz, as copied
    cut = str(tmp_path / "cut.tar")
    with open(tar, "rb") as f, open(cut, "wb") as g:               # a shard copied in part
        g.write(f.read(offset + size // 2))
    with pytest.raises(D.AudioError, match=f"{cut}: {size // 2} of the {size} bytes"):
        D.load_audio(cut, member=(offset, size), where="x.csv line 2")
    with pytest.raises(UserError, match="holds shards of other clips"):
        shards.write_shards(clips[::-1], folder, 1)


def test_pretrain_and_finetune_from_shards_on_two_ranks(copies, tmp_path):
    """ATST-Frame pre-trained on the as2m shards on 2 ranks, killed at step 3 and resumed,
    ends bit-identical to the run on the FLAC files; fine-tuning from shards (2 ranks, the
    as2m row's balanced sampling) scores what fine-tuning from the files scores."""
    files, packed = copies
    args = ["pretrain_frame.py", "--data", "as2m", "--preset", "tiny", "--max_steps", "4",
            "--batch_size", "8", "--seconds", "1", "--warmup_epochs", "0", "--ckpt_every", "2",
            "--num_workers", "1"]
    out = {k: str(tmp_path / k) for k in ("files", "packed")}
    run(*args, "--data_root", files, "--out_dir", out["files"], data_root=files, nproc=2)
    packed_run = [*args, "--data_root", packed, "--out_dir", out["packed"]]
    run(*packed_run, data_root=files, nproc=2, env=dict(ATST_DIE_AT_STEP="3"), check=False)
    assert load_checkpoint(os.path.join(out["packed"], "ckpt.pt"))["step"] == 2
    assert "resumed from" in run(*packed_run, data_root=files, nproc=2).stdout
    a, b = (load_checkpoint(os.path.join(out[k], "ckpt.pt")) for k in ("files", "packed"))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ft = ["finetune.py", "--ckpt", os.path.join(out["packed"], "ckpt.pt"), "--data", "as2m",
          "--epochs", "1", "--batch_size", "8", "--train_seconds", "1", "--max_seconds", "1",
          "--warmup_epochs", "0", "--num_workers", "1"]
    p = run_together([(*ft, "--data_root", r, "--out_dir", str(tmp_path / f"ft_{k}"))
                      for k, r in (("files", files), ("packed", packed))], data_root=files,
                     nproc=2)
    assert all("balanced=True" in x.stdout for x in p)           # the as2m row's sampling
    res = [json.load(open(tmp_path / f"ft_{k}" / "result.json")) for k in ("files", "packed")]
    assert res[0]["test"] == res[1]["test"] and res[0]["test"]
