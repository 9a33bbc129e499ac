"""
Sound event detection (SPEC 7, paper Table VI): DCASE 2022 task 4 (DESED) on top of an ATST-Frame
or ATST-Clip checkpoint. Last-block frames (40 ms) -> strong sigmoid + class-softmax attention
pooling to a weak prediction; batches of strong + weak clips, loss BCE(strong) + BCE(weak);
SGD lr 0.1, 5 warmup epochs then cosine, grad clip 3. --mode linear trains the head only;
--mode finetune also the last block and final norm (the rest frozen in eval mode). Evaluation:
median filter, 50 thresholds, PSDS1/PSDS2 through psds_eval (the paper's numbers), the exact
threshold-free PSDS1/PSDS2 through sed_scores_eval, intersection F1 at 0.5, PSD-ROC plots,
DESED detection TSVs.

    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed --mode linear
    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed --mode finetune
    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed --teacher out/sed_demo_sed_clip_finetune/best.pt  # C2F
    torchrun --nproc_per_node=8 sed.py --ckpt atstframe_base.ckpt --data dcase2022
    python sed.py --predict my_audio/ --ckpt out/sed_dcase2022_frame_finetune/best.pt --out events.tsv
"""
import glob
import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import (AUDIO_EXTS, FRAME_S, Log, SedClips, cleanup_distributed, configure,
                  decode_strong, default_data_root, encode_strong, gather_shards, hold_out,
                  load_audio, load_checkpoint, make_demo, my_shard, read_durations, read_strong,
                  read_weak, save_atomic, setup_distributed)
from model import SedModel, cosine_schedule, load_classifier, load_encoder, tokens_for

# -------------------------------------------------------------------------------- config
ckpt = ""                   # pre-trained checkpoint (training) or an SED checkpoint (--predict)
data = "dcase2022"          # dcase2022 (DESED layout under the data root) | demo_sed | a folder
data_root = ""              # root of named datasets; '' = $ATST_DATA or ./data
out_dir = ""                # '' = out/sed_<data>_<kind>_<mode>
mode = "finetune"           # linear: head only | finetune: + last block and final norm
teacher = ""                # SED checkpoint of the other kind: C2F / F2C distillation
kd_weight = 0.5             # total = task + kd_weight * mean(BCE strong, BCE weak) vs teacher
lr = 0.1                    # SGD, momentum 0.9
epochs = 100
warmup_epochs = 5.0
min_lr = 1e-6
grad_clip = 3.0
batch_strong = 128          # strong (synthetic) clips per step, all GPUs together
batch_weak = 128            # weak clips per step
weak_valid = 0.1            # weak clips held out for validation (the other 90% train)
strong_valid = 0.1          # strong clips held out for validation (best epoch by their F1)
median_window = 7           # frames (40 ms) of the median filter
class_windows = ""          # per-class windows, e.g. "Speech:7,Dishes:3" (others: median_window)
n_thresholds = 50           # operating points for psds_eval: 0.01, 0.03, ..., 0.99
threshold = 0.5             # --predict and the F1 / detection TSVs
predict = ""                # files or a folder to detect events in (needs an SED --ckpt)
out = ""                    # --predict output TSV; '' = stdout
cache = False               # keep every clip's log-mel (linear: its frozen frames) and teacher
                            # output in memory after one pass: exact (no augmentation, frozen
                            # parts in eval mode), epochs skip audio I/O; RAM: ~0.26 MB per clip
                            # (linear: 4 bytes x 250 x dim), on every rank
num_workers = 4
device = "auto"             # auto | cpu
seed = 0
TASKS = {  # the demo: CPU-sized; its intermittent events (clicks, plucks, tremolo) need a
    # longer median filter than DESED's 7 frames (7: test PSDS1 0.000, 31: 0.057, tiny Frame)
    "demo_sed": dict(epochs=20, batch_strong=16, batch_weak=16, warmup_epochs=1.0, lr=0.5,
                     num_workers=2, cache=True, median_window=31)}
PSDS1 = dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=0.3, alpha_ct=0.0,
             alpha_st=1.0, max_efpr=100)
PSDS2 = dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5,
             alpha_st=1.0, max_efpr=100)


def task_dir(c):
    """DATA_ROOT/<name>/ (demo_sed lives under demo/sed) or a folder given directly."""
    if os.path.isdir(c.data):
        return c.data
    root = c.data_root or default_data_root()
    if c.data == "demo_sed":
        return os.path.join(make_demo(root), "sed")
    path = os.path.join(root, c.data)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"SED dataset {c.data!r}: expected the folder {path} "
                                "(README 'Sound event detection' shows the layout)")
    return path


def median_filter(scores, windows):
    """Centred running median over time of (N, T, C) scores, one window per class (odd);
    edges repeat the first / last frame."""
    out = np.empty_like(scores)
    for c, w in enumerate(windows):
        h = w // 2
        x = np.pad(scores[..., c], ((0, 0), (h, h)), mode="edge")
        out[..., c] = np.median(np.lib.stride_tricks.sliding_window_view(x, w, axis=1), -1)
    return out


def detections_at(scores, files, classes, thresholds):
    """Detection tables (DataFrames: filename, onset, offset, event_label) for every threshold,
    from one vectorised pass over (N, T, C) scores: {threshold: DataFrame}."""
    import pandas as pd
    act = scores[None] > np.asarray(thresholds, dtype=scores.dtype)[:, None, None, None]
    d = np.diff(np.pad(act, ((0, 0), (0, 0), (1, 1), (0, 0))).astype(np.int8), axis=2)
    d = d.transpose(0, 1, 3, 2)                                             # (K, N, C, T+1)
    k, n, c, on = np.nonzero(d == 1)                                        # sorted by k
    off = np.nonzero(d == -1)[3]                                            # same order
    files, classes = np.asarray(files), np.asarray(classes)
    cuts = np.searchsorted(k, np.arange(len(thresholds) + 1))
    return {t: pd.DataFrame(dict(filename=files[n[i:j]], onset=on[i:j] * FRAME_S,
                                 offset=off[i:j] * FRAME_S, event_label=classes[c[i:j]]))
            for t, i, j in zip(thresholds, cuts[:-1], cuts[1:])}


def _psds_eval_class():
    from psds_eval import PSDSEval

    class FastPSDSEval(PSDSEval):
        """psds_eval 0.5.3 without its self-overlap check on detection tables (half its time):
        detections_at builds them from runs of active frames, which never overlap within a
        class. Ground truth is still fully validated."""

        def _validate_input_table_with_events(self, df, name):
            if name == "detection":
                self._validate_simple_dataframe(df, self.detection_cols, name, allow_empty=True)
            else:
                super()._validate_input_table_with_events(df, name)
    return FastPSDSEval


_EVAL = None  # the evaluator a forked worker scores operating points with


def _op_point(det):
    t = _EVAL._init_det_table(det)
    return _EVAL._operating_point_id(t), _EVAL._evaluate_detections(t)


def psds_operating_points(ev, tables, workers):
    """ev.add_operating_point for every table, the scoring spread over forked processes."""
    global _EVAL
    _EVAL = ev
    if workers > 1 and len(tables) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_op_point, tables)
    else:
        results = [_op_point(t) for t in tables]
    for op_id, (cts, tpr, fpr, ctr) in results:
        if op_id:
            ev._add_op(opid=op_id, counts=cts, tpr=tpr, fpr=fpr, ctr=ctr, info=None)


def macro_f1(ev, det, gt):
    """Intersection-based macro F1 as psds_eval counts it, except that a class with ground
    truth and no true positive scores 0 (psds_eval 0.5.3 divides 0 by 0 there and drops the
    class from the mean, or returns nan when no class has a hit)."""
    from psds_eval.psds import WORLD
    counts = ev._evaluate_detections(ev._init_det_table(det))[0]
    tp, fp = np.diag(counts)[:-1], counts[:-1, -1]
    names = sorted(set(ev.class_names) - {WORLD})
    n_gt = gt["event_label"].value_counts().reindex(names, fill_value=0).to_numpy()
    f = 2 * tp / np.maximum(2 * tp + (n_gt - tp) + fp, 1e-12)
    return float(f[n_gt > 0].mean())


def evaluate(scores, files, classes, gt_tsv, dur_tsv, windows, c, plot_dir=None, quick=False):
    """PSDS1/PSDS2 (psds_eval at n_thresholds operating points, and threshold-free through
    sed_scores_eval), intersection F1 at `threshold`; plots and TSVs when plot_dir is given.
    quick (validation): only the F1 and the exact PSDS1."""
    import warnings
    import pandas as pd
    from psds_eval import plot_psd_roc
    from sed_scores_eval import intersection_based, io
    warnings.filterwarnings("ignore", module="psds_eval")  # pandas deprecations inside it
    PSDSEval = _psds_eval_class()
    t0 = time.time()
    scores = median_filter(scores, windows)
    ths = [round(float(t), 4) for t in np.linspace(0.01, 0.99, c.n_thresholds)]
    dets = detections_at(scores, files, classes, ths + [c.threshold])
    tables = [dets[t] for t in ths]
    gt = pd.read_csv(gt_tsv, sep="\t").dropna()
    meta = pd.read_csv(dur_tsv, sep="\t")
    workers = min(8, os.cpu_count() or 1)
    res = {}
    for name, p in () if quick else (("psds1", PSDS1), ("psds2", PSDS2)):
        ev = PSDSEval(p["dtc_threshold"], p["gtc_threshold"], p["cttc_threshold"],
                      ground_truth=gt, metadata=meta)
        psds_operating_points(ev, tables, workers)
        psds = ev.psds(p["alpha_ct"], p["alpha_st"], p["max_efpr"])
        res[name] = float(psds.value)
        if plot_dir:
            plot_psd_roc(psds, filename=os.path.join(plot_dir, f"psd_roc_{name}.png"))
    ev = PSDSEval(0.5, 0.5, 0.3, ground_truth=gt, metadata=meta)
    res["f1_intersection"] = macro_f1(ev, dets[c.threshold], gt)
    res["psds_eval_s"] = round(time.time() - t0, 2)
    t1 = time.time()
    stamps = np.arange(scores.shape[1] + 1) * FRAME_S
    sc = {os.path.splitext(f)[0]: io.create_score_dataframe(s, stamps, classes)
          for f, s in zip(files, scores)}
    gt_d = {os.path.splitext(f)[0]: [] for f in meta["filename"]}
    for r in gt.itertuples():
        gt_d[os.path.splitext(r.filename)[0]].append((r.onset, r.offset, r.event_label))
    durs = {os.path.splitext(r.filename)[0]: r.duration for r in meta.itertuples()}
    for name, p in (("psds1", PSDS1),) + (() if quick else (("psds2", PSDS2),)):
        kw = dict(p, cttc_threshold=p["cttc_threshold"] if p["alpha_ct"] else None)
        res[f"{name}_exact"] = float(intersection_based.psds(sc, gt_d, durs, num_jobs=workers,
                                                             **kw)[0])
    res["sed_scores_eval_s"] = round(time.time() - t1, 2)
    if plot_dir:
        dets[c.threshold].to_csv(os.path.join(plot_dir, f"detections_{c.threshold:.2f}.tsv"),
                                 sep="\t", index=False, float_format="%.3f")
    return res


@torch.no_grad()
def clip_inputs(model, ds, c, d, features=False, teacher=None):
    """One pass over SedClips in eval mode: CPU tensors (x, n_tok, targets, teacher strong,
    teacher weak); x is the log-mel (B, F, T), or with `features` the encoder's frames."""
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=c.num_workers)
    out = []
    for wav, valid, y in loader:
        wav, valid = wav.to(d.device), valid.to(d.device)
        x, n = model.ae.front(wav, valid), tokens_for(valid)
        with d.ctx:
            none = torch.zeros(len(y), 0)  # no teacher: empty columns
            ts, tw = teacher(x, n) if teacher is not None else (none, none)
            if features:
                x = model.ae.encode(x, n).frames
        out.append([x.float().cpu(), n.cpu(), y, ts.float().cpu(), tw.float().cpu()])
    return [torch.cat(col) for col in zip(*out)]


@torch.no_grad()
def predict_scores(model, audio_dir, files, c, d, cached=None):
    """Strong scores (N, T, C) of 10 s clips, sharded over ranks. `cached`: this rank's shard
    as clip_inputs gave it (x, n_tok, ...); without it the clips stream from disk."""
    model.eval()
    mine = my_shard(len(files), d)
    if cached is not None:
        features = c.cache and c.mode == "linear"
        batches = zip(cached[0].split(32), cached[1].split(32))
    else:
        features = False
        ds = SedClips(audio_dir, [files[i] for i in mine], torch.zeros(len(mine)))
        loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=c.num_workers)
        batches = ((model.ae.front(w.to(d.device), v.to(d.device)), tokens_for(v.to(d.device)))
                   for w, v, _ in loader)
    out = []
    for x, n in batches:
        with d.ctx:
            out.append(model(x.to(d.device), n.to(d.device), features)[0].float().cpu())
    return gather_shards(mine, torch.cat(out), len(files), d).numpy()


def class_window_list(c, classes):
    w = {k: int(v) for k, v in (x.split(":") for x in c.class_windows.split(",") if x)}
    unknown = set(w) - set(classes)
    if unknown:
        raise ValueError(f"--class_windows names unknown classes {sorted(unknown)}")
    return [w.get(k, c.median_window) for k in classes]


def freeze_for(model, mode):
    """linear: head only; finetune: + last block and final norm. Frozen parts stay in eval."""
    enc = model.ae.encoder
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    if mode == "finetune":
        enc.blocks[-1].requires_grad_(True)
        enc.norm.requires_grad_(True)
    elif mode != "linear":
        raise SystemExit(f"--mode {mode!r}: linear or finetune")


def set_train(model, mode):
    model.eval()
    model.head.train()
    if mode == "finetune":
        model.ae.encoder.blocks[-1].train()


def train(cfg):
    c = SimpleNamespace(**cfg)
    t0 = time.time()
    d = setup_distributed(c.device)
    d.print("config:", " ".join(f"{k}={v}" for k, v in cfg.items()))
    root = task_dir(c)
    strong = read_strong(os.path.join(root, "train_strong.tsv"))
    weak = read_weak(os.path.join(root, "train_weak.tsv"))
    classes = sorted({e[2] for ev in strong.values() for e in ev} |
                     {lab for labels in weak.values() for lab in labels})  # the class list
    durations = read_durations(os.path.join(root, "test_durations.tsv"))
    test = read_strong(os.path.join(root, "test.tsv"), classes, durations)
    s_train, s_valid = hold_out(sorted(strong), c.strong_valid, c.seed)
    w_train, _ = hold_out(sorted(weak), c.weak_valid, c.seed)
    ae = load_encoder(c.ckpt, d.device, pretrained=True)
    out_dir = c.out_dir or os.path.join("out", f"sed_{os.path.basename(c.data)}_{ae.kind}_"
                                               f"{c.mode}")
    os.makedirs(out_dir, exist_ok=True)
    teacher = None
    if c.teacher:
        teacher = load_classifier(c.teacher, d.device, expect=["atst-sed"])
        teacher.eval().requires_grad_(False)
        if teacher.classes != classes:
            raise SystemExit(f"{c.teacher} was trained on other classes: {teacher.classes}")
    torch.manual_seed(c.seed)
    model = SedModel(ae, len(classes)).to(d.device)
    freeze_for(model, c.mode)
    ddp = model if d.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    d.print(f"{ae.source}: ATST-{ae.kind}, {len(classes)} classes, {c.mode}: "
            f"{sum(p.numel() for p in params):,} trainable parameters; strong {len(s_train)}/"
            f"{len(s_valid)}, weak {len(w_train)}, test {len(test)} clips")
    opt = torch.optim.SGD(params, lr=c.lr, momentum=0.9)
    n_frames = tokens_for(10 * 16000)
    mk = lambda files, audio, tgt: SedClips(os.path.join(root, "audio", audio), files, tgt)
    s_ds = mk(s_train, "train_strong", torch.stack([encode_strong(strong[f], classes, n_frames)
                                                    for f in s_train]))
    w_ds = mk(w_train, "train_weak", torch.tensor([[float(k in weak[f]) for k in classes]
                                                   for f in w_train]))
    features = c.cache and c.mode == "linear"
    v_cache = None  # this rank's shard of the validation clips, as predict_scores takes it
    if c.cache:  # one pass over the clips; the epochs then read memory (exact: see the flag)
        t_c = time.time()
        s_ds, w_ds = (torch.utils.data.TensorDataset(*clip_inputs(model, ds, c, d, features,
                                                                  teacher)) for ds in (s_ds, w_ds))
        mine = my_shard(len(s_valid), d)
        v_cache = clip_inputs(model, mk([s_valid[i] for i in mine], "train_strong",
                                        torch.zeros(len(mine))), c, d, features)
        d.print(f"cached {'frames' if features else 'log-mels'} of {len(s_ds) + len(w_ds)} "
                f"training clips in {time.time() - t_c:.0f}s")
    loaders = []
    for ds, b in ((s_ds, c.batch_strong), (w_ds, c.batch_weak)):
        sampler = torch.utils.data.DistributedSampler(ds, d.world, d.rank, seed=c.seed,
                                                      drop_last=True)
        loaders.append((sampler, torch.utils.data.DataLoader(
            ds, b // d.world, sampler=sampler, num_workers=0 if c.cache else c.num_workers,
            drop_last=True)))
    per_epoch = len(loaders[0][1])
    assert per_epoch > 0 and len(loaders[1][1]) > 0, "fewer clips than one batch"
    total = c.epochs * per_epoch
    sched = cosine_schedule(c.lr, c.min_lr, total, min(int(c.warmup_epochs * per_epoch), total))
    windows = class_window_list(c, classes)
    valid_gt = os.path.join(out_dir, "valid_strong.tsv")
    valid_dur = os.path.join(out_dir, "valid_durations.tsv")
    if d.master:  # the held-out strong clips, in DESED format, for validation PSDS
        with open(valid_gt, "w") as f, open(valid_dur, "w") as g:
            f.write("filename\tonset\toffset\tevent_label\n")
            g.write("filename\tduration\n")
            for name in s_valid:
                f.writelines(f"{name}\t{a}\t{b}\t{l}\n" for a, b, l in strong[name])
                g.write(f"{name}\t10.0\n")
    best, step = dict(obj=-1.0, epoch=0), 0
    log = Log(out_dir, d.master)
    best_path = os.path.join(out_dir, "best.pt")

    def inputs(batch):
        """A loader batch -> (x, n_tok, targets, teacher strong, teacher weak) on the device."""
        batch = [t.to(d.device) for t in batch]
        if c.cache:
            return batch
        wav, valid, y = batch
        with torch.no_grad():
            x, n = model.ae.front(wav, valid), tokens_for(valid)
            with d.ctx:
                ts, tw = teacher(x, n) if teacher is not None else (None, None)
        return x, n, y, ts, tw

    for epoch in range(c.epochs):
        set_train(model, c.mode)
        for sampler, _ in loaders:
            sampler.set_epoch(epoch)
        weak_iter, loss_sum, t_ep = iter(loaders[1][1]), 0.0, time.time()
        for batch_s in tqdm(loaders[0][1], disable=not d.master, leave=False):
            try:
                batch_w = next(weak_iter)
            except StopIteration:
                weak_iter = iter(loaders[1][1])
                batch_w = next(weak_iter)
            for g in opt.param_groups:
                g["lr"] = sched[step].item()
            torch.manual_seed(c.seed * 1_000_003 + step * 1024 + d.rank)
            xs, ns_tok, ys, tss, tws = inputs(batch_s)
            xw, nw_tok, yw, tsw, tww = inputs(batch_w)
            ns = xs.shape[0]
            with d.ctx:
                s, w = ddp(torch.cat([xs, xw]), torch.cat([ns_tok, nw_tok]), features)
            loss = F.binary_cross_entropy(s[:ns].float(), ys) + \
                F.binary_cross_entropy(w[ns:].float(), yw)
            if teacher is not None:
                ts, tw = torch.cat([tss, tsw]), torch.cat([tws, tww])
                loss = loss + c.kd_weight * (F.binary_cross_entropy(s.float(), ts.float()) +
                                             F.binary_cross_entropy(w.float(), tw.float())) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            loss_val = loss.item()
            if not math.isfinite(loss_val):
                raise SystemExit(f"non-finite loss ({loss_val}) at epoch {epoch}: stopping")
            opt.step()
            loss_sum += loss_val
            step += 1
        scores = predict_scores(model, os.path.join(root, "audio", "train_strong"), s_valid, c, d,
                                v_cache)
        v = evaluate(scores, s_valid, classes, valid_gt, valid_dur, windows, c, quick=True) \
            if d.master else {}
        if d.world > 1:
            box = [v]
            dist.broadcast_object_list(box)
            v = box[0]
        # model selection: intersection F1 on the held-out strong clips (the DCASE 2022
        # baseline's synthetic-validation objective); PSDS1 of a few clips is mostly 0 early on
        obj = v["f1_intersection"] + 1e-3 * v["psds1_exact"]
        if obj > best["obj"]:
            best = dict(obj=obj, epoch=epoch + 1)
            if d.master:
                save_atomic(dict(kind="atst-sed", model=model.export(), classes=classes,
                                 encoder_args=ae.encoder.args, median_windows=windows,
                                 config=cfg, pretrained=c.ckpt, epoch=epoch + 1), best_path)
        log(dict(epoch=epoch + 1, loss=loss_sum / per_epoch, valid=v), f"epoch {epoch + 1}/"
            f"{c.epochs} | loss {loss_sum / per_epoch:.4f} | valid F1 {v['f1_intersection']:.3f} "
            f"PSDS1 {v['psds1_exact']:.3f} | best epoch {best['epoch']} | "
            f"{time.time() - t_ep:.0f}s")
    if d.world > 1:
        dist.barrier()
    model.load_export(load_checkpoint(best_path)["model"])
    files = sorted(test)
    scores = predict_scores(model, os.path.join(root, "audio", "test"), files, c, d)
    if d.master:
        res = evaluate(scores, files, classes, os.path.join(root, "test.tsv"),
                       os.path.join(root, "test_durations.tsv"), windows, c, plot_dir=out_dir)
        res.update(stage="sed", dataset=c.data, checkpoint=c.ckpt, kind=ae.kind, mode=c.mode,
                   classes=classes,
                   teacher=c.teacher or None, best_epoch=best["epoch"], lr=c.lr, seed=c.seed,
                   elapsed_s=round(time.time() - t0, 1), config=cfg)
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        d.print(f"sed {c.data} | ATST-{ae.kind} {c.mode}{' + teacher' if c.teacher else ''} | "
                f"PSDS1 {res['psds1']:.3f} PSDS2 {res['psds2']:.3f} (psds_eval, "
                f"{res['psds_eval_s']:.1f}s) | exact {res['psds1_exact']:.3f} / "
                f"{res['psds2_exact']:.3f} ({res['sed_scores_eval_s']:.1f}s) | F1 "
                f"{res['f1_intersection']:.3f} | {out_dir}")
    cleanup_distributed()


def detect(c):
    """--predict: events (filename, onset, offset, event_label) in files of any length and
    sample rate, with the SED checkpoint's classes and median windows."""
    model = load_classifier(c.ckpt, "cuda" if torch.cuda.is_available() and c.device != "cpu"
                            else "cpu", expect=["atst-sed"])
    ck = load_checkpoint(c.ckpt)
    windows = ck.get("median_windows") or [c.median_window] * len(model.classes)
    paths = []
    for p in c.predict.split(","):
        paths += sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                        if f.lower().endswith(AUDIO_EXTS)) if os.path.isdir(p) else [p]
    rows = []
    for path in paths:
        wav, n = load_audio(path, where="--predict")
        audio, lengths = model.ae.prepare(wav)
        with torch.no_grad():
            s, _ = model(model.ae.front(audio, lengths), tokens_for(lengths))
        s = median_filter(s.float().cpu().numpy(), windows)[0]
        dur = n / 16000
        for a, b, label in decode_strong(s > c.threshold, model.classes):
            rows.append((os.path.basename(path), min(a, dur), min(b, dur), label))
    text = "filename\tonset\toffset\tevent_label\n" + "".join(
        f"{f}\t{a:.3f}\t{b:.3f}\t{l}\n" for f, a, b, l in rows)
    if c.out:
        with open(c.out, "w") as f:
            f.write(text)
        print(f"{len(rows)} events in {len(paths)} files -> {c.out}")
    else:
        print(text, end="")
    return rows


if __name__ == "__main__":
    cfg = configure(globals(), TASKS, key="data")
    if cfg["predict"]:
        detect(SimpleNamespace(**cfg))
    else:
        if not cfg["ckpt"]:
            raise SystemExit("sed.py needs --ckpt (a pre-trained checkpoint)")
        train(cfg)
