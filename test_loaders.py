"""loaders.py: the pre-training stream's micro-batches (the same on every launch and resume,
disjoint over ranks), balanced sampling's draws, and the training clips that fail to decode
(replaced the same way in any worker and on resume, counted, stopped past a threshold)."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import data as D
import loaders as L
from desed import SedClips
from plumbing import UserError


def test_stream_sampler_resumes_and_splits_ranks():
    full = iter(L.StreamSampler(50, 4, rank=0, world=2, seed=3))
    batches = [next(full) for _ in range(20)]
    resumed = iter(L.StreamSampler(50, 4, rank=0, world=2, seed=3, start=13))
    assert next(resumed) == batches[13]
    other = next(iter(L.StreamSampler(50, 4, rank=1, world=2, seed=3)))
    assert not {i for i, _ in batches[0]} & {i for i, _ in other}
    epoch0 = [i for b in batches[:6] for i, _ in b]  # 6 batches per epoch of 50 // 8
    assert len(set(epoch0)) == len(epoch0)


def test_balanced_draws_depend_on_seed_epoch_and_rank_alone():
    """A resumed run's sampler (set straight to epoch 3) draws what an uninterrupted one drew
    in its epoch 3; epochs and ranks draw differently; a clip of weight 0 is never drawn and
    the others in proportion to their weights."""
    w = torch.tensor([1.0, 0.0, 3.0, 2.0])
    run = L.BalancedSampler(w, 600, seed=5, rank=1)
    epochs = []
    for e in range(4):
        run.set_epoch(e)
        epochs.append(list(run))
    resumed = L.BalancedSampler(w, 600, seed=5, rank=1)
    resumed.set_epoch(3)
    assert list(resumed) == epochs[3] and len(resumed) == 600
    assert epochs[2] != epochs[3]
    other = L.BalancedSampler(w, 600, seed=5, rank=0)
    other.set_epoch(3)
    assert list(other) != epochs[3]
    counts = np.bincount(sum(epochs, []), minlength=4) / 2400
    assert counts[1] == 0 and np.allclose(counts, [1 / 6, 0, 1 / 2, 1 / 3], atol=0.03)


def _rows(tmp_path, n=6):
    """n manifest rows whose samples say which clip and where (clip k, sample i: the 16-bit
    value k * 4000 + i // 2, 0.5 s), then a truncated OGG and a 0-byte file, which do not
    decode."""
    rows = []
    for k in range(n):
        path = tmp_path / f"{k}.wav"
        sf.write(path, (k * 4000 + np.arange(8000) // 2).astype(np.int16), 16000,
                 subtype="PCM_16")
        rows.append(path)
    sf.write(tmp_path / "full.ogg", np.random.default_rng(0).uniform(-.5, .5, 16000), 16000)
    ogg = (tmp_path / "full.ogg").read_bytes()
    (tmp_path / "cut.ogg").write_bytes(ogg[:len(ogg) // 3])
    (tmp_path / "empty.wav").write_bytes(b"")
    rows += [tmp_path / "cut.ogg", tmp_path / "empty.wav"]
    return [dict(path=str(p), _where=f"m.csv line {i + 2}") for i, p in enumerate(rows)]


def _clip_of(wav):
    return int(wav[0]) // 4000  # the row whose clip this int16 crop is (see _rows)


def test_unreadable_clips_are_replaced_alike_in_any_worker_and_on_resume(tmp_path):
    """A clip that fails to decode is replaced by a readable row (another for other keys),
    its message naming the file and manifest line; a good clip reads exactly as before
    replacement existed (the crop of the RNG seeded by (seed, key)); a stream read with 0 or
    2 workers, or resumed, holds the same clips and messages."""
    rows = _rows(tmp_path)
    ds = L.ClipDataset(rows, 0.25, seed=3)
    for key in range(5):
        wav, valid, said = ds[(2, key)]
        before = D.load_audio(rows[2]["path"], 0.25, np.random.default_rng([3, key]),
                              int16=True)
        assert torch.equal(wav, before[0]) and valid == before[1] and said == ""
    picked = set()
    for bad, name in ((6, "cut.ogg"), (7, "empty.wav")):
        for key in range(12):
            wav, valid, said = ds[(bad, key)]
            picked.add(_clip_of(wav))
            assert valid == 4000 and said.startswith(f"m.csv line {bad + 2}: ")
            assert name in said.splitlines()[0] and torch.equal(wav, ds[(bad, key)][0])
    assert len(picked) > 2 and picked <= set(range(6))
    d = SimpleNamespace(rank=0, world=1, device=torch.device("cpu"))
    read = [list(zip(range(8), L.stream_loader(rows, 0.25, 4, d, 5, 0, w))) for w in (0, 2)]
    resumed = next(iter(L.stream_loader(rows, 0.25, 4, d, 5, 3, 0)))
    for (_, a), (_, b) in zip(*read):
        assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert torch.equal(resumed[0], read[0][3][1][0]) and resumed[2] == read[0][3][1][2]
    replaced = [m for _, b in read[0] for m in b[2] if m]
    assert len(replaced) == 8  # 4 epochs of 2 batches, each epoch reading both bad clips
    everything_bad = L.ClipDataset(rows[6:], 0.25)
    with pytest.raises(D.AudioError, match="rows drawn to replace it failed too"):
        everything_bad[(0, 0)]


def test_labelled_and_sed_clips_replace_in_training_only(tmp_path):
    """Training: the replacement comes with its own target, and pad_collate passes the
    messages on; evaluation: the clip's error, as a replaced clip would change a score."""
    rows = _rows(tmp_path)
    targets = torch.arange(len(rows))
    train = L.LabelledClips(rows, targets, 0.25, train=True, seed=1)
    wav, valid, y, said = L.pad_collate([train[(6, 4)], train[(1, 4)]])  # (index, epoch)
    assert y[0] == _clip_of(wav[0]) != 6 and y[1] == 1 and said[1] == ""
    assert "cut.ogg" in said[0]
    assert len(L.pad_collate([L.LabelledClips(rows, targets, 0.25)[1]])) == 3
    names = [os.path.basename(r["path"]) for r in rows]
    sed = SedClips(str(tmp_path), names, targets, 0.25, train=True, seed=1)
    wav, valid, y, said = sed[7]
    assert y == _clip_of(wav) != 7 and "empty.wav" in said
    for ds in (L.LabelledClips(rows, targets, 0.25), SedClips(str(tmp_path), names, targets)):
        with pytest.raises(D.AudioError, match="cut.ogg"):
            ds[6]


class _Fresh(L.LabelledClips):
    """LabelledClips as the stages used it before EpochItems: the epoch set on the dataset,
    which holds for a loader made afresh after it each epoch (the workers copy it then)."""
    epoch = 0

    def __getitem__(self, i):
        return super().__getitem__((i, self.epoch))


@pytest.mark.parametrize("balanced", [False, True], ids=["distributed", "balanced"])
def test_a_loader_made_once_draws_each_epochs_clips_and_crops(tmp_path, balanced):
    """Persistent workers keep the dataset they started with, so an epoch set on it later
    never reaches them; with EpochItems a training loader made once draws in epochs 0, 1, 2
    exactly what a loader made afresh each epoch drew (the order, crops, replacements and
    their messages), with 0 or 2 workers, and a run resumed at epoch 2 draws it too. A clip
    read as it is has the crop of the RNG seeded by (seed, epoch, index), and the epochs'
    crops differ (else the test could not tell a worker stuck in epoch 0)."""
    rows, cpu = _rows(tmp_path), torch.device("cpu")
    targets = torch.arange(len(rows))

    def sampler(ds):
        return L.BalancedSampler(torch.ones(len(ds)), len(ds), seed=2) if balanced else \
            torch.utils.data.DistributedSampler(ds, 1, 0, seed=2, drop_last=True)

    def loader(ds, s, workers):
        return L.make_loader(ds, cpu, workers, batch_size=3, sampler=s, drop_last=True,
                             collate_fn=L.pad_collate)

    def once(workers, epochs):  # one loader for every epoch, as the stages make it now
        ds = L.LabelledClips(rows, targets, 0.25, train=True, seed=1)
        s = L.EpochItems(sampler(ds))
        made, out = loader(ds, s, workers), {}
        for e in epochs:
            s.set_epoch(e)
            out[e] = list(made)
        return out

    fresh = {}
    for e in range(3):
        ds = _Fresh(rows, targets, 0.25, train=True, seed=1)
        ds.epoch, s = e, sampler(ds)
        s.set_epoch(e)
        fresh[e] = list(loader(ds, s, 2))
    for got in (once(0, range(3)), once(2, range(3)), once(2, [2])):
        for e, batches in got.items():
            assert len(batches) == len(fresh[e]) == 2
            for a, b in zip(batches, fresh[e]):
                assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]
    crops = {}
    for e, batches in fresh.items():
        for wav, _, y, said in batches:
            for w, i, m in zip(wav, y.tolist(), said):
                if not m:  # read as it is (a replaced clip carries its message)
                    want = D.load_audio(rows[i]["path"], 0.25, np.random.default_rng([1, e, i]),
                                        int16=True)[0]
                    assert torch.equal(w, want) and w.dtype == torch.int16
                    crops.setdefault(i, {})[e] = w
    assert any(len(c) > 1 and not torch.equal(*list(c.values())[:2]) for c in crops.values())


def test_unreadable_clips_are_counted_across_a_resume_and_stop_past_the_threshold(tmp_path):
    """Each replaced clip is a line of unreadable.txt; a run resumed after step 4 keeps the
    lines up to it; the run stops once they are more than 10 and 0.1% of the clips seen."""
    d = SimpleNamespace(world=1, master=True, rank=0)
    run = L.Unreadable(str(tmp_path), d, 0)
    said = ["a.wav: cannot read"]
    run(1, said, 32)
    assert said == []
    run(2, said, 64)
    for step in range(3, 8):  # 11 clips, but of 700,000 seen
        run(step, [f"{step}a.wav: x", f"{step}b.wav: x"], step * 100_000)
    path = tmp_path / "unreadable.txt"
    lines = path.read_text().splitlines()
    assert len(lines) == 11 and lines[0] == "step 1: a.wav: cannot read"
    resumed = L.Unreadable(str(tmp_path), d, 4)
    assert path.read_text().splitlines() == lines[:5] == resumed.lines
    resumed(5, [f"{k}.wav: x" for k in range(5)], 5000)  # 10: not more than 10
    with pytest.raises(UserError, match=r"11 of the 6000 clips read so far failed to decode "):
        resumed(6, ["last.wav: x"], 6000)
    assert path.read_text().splitlines()[-1] == "step 6: last.wav: x"
