"""
Linear evaluation (REFERENCE.md R6, paper Table IV): the frozen teacher encoder of a pre-trained
ATST-Clip, ATST-Frame or ASiT checkpoint (ours or released) gives one feature per clip: every
block, after the final norm; Clip and ASiT [CLS, mean of frames] per block, Frame mean of frames
per block (2*L*D / L*D); clips centre-cropped to 12 s, cut into 6 s / 10 s / 5.92 s (ASiT)
chunks, chunk features averaged (a trailing chunk counts when longer than half a chunk).
Features are extracted once and cached. A BatchNorm(affine=False) + Linear head is trained with
SGD for each lr of a grid; the lr is chosen on the validation split (held out of train when the
task has none); the test set is scored once, at the chosen lr. Datasets distributed as folds
(US8K 10, ESC-50 5) report the mean over folds, each clip encoded once. Several tasks in one
run share the loaded encoder; each writes its own result file.

    python linear_eval.py --ckpt out/frame_tiny/ckpt.pt --data demo_events
    python linear_eval.py --ckpt atstframe_base.ckpt --data us8k                  # 10 folds
    python linear_eval.py --ckpt X.pt --data us8k,spcv2,vox1,nsynth,fsd50k,as20k,esc50 \
        --out 'results/linear_{data}_X.json'
    python linear_eval.py --ckpt X.pt --data my/train.csv --test_csv my/test.csv
    torchrun --nproc_per_node=8 linear_eval.py --ckpt X.pt --data spcv2   # extraction sharded
"""
import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cluster import (check_shared, cleanup_distributed, decide, gather_shards, my_shard,
                     shared_work, together, visible)
from config import configure
from data import (Labels, manifest_name, on_device, read_manifest, resolve_manifest,
                  task_copy, task_splits)
from downstream import publish, record, start, start_encoder
from heads import LinearHead
from loaders import LabelledClips, make_loader, pad_collate
from metrics import score
from model import SAMPLE_RATE
from plumbing import (UserError, check_writable, cosine_schedule, load_checkpoint, save_atomic,
                      user_errors)

# -------------------------------------------------------------------------------- config
ckpt = ""                   # pre-trained checkpoint: ours (teacher encoder) or a released one
data = "demo_events"        # task(s): named datasets (comma-separated), demo_events / demo_tags,
                            # or a train CSV
data_root = ""              # root of named datasets; '' = $ATST_DATA or ./data
test_csv = ""               # test manifest when --data is a CSV
valid_csv = ""              # validation manifest (else 10% of train is held out)
folds = 0                   # k-fold over a `fold` column, fold mean; 0 = the task's (TASK_FOLDS)
out = ""                    # result JSON, {data} = task; '' = results/linear_{data}_<ckpt>.json
cache_dir = "cache"         # extracted features, keyed by checkpoint + clips
max_seconds = 12.0          # longer clips are centre-cropped to this
lrs = "0.01,0.03,0.1,0.3,1,3"  # learning rates searched on the validation split
epochs = 100                # head training epochs (cosine to min_lr)
batch_size = 1024           # head training batch
min_lr = 1e-6               # lr at the last step (cosine)
random_init = False         # baseline: the same encoder with random weights
chunk_seconds = 0.0         # encoder chunk; 0 = the model's (Clip 6, Frame 10, ASiT 5.92 s)
frame_pool = ""             # ASiT's 8 band tokens a frame: mean | concat; '' = the kind's (mean)
extract_batch = 32          # clips per forward during extraction
num_workers = -1            # DataLoader workers reading audio; -1: the CPUs / ranks here, less one
device = "auto"             # auto (CUDA if torch sees it) | cpu | cuda (an error without CUDA)
dtype = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (CPU too) | fp32
seed = 0                    # seed of the head's init, data order and held-out split
TASK_FOLDS = {"us8k": 10, "esc50": 5}  # distributed as folds, without a test split


def extract(ae, rows, c, d, tag):
    """Features (N, F) of rows (centre-cropped clips), from the cache when rank 0 finds them
    there, else extracted with the clips sharded over the ranks (a rank may have none)."""
    files = shared_work([r["path"] for r in rows], lambda p: (p, os.path.getsize(p),
                                                             os.path.getmtime(p)), d)
    spans = [(r.get("shard_offset"), r.get("shard_bytes")) for r in rows]  # clips in shards
    key = decide(lambda: hashlib.sha1(json.dumps([tag, c.max_seconds, files, spans]).encode())
                 .hexdigest()[:16], d)  # rank 0's tag: its copy of the checkpoint
    path = os.path.join(c.cache_dir, f"linear_{key}.pt")
    if decide(lambda: os.path.exists(path), d):
        return load_checkpoint(visible(path, d, "cache_dir"))
    mine = my_shard(len(rows), d)
    ds = LabelledClips([rows[i] for i in mine], torch.zeros(len(mine)), c.max_seconds)
    loader = make_loader(ds, d.device, c.num_workers, batch_size=c.extract_batch,
                         collate_fn=pad_collate)  # one pass: its workers end when it is freed
    feats = []
    for wav, valid, _ in tqdm(loader, desc=f"features ({len(rows)} clips)", disable=not d.master):
        valid = valid.to(d.device, non_blocking=True)
        feats.append(ae(on_device(wav, d.device), SAMPLE_RATE, valid, layers="all",
                        dtype=c.dtype).clip.half().cpu())
    feats = gather_shards(mine, feats, len(rows), d)
    if d.master:
        os.makedirs(c.cache_dir, exist_ok=True)
        save_atomic(feats, path)
    return feats


def train_head(X, y, lr, multi, n_classes, c, device):
    """SGD (momentum 0.9, no weight decay) on fixed features; cosine lr to min_lr per step."""
    torch.manual_seed(c.seed)
    head = LinearHead(X.shape[1], n_classes).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    per_epoch = math.ceil(len(X) / c.batch_size)
    sched = cosine_schedule(lr, c.min_lr, c.epochs * per_epoch)
    g = torch.Generator().manual_seed(c.seed)
    step = 0
    for _ in range(c.epochs):
        for idx in torch.randperm(len(X), generator=g).split(c.batch_size):
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            for group in opt.param_groups:
                group["lr"] = sched[step].item()
            logits = head(X[idx])
            loss = F.binary_cross_entropy_with_logits(logits, y[idx]) if multi else \
                F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


def evaluate_split(c, d, task, features, folds=0, fold=0):
    """One train/valid/test split: lr search on valid, test at the chosen lr. features(rows)
    -> (N, F) features of manifest rows."""
    train, valid, test = task_splits(task, c.data_root or None, c.test_csv, c.valid_csv,
                                     folds, fold, seed=c.seed, d=d)
    labels = Labels.of_task(task, train + valid + test, c.data_root or None)
    ys = [labels.encode(r).to(d.device) for r in (train, valid, test)]
    Xs = [features(rows).float().to(d.device) for rows in (train, valid, test)]
    val, heads = {}, {}
    for lr in [float(x) for x in c.lrs.split(",")]:
        heads[lr] = train_head(Xs[0], ys[0], lr, labels.multi, len(labels.classes), c, d.device)
        with torch.no_grad():
            val[lr] = score(heads[lr](Xs[1]), ys[1], labels.multi)
        d.print(f"  lr {lr:g}: valid {val[lr]:.4f}")
    best = max(val, key=val.get)  # chosen on validation only; test is scored once, below
    with torch.no_grad():
        test_score = score(heads[best](Xs[2]), ys[2], labels.multi)
    return dict(lr=best, valid=val[best], test=test_score, valid_by_lr=val,
                n=[len(train), len(valid), len(test)], classes=len(labels.classes),
                metric="mAP" if labels.multi else "accuracy", feature_dim=Xs[0].shape[1])


def evaluate_task(ae, c, d, task, cfg):
    """Every split (or fold) of a task -> its result record."""
    t0 = time.time()
    folds = c.folds or TASK_FOLDS.get(task, 0)
    tag = [os.path.realpath(c.ckpt), os.path.getmtime(c.ckpt), c.random_init, c.seed, ae.chunk,
           ae.frame_pool]
    features = lambda rows: extract(ae, rows, c, d, tag)
    if folds:  # every clip encoded once; each fold's splits are rows of the same manifest
        rows = read_manifest(resolve_manifest(task, "train", c.data_root or None), d=d)
        X, where = features(rows), {r["_where"]: i for i, r in enumerate(rows)}
        features = lambda subset: X[[where[r["_where"]] for r in subset]]
    runs = [evaluate_split(c, d, task, features, folds, f)
            for f in (range(1, folds + 1) if folds else [0])]
    res = dict(runs[0], test=sum(r["test"] for r in runs) / len(runs),
               folds=runs if folds else None)
    res.update(record("linear_eval", task, task_copy(task, c.data_root or None), c, d, ae, t0,
                      cfg, frame_pool=ae.frame_pool))
    return res


def main(cfg):
    c, d, _ = start(cfg)
    tasks = c.data.split(",")
    if len(tasks) > 1 and (c.test_csv or c.valid_csv or (c.out and "{data}" not in c.out)):
        raise UserError(f"--data {c.data}: with several tasks, --out needs '{{data}}' (each "
                        "task's result file) and --test_csv / --valid_csv go with one task")
    name = os.path.splitext(os.path.basename(c.ckpt))[0] if not c.ckpt.endswith("ckpt.pt") \
        else os.path.basename(os.path.dirname(os.path.abspath(c.ckpt)))
    out = c.out or os.path.join("results", f"linear_{{data}}_{name}"
                                           f"{'_random' if c.random_init else ''}"
                                           f"{'_' + c.frame_pool if c.frame_pool else ''}.json")
    paths = {t: out.replace("{data}", manifest_name(t)) for t in tasks}
    for path in paths.values():  # said now, not after the work
        together(lambda: check_writable(path, "out"), d)
    together(lambda: check_writable(c.cache_dir, "cache_dir", folder=True), d)
    check_shared(c.cache_dir, d, "cache_dir")  # rank 0 says which features are cached there
    ae = start_encoder(c, d).pool_frames(c.frame_pool)
    if c.chunk_seconds:
        ae.chunk = min(round(c.chunk_seconds / ae.frame_s),
                       ae.encoder.max_tokens // ae.per_frame)                  # Table II: 1 s
    d.print(f"{ae.source}: {ae.name}, dim {ae.encoder.dim}, depth {ae.encoder.depth}, "
            f"{d.precision}")
    for task, path in paths.items():
        res = evaluate_task(ae, c, d, task, cfg)
        publish(res, path, d, f"linear_eval {task} | {ae.name} | {res['metric']} "
                f"{res['test']:.4f} (test) | lr {res['lr']:g} (valid {res['valid']:.4f}) | "
                f"{res['elapsed_s']:.0f}s")
    cleanup_distributed()


if __name__ == "__main__":
    cfg = configure(globals())
    if not cfg["ckpt"]:
        raise SystemExit("linear_eval.py needs --ckpt (a pre-trained checkpoint)")
    with user_errors():
        main(cfg)
