"""loaders.py: the pre-training stream's micro-batches (the same on every launch and resume,
disjoint over ranks) and balanced sampling's draws."""
import numpy as np
import torch

import loaders as L


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
