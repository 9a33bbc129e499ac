"""
How the data reaches a step: the torch Datasets and Samplers over data.py's manifests. The
pre-training stream (endless, the same micro-batches on every launch and resume), balanced
sampling, labelled clips and their padded batches. Audio is read in the DataLoader workers
(data.load_audio); every random draw comes from explicit seeds, never from worker state.
"""
import numpy as np
import torch

from data import DataError, load_audio
from plumbing import step_seed

# ----------------------------------------------------------------------------------------------
# Pre-training: an endless stream of random crops


class ClipDataset(torch.utils.data.Dataset):
    """Random `seconds`-long crops of manifest rows. Items are (index, key) pairs from
    StreamSampler; the crop is drawn from an RNG seeded by (seed, key), so it does not depend
    on the worker count or on where a run was resumed."""

    def __init__(self, rows, seconds, seed=0):
        self.rows, self.seconds, self.seed = rows, seconds, seed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, item):
        idx, key = item
        r = self.rows[idx]
        rng = np.random.default_rng([self.seed, key])
        wav, valid = load_audio(r["path"], self.seconds, rng, r["_where"])
        return wav, valid


class StreamSampler(torch.utils.data.Sampler):
    """Endless stream of micro-batches of (index, key) for one rank. Micro-batch g of the whole
    run is the same on every launch: epoch e = g // per_epoch is a permutation seeded by
    (seed, e), split into world * batch blocks (the incomplete tail is dropped), rank r takes
    its slice. `start` skips to micro-batch `start` (resume)."""

    def __init__(self, n_items, batch, rank=0, world=1, seed=0, start=0):
        self.n, self.batch, self.rank, self.world, self.seed = n_items, batch, rank, world, seed
        self.start = start
        self.per_epoch = n_items // (batch * world)
        if self.per_epoch == 0:
            raise DataError(f"the dataset has {n_items} clips but one micro-batch over all "
                            f"ranks needs {batch * world}")

    def __iter__(self):
        g, perm_epoch, perm = self.start, -1, None
        while True:
            e, b = divmod(g, self.per_epoch)
            if e != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed * 100003 + e)).tolist()
                perm_epoch = e
            base = (b * self.world + self.rank) * self.batch
            yield [(perm[base + i], e * self.n + base + i) for i in range(self.batch)]
            g += 1


def stream_loader(rows, seconds, batch, d, seed, start, workers):
    """DataLoader of (wav (B, S), valid (B,)) for pre-training, resumable at micro-batch start."""
    sampler = StreamSampler(len(rows), batch, d.rank, d.world, seed, start)
    return torch.utils.data.DataLoader(
        ClipDataset(rows, seconds, seed), batch_sampler=sampler, num_workers=workers,
        pin_memory=d.device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)

# ----------------------------------------------------------------------------------------------
# Labelled clips (downstream)


class BalancedSampler(torch.utils.data.Sampler):
    """`count` clip indices per epoch for one rank, drawn with replacement in proportion to
    `weights` (balanced sampling, R6). The draws of an epoch come from (seed, epoch, rank)
    alone (call set_epoch), so a resumed run draws what an uninterrupted one drew."""

    def __init__(self, weights, count, seed=0, rank=0):
        self.weights, self.count, self.seed, self.rank = weights.double(), count, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.count

    def __iter__(self):
        g = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, self.rank))
        return iter(torch.multinomial(self.weights, self.count, True, generator=g).tolist())


class LabelledClips(torch.utils.data.Dataset):
    """(wav, valid samples, target) of manifest rows. Training: a random `seconds` crop (RNG
    from (seed, epoch, index); call set_epoch), zero-padded. Evaluation: the centre
    `seconds` of longer clips, unpadded (pad_collate pads the batch)."""

    def __init__(self, rows, targets, seconds, train=False, seed=0):
        self.rows, self.targets, self.seconds, self.train, self.seed = rows, targets, seconds, \
            train, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        wav, valid = load_audio(r["path"], self.seconds, rng, r["_where"], pad=self.train)
        return wav, valid, self.targets[i]


def pad_collate(batch):
    """Zero-pad a list of (wav, valid, target) to the longest clip: (B, S), (B,), targets."""
    wavs, valid, targets = zip(*batch)
    out = torch.zeros(len(wavs), max(w.shape[0] for w in wavs))
    for i, w in enumerate(wavs):
        out[i, :w.shape[0]] = w
    return out, torch.tensor(valid), torch.stack(targets)
