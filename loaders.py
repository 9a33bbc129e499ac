"""
How the data reaches a step: the torch Datasets and Samplers over data.py's manifests. The
pre-training stream (endless, the same micro-batches on every launch and resume), balanced
sampling, labelled clips and their padded batches, and the clips of a training run that fail
to decode (replaced, counted, named). Audio is read in the DataLoader workers
(data.load_audio); every random draw comes from explicit seeds, never from worker state.
"""
import itertools
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cluster import all_mean, decide, workers
from data import AudioError, DataError, audio_batch, load_audio
from plumbing import UserError, save_text, step_seed

# ----------------------------------------------------------------------------------------------
# Clips that fail to decode in training: nearly every scraped AudioSet copy holds a few, and
# one of them must not end a run hours in. Each is replaced by another row (read_or_replace),
# named, and counted (Unreadable); the run stops only when they are more than a few.

MAX_UNREADABLE_SHARE = 0.001  # a run stops when more than this share of the clips seen failed
MIN_UNREADABLE = 10           # ... and more than this many (one in the first batch is no trend)
ATTEMPTS = 10                 # rows tried for one item before its error ends the run


def read_or_replace(read, i, n, seeds):
    """read(i, rng) of row i, rng seeded by `seeds` (what the item draws without failures);
    when the clip fails to decode (data.AudioError), read(j, rng) of a row j drawn from an rng
    seeded by (*seeds, attempt), which also draws its crop: the same replacement in any worker
    and after a resume. Returns read's tuple + (the failures' messages, one a line; '' when
    none: default_collate batches strings)."""
    rng, failed = np.random.default_rng(list(seeds)), []
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return (*read(i, rng), "\n".join(failed))
        except AudioError as e:
            failed.append(" ".join(str(e).split()))
        rng = np.random.default_rng([*seeds, attempt])
        i = int(rng.integers(n))
    raise AudioError(f"{failed[0]}; and the {ATTEMPTS - 1} rows drawn to replace it failed too "
                     f"(the last: {failed[-1]})")


def replaced(batches, said):
    """A training loader's batches without their last item, the messages of the clips
    replaced in them, which go to the list `said` (for Unreadable) as the batch is taken."""
    for *batch, messages in batches:
        said += [m for s in messages for m in s.splitlines()]
        yield batch


class Unreadable:
    """The clips a training run replaced, over every rank: each named by rank 0 (a line, and
    one in out_dir/unreadable.txt, rewritten atomically), counted, and the run stopped on
    every rank together once they are more than MIN_UNREADABLE and MAX_UNREADABLE_SHARE of
    the clips seen. The file is also the count's record, read back on resume (after `done`
    steps): its lines up to that step are kept, the later ones come again as the run meets
    the same clips, replaced the same way, so a resumed run counts what an uninterrupted one
    counts (downstream checkpoints are written by downstream.save_epoch, which knows no
    loader; the list has to outlive the run anyway, as the stop names it)."""

    def __init__(self, out_dir, d, done):
        self.path, self.d = os.path.join(out_dir, "unreadable.txt"), d
        self.lines = decide(lambda: self._kept(done), d)

    def _kept(self, done):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = f.read().splitlines()
        kept = [x for x in lines if int(x.split(":", 1)[0].split()[-1]) <= done]
        if kept != lines:
            save_text("".join(x + "\n" for x in kept), self.path)
        return kept

    def __call__(self, step, said, seen):
        """After step `step` (from 1): `said`, this rank's messages of the clips replaced in
        it (emptied here), and `seen`, the clips every rank read up to it."""
        new, said[:] = list(said), []
        if self.d.world > 1 and all_mean(torch.tensor([float(len(new))], device=self.d.device),
                                         self.d).item() > 0:  # objects pickled only then
            every = [None] * self.d.world
            dist.all_gather_object(every, new)
            new = [m for part in every for m in part]
        if not new:
            return
        new = [f"step {step}: {m}" for m in new]
        self.lines += new

        def record():  # on rank 0, before any rank stops
            for x in new:
                tqdm.write(f"replaced an unreadable clip, {x}")
            save_text("".join(x + "\n" for x in self.lines), self.path)
        decide(record, self.d)
        n = len(self.lines)
        if n > MIN_UNREADABLE and n > MAX_UNREADABLE_SHARE * seen:
            raise UserError(f"{n} of the {seen} clips read so far failed to decode (more than "
                            f"{MIN_UNREADABLE} and {MAX_UNREADABLE_SHARE:.1%}): stopping; they "
                            f"are listed in {self.path}: mend them or drop their rows from the "
                            "manifest")

# ----------------------------------------------------------------------------------------------
# Pre-training: an endless stream of random crops


class Strings:
    """A list of strings held as one UTF-8 buffer, a table of its distinct values and an
    index (numpy arrays): what DataLoader workers read without copying it. A list of Python
    objects is copied into every worker page by page as reading it touches their reference
    counts: 0.42 GiB more per worker after reading the paths of a 2M-row manifest's row
    dicts once (measured), nothing with Strings."""

    def __init__(self, values):
        table, index = {}, []
        for v in values:
            index.append(table.setdefault(v, len(table)))
        data = [v.encode() for v in table]
        self.ends = np.cumsum([len(b) for b in data], dtype=np.int64)
        self.blob = np.frombuffer(b"".join(data), np.uint8)
        self.index = np.array(index, np.int64)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j = self.index[i]
        return self.blob[self.ends[j - 1] if j else 0:self.ends[j]].tobytes().decode()


class Clips:
    """Where the audio of each manifest row is (a file, or a clip in a tar shard: its
    `shard_offset` and `shard_bytes`) and the row's manifest line, as numpy buffers."""

    def __init__(self, rows):
        self.path = Strings(r["path"] for r in rows)
        self.where = Strings(r["_where"] for r in rows)
        self.member = np.array([(int(r["shard_offset"]), int(r["shard_bytes"])) if
                                r.get("shard_offset") else (-1, 0) for r in rows], np.int64)

    def __len__(self):
        return len(self.path)

    def read(self, i, seconds=None, rng=None, pad=True):
        """Row i's audio (load_audio; int16 from a 16 kHz mono 16-bit file)."""
        offset, size = (int(x) for x in self.member[i])
        return load_audio(self.path[i], seconds, rng, self.where[i], pad,
                          (offset, size) if offset >= 0 else None, int16=True)


class ClipDataset(torch.utils.data.Dataset):
    """Random `seconds`-long crops of manifest rows. Items are (index, key) pairs from
    StreamSampler; the crop is drawn from an RNG seeded by (seed, key), so it does not depend
    on the worker count or on where a run was resumed. An item is (wav, valid, the messages
    of the clips that failed to decode and were replaced: read_or_replace)."""

    def __init__(self, rows, seconds, seed=0):
        self.clips, self.seconds, self.seed = Clips(rows), seconds, seed

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, item):
        idx, key = item
        return read_or_replace(self.read, idx, len(self.clips), (self.seed, key))

    def read(self, idx, rng):
        return self.clips.read(idx, self.seconds, rng)


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
    """DataLoader of (wav (B, S) (int16 from 16-bit 16 kHz mono files: data.on_device),
    valid (B,), [messages of replaced clips]) for pre-training, resumable at micro-batch
    start."""
    sampler = StreamSampler(len(rows), batch, d.rank, d.world, seed, start)
    return torch.utils.data.DataLoader(
        ClipDataset(rows, seconds, seed), batch_sampler=sampler, collate_fn=pad_collate,
        num_workers=workers,
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


class EpochItems(torch.utils.data.Sampler):
    """A sampler's indices as (index, epoch) items, for a dataset whose items depend on the
    epoch (LabelledClips in training). The epoch travels with each index because persistent
    DataLoader workers keep the copy of the dataset they started with: an epoch set on the
    dataset in the main process would never reach them. set_epoch sets the sampler's too."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return zip(self.sampler, itertools.repeat(self.epoch))  # the epoch of this pass


class LabelledClips(torch.utils.data.Dataset):
    """(wav (Clips.read), valid samples, target) of manifest rows. Training: items
    are (index, epoch) (EpochItems), a random `seconds` crop (RNG from (seed, epoch, index)),
    zero-padded, and a 4th item, the messages of clips that failed to decode and were
    replaced (read_or_replace). Evaluation: items are indices, the centre `seconds` of longer
    clips, unpadded (pad_collate pads the batch); a clip that fails to decode ends the run,
    as a replaced one would change a reported score."""

    def __init__(self, rows, targets, seconds, train=False, seed=0):
        self.clips, self.targets, self.seconds, self.train, self.seed = Clips(rows), targets, \
            seconds, train, seed

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, item):
        if self.train:
            i, epoch = item
            return read_or_replace(self.read, i, len(self.clips), (self.seed, epoch, i))
        return self.read(item, None)

    def read(self, i, rng):
        return (*self.clips.read(i, self.seconds, rng, pad=self.train), self.targets[i])


def pad_collate(batch):
    """A list of (wav, valid[, target][, replaced clips' messages]) -> the clips zero-padded to
    the longest (data.audio_batch: int16 when every clip is), (B,) valid samples[, stacked
    targets][, a list of B messages]."""
    wavs, valid, *rest = zip(*batch)
    return audio_batch(wavs), torch.tensor(valid), *(
        torch.stack(x) if isinstance(x[0], torch.Tensor) else list(x) for x in rest)


def make_loader(ds, device, num_workers, **kw):
    """A downstream DataLoader, made once per run and iterated every epoch and evaluation:
    cluster.workers(num_workers) workers, kept between passes (persistent), and batches in
    pinned memory on CUDA, for the copy that does not block (data.on_device)."""
    n = workers(num_workers)
    return torch.utils.data.DataLoader(ds, num_workers=n, persistent_workers=n > 0,
                                       pin_memory=device.type == "cuda", **kw)
