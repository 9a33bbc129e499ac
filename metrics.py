"""
Metrics every stage and the tests share: accuracy / mAP, the collapse monitor of pre-training,
and sound event detection: median filtering, frame scores -> events, PSDS1 / PSDS2 through
psds_eval (the paper's 50 operating points) and sed_scores_eval (exact, threshold-free), the
intersection-based macro F1. Pure functions of arrays; no model, no file layout.
"""
import os
import time

import numpy as np
import torch

PSDS1 = dict(dtc_threshold=0.7, gtc_threshold=0.7, cttc_threshold=0.3, alpha_ct=0.0,
             alpha_st=1.0, max_efpr=100)
PSDS2 = dict(dtc_threshold=0.1, gtc_threshold=0.1, cttc_threshold=0.3, alpha_ct=0.5,
             alpha_st=1.0, max_efpr=100)


def score(logits, targets, multi):
    """Accuracy (single-label) or mAP: macro average precision over the classes that have
    positives, with scikit-learn's average_precision_score (multi-label)."""
    if not multi:
        return (logits.argmax(-1) == targets).float().mean().item()
    from sklearn.metrics import average_precision_score
    y = targets.cpu().numpy() > 0.5
    has = y.any(0)
    return float(average_precision_score(y[:, has], logits.float().cpu().numpy()[:, has],
                                         average="macro"))


def collapse_std(rows, world=1):
    """Per-dimension std over rows (all ranks) of L2-normalised outputs, averaged over dims.
    About 1/sqrt(dim) when rows spread over the sphere; toward 0 on collapse."""
    r = rows.double()
    stats = torch.cat([torch.tensor([r.shape[0]], dtype=torch.float64, device=r.device),
                       r.sum(0), (r * r).sum(0)])
    if world > 1:
        torch.distributed.all_reduce(stats)
    n, s, ss = stats[0], stats[1:1 + r.shape[1]], stats[1 + r.shape[1]:]
    var = (ss / n - (s / n) ** 2).clamp(min=0) * n / (n - 1).clamp(min=1)
    return var.sqrt().mean().item()

# ----------------------------------------------------------------------------------------------
# Sound event detection (R7)


def median_windows(spec, classes, default):
    """Median windows (frames) per class from "Speech:7,Dishes:3"; others take `default`."""
    w = {k: int(v) for k, v in (x.split(":") for x in spec.split(",") if x)}
    unknown = set(w) - set(classes)
    if unknown:
        raise ValueError(f"--class_windows names unknown classes {sorted(unknown)}")
    return [w.get(k, default) for k in classes]


def median_filter(scores, windows):
    """Centred running median over time of (N, T, C) scores, one window per class (odd);
    edges repeat the first / last frame."""
    out = np.empty_like(scores)
    for c, w in enumerate(windows):
        h = w // 2
        x = np.pad(scores[..., c], ((0, 0), (h, h)), mode="edge")
        out[..., c] = np.median(np.lib.stride_tricks.sliding_window_view(x, w, axis=1), -1)
    return out


def detections(scores, files, classes, thresholds, frame_s):
    """Events (DataFrames: filename, onset, offset, event_label; seconds) of (N, T, C) frame
    scores of `frame_s` seconds each, for every threshold, in one vectorised pass: a run of
    frames above the threshold is one event. {threshold: DataFrame}."""
    import pandas as pd
    act = scores[None] > np.asarray(thresholds, dtype=scores.dtype)[:, None, None, None]
    d = np.diff(np.pad(act, ((0, 0), (0, 0), (1, 1), (0, 0))).astype(np.int8), axis=2)
    d = d.transpose(0, 1, 3, 2)                                             # (K, N, C, T+1)
    k, n, c, on = np.nonzero(d == 1)                                        # sorted by k
    off = np.nonzero(d == -1)[3]                                            # same order
    files, classes = np.asarray(files), np.asarray(classes)
    cuts = np.searchsorted(k, np.arange(len(thresholds) + 1))
    return {t: pd.DataFrame(dict(filename=files[n[i:j]], onset=on[i:j] * frame_s,
                                 offset=off[i:j] * frame_s, event_label=classes[c[i:j]]))
            for t, i, j in zip(thresholds, cuts[:-1], cuts[1:])}


def _psds_eval_class():
    from psds_eval import PSDSEval

    class FastPSDSEval(PSDSEval):
        """psds_eval 0.5.3 without its self-overlap check on detection tables (half its time):
        `detections` builds them from runs of active frames, which never overlap within a
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


def evaluate_sed(scores, files, classes, gt_tsv, dur_tsv, windows, frame_s, n_thresholds=50,
                 threshold=0.5, plot_dir=None, title="", quick=False):
    """Median filter, then PSDS1/PSDS2 (psds_eval at n_thresholds operating points 0.01 ...
    0.99, and threshold-free through sed_scores_eval) and the intersection F1 at `threshold`.
    quick (validation): only the F1 and the exact PSDS1, over the classes the ground truth
    holds. plot_dir: PSD-ROC PNGs titled
    `title`. Returns (results, detections at `threshold`)."""
    import warnings
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from psds_eval import plot_psd_roc
    from sed_scores_eval import intersection_based, io
    warnings.filterwarnings("ignore", module="psds_eval")  # pandas deprecations inside it
    PSDSEval = _psds_eval_class()
    t0 = time.time()
    gt = pd.read_csv(gt_tsv, sep="\t").dropna()
    meta = pd.read_csv(dur_tsv, sep="\t")
    if quick:  # a few held-out clips may hold no event of a class: score the classes they hold
        present = set(gt["event_label"])
        keep = [i for i, k in enumerate(classes) if k in present]
        scores, classes, windows = scores[..., keep], [classes[i] for i in keep], \
            [windows[i] for i in keep]
    scores = median_filter(scores, windows)
    ths = [round(float(t), 4) for t in np.linspace(0.01, 0.99, n_thresholds)]
    dets = detections(scores, files, classes, ths + [threshold], frame_s)
    tables = [dets[t] for t in ths]
    workers = min(8, os.cpu_count() or 1)
    res = {}
    for name, p in () if quick else (("psds1", PSDS1), ("psds2", PSDS2)):
        ev = PSDSEval(p["dtc_threshold"], p["gtc_threshold"], p["cttc_threshold"],
                      ground_truth=gt, metadata=meta)
        psds_operating_points(ev, tables, workers)
        psds = ev.psds(p["alpha_ct"], p["alpha_st"], p["max_efpr"])
        res[name] = float(psds.value)
        if plot_dir:
            fig, ax = plt.subplots(figsize=(7, 7))
            plot_psd_roc(psds, axes=ax)
            fig.suptitle(f"{title} {name.upper()}".strip())
            fig.savefig(os.path.join(plot_dir, f"psd_roc_{name}.png"))
            plt.close(fig)
    ev = PSDSEval(0.5, 0.5, 0.3, ground_truth=gt, metadata=meta)
    res["f1_intersection"] = macro_f1(ev, dets[threshold], gt)
    res["psds_eval_s"] = round(time.time() - t0, 2)
    t1 = time.time()
    stamps = np.arange(scores.shape[1] + 1) * frame_s
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
    return res, dets[threshold]
