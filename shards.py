"""
Packed shards (prepare.py --shards): a prepared dataset's clips as tar files in the WebDataset
layout, for clusters whose network filesystems choke on millions of small files. Each clip is
two consecutive members, KEY.flac (16 kHz mono 16-bit FLAC, data.pcm16: the samples a worker
would hand over) and KEY.json ({"source": its path in the download, and its labels}); KEY is
the clip's number, 9 digits. Shards are FOLDER/NNNNNN.tar of about --shard_mb each, and
FOLDER/shards.json lists them with their clip counts (the index wids reads), so the webdataset
library reads them as they are. The stages read them by random access instead: each manifest
row names its shard (`path`) and the clip's byte offset and size in it (`shard_offset`,
`shard_bytes`), and data.load_audio reads those bytes from a shard each worker opens once.
The samplers, DDP splitting, balanced sampling and exact resume are those of files.

Clips are encoded in parallel processes and appended in order; a shard is renamed to its name
once complete, so a killed run resumes from the shards it finished (their clips are read back
from the tar headers).
"""
import io
import json
import multiprocessing
import os
import re
import tarfile

import soundfile as sf
import torch
from tqdm import tqdm

from data import AudioError, pcm16
from plumbing import UserError, partial_name, remove_partials, save_json

SHARD = re.compile(r"\d{6}\.tar")  # a shard's name
SHARD_MB = 1000.0  # --shard_mb: a shard's members take at most this many MB (or one clip)


def key_of(i):
    return f"{i:09d}"


def _encode(job):
    """(key, FLAC bytes, JSON bytes) of one clip, or (key, None, why) when it does not read."""
    key, path, meta = job
    try:
        x = pcm16(path)
    except AudioError as e:
        return key, None, str(e)
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="FLAC", subtype="PCM_16")
    return key, buf.getvalue(), json.dumps(meta, ensure_ascii=False).encode()


def members(path):
    """{key: (offset, size) of its .flac} and {key: its JSON} of a shard, from its headers."""
    where, meta = {}, {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            if ext == "flac":
                where[key] = (m.offset_data, m.size)
            elif ext == "json":
                meta[key] = json.load(tar.extractfile(m))
    return where, meta


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(clips, folder, workers, shard_mb=SHARD_MB):
    """Packs `clips` ([(source path, JSON-able metadata with `source`)], in order; clip i is
    key_of(i)) into folder/NNNNNN.tar. Shards finished by an earlier run are kept (their
    clips must be among `clips`, else the folder holds another dataset: an error). Returns
    ({source path: (shard path, offset, size)}, {source path: why it did not convert})."""
    os.makedirs(folder, exist_ok=True)
    remove_partials(folder)
    done, where, n_shards = {}, {}, 0
    for name in sorted(f for f in os.listdir(folder) if SHARD.fullmatch(f)):
        path = os.path.join(folder, name)
        spans, metas = members(path)
        for key, span in spans.items():
            done[key] = metas[key]["source"]
            where[key] = (path, *span)
        n_shards = int(name[:-4]) + 1  # new shards after the last: never over a finished one
    keys = {key_of(i): (p, m) for i, (p, m) in enumerate(clips)}
    strays = [k for k in done if k not in keys or keys[k][1]["source"] != done[k]]
    if strays:
        raise UserError(f"{folder} holds shards of other clips (clip {strays[0]} is "
                        f"{done[strays[0]]!r} there): give another --out, or move them away")
    todo = [(k, p, m) for k, (p, m) in keys.items() if k not in done]
    if done:
        print(f"{folder}: {n_shards} shards of {len(done):,} clips were written before; "
              f"{len(todo):,} clips to go")
    bad, limit = {}, shard_mb * 1e6
    tar = None

    def close():  # the shard complete on disk, then under its name
        tar.close()
        tar.fileobj.flush()
        os.fsync(tar.fileobj.fileno())
        tar.fileobj.close()
        final = os.path.join(folder, f"{n_shards:06d}.tar")
        os.replace(tar.fileobj.name, final)
        for key, span in members(final)[0].items():
            where[key] = (final, *span)
    with multiprocessing.get_context("fork").Pool(
            workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for key, flac, meta in tqdm(pool.imap(_encode, todo, chunksize=8), total=len(todo),
                                    desc=f"packing {len(todo):,} clips into {folder}",
                                    unit=" clips"):
            if flac is None:
                bad[keys[key][0]] = meta
                continue
            need = sum(512 + -(-len(b) // 512) * 512 for b in (flac, meta))  # with headers
            if tar is not None and tar.offset + need > limit:
                close()
                tar, n_shards = None, n_shards + 1
            if tar is None:
                f = open(partial_name(os.path.join(folder, f"{n_shards:06d}.tar")), "wb")
                tar = tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT)
            _add(tar, f"{key}.flac", flac)
            _add(tar, f"{key}.json", meta)
    if tar is not None:
        close()
    counts = {}
    for path, *_ in where.values():
        counts[path] = counts.get(path, 0) + 1
    save_json({"wids_version": 1, "name": os.path.basename(folder),
               "shardlist": [{"url": os.path.basename(p), "nsamples": n}
                             for p, n in sorted(counts.items())]},
              os.path.join(folder, "shards.json"))
    return {keys[k][0]: span for k, span in where.items()}, bad
