"""metrics.py: collapse monitor, accuracy / mAP, median filter, frames <-> events, PSDS."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import desed as DS
import metrics

def test_strong_labels_round_trip_within_one_frame():
    """desed.encode_strong (events -> 40 ms frames) and metrics.detections (frames -> events)
    invert each other to within one frame."""
    classes = ["a", "b"]
    events = [(0.013, 1.5, "a"), (2.0, 2.05, "b"), (2.5, 4.0, "a"), (9.97, 10.0, "b")]
    y = DS.encode_strong(events, classes, 250)
    assert y.shape == (250, 2) and y[0, 0] == 1 and y[37, 0] == 1 and y[38, 0] == 0
    det = metrics.detections(y.numpy()[None], ["f.wav"], classes, [0.5], 0.04)[0.5]
    back = list(det[["onset", "offset", "event_label"]].itertuples(index=False))
    assert len(back) == len(events) and set(det["filename"]) == {"f.wav"}
    for (a, b, l), (a2, b2, l2) in zip(sorted(events), sorted(back)):
        assert l == l2 and abs(a - a2) <= 0.04 and abs(b - b2) <= 0.04


def test_median_filter_on_a_known_sequence():
    x = np.array([0, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=np.float32)
    y = metrics.median_filter(x[None, :, None], [3])[0, :, 0]
    # window 3, edges repeated: isolated spikes vanish, a one-frame gap closes
    assert y.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    z = metrics.median_filter(np.stack([x, x], -1)[None], [1, 5])[0]
    assert z[:, 0].tolist() == x.tolist() and z[:, 1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]


def _gt_files(tmp_path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    classes = ["alarm", "dog", "speech"]
    files = [f"c{i:03d}.wav" for i in range(n)]
    gt, scores = [], np.zeros((n, 250, 3), np.float32)
    for i, f in enumerate(files):
        for k in rng.choice(3, 2, replace=False):
            a = float(rng.uniform(0, 7))
            b = a + float(rng.uniform(0.5, 2.5))
            gt.append((f, round(a, 3), round(b, 3), classes[k]))
            scores[i, int(a / 0.04):int(np.ceil(b / 0.04)), k] = 1
    with open(tmp_path / "gt.tsv", "w") as g:
        g.write("filename\tonset\toffset\tevent_label\n")
        g.writelines(f"{f}\t{a}\t{b}\t{l}\n" for f, a, b, l in gt)
    with open(tmp_path / "dur.tsv", "w") as g:
        g.write("filename\tduration\n")
        g.writelines(f"{f}\t10.0\n" for f in files)
    return files, classes, scores


def test_psds_perfect_zero_and_realistic_agree(tmp_path):
    """Perfect scores give PSDS1 = PSDS2 = 1 and all-zero scores 0, with psds_eval and with
    sed_scores_eval; on a realistic prediction (shifted boundaries, false alarms, misses)
    the two libraries agree within 0.02."""
    files, classes, perfect = _gt_files(tmp_path)
    args = (files, classes, str(tmp_path / "gt.tsv"), str(tmp_path / "dur.tsv"), [7] * 3, 0.04)
    r = metrics.evaluate_sed(perfect, *args, plot_dir=str(tmp_path))[0]
    for k in ("psds1", "psds2", "psds1_exact", "psds2_exact", "f1_intersection"):
        assert r[k] > 0.999, (k, r)
    assert os.path.getsize(tmp_path / "psd_roc_psds2.png") > 1000
    r = metrics.evaluate_sed(np.zeros_like(perfect), *args)[0]
    assert max(r[k] for k in ("psds1", "psds2", "psds1_exact", "psds2_exact")) == 0
    assert r["f1_intersection"] == 0  # no detection at all: 0, not nan
    one = perfect.copy()
    one[..., 1:] = 0  # only class 0 detected: F1 1 for it, 0 for the other two (not dropped)
    assert abs(metrics.evaluate_sed(one, *args)[0]["f1_intersection"] - 1 / 3) < 1e-6
    rng = np.random.default_rng(1)
    real = np.zeros_like(perfect)
    for i in range(len(files)):  # shifted boundaries, weaker or missed events, false alarms
        real[i] = np.roll(perfect[i], int(rng.integers(-12, 13)), axis=0) * \
            rng.uniform(0.1, 1.0, (1, 3))
        for _ in range(int(rng.integers(0, 3))):
            a = int(rng.integers(0, 230))
            real[i, a:a + int(rng.integers(8, 20)), rng.integers(3)] += rng.uniform(0.3, 0.9)
    real = np.clip(real + rng.normal(0, 0.05, real.shape), 0, 1).astype(np.float32)
    r, det = metrics.evaluate_sed(real, *args)
    assert set(det.columns) == {"filename", "onset", "offset", "event_label"} and len(det) > 0
    assert 0.05 < r["psds1"] < 0.98 and 0.05 < r["psds2"] < 0.999
    assert abs(r["psds1"] - r["psds1_exact"]) < 0.02 and abs(r["psds2"] - r["psds2_exact"]) < 0.02


def test_detections_at_several_thresholds_in_one_pass():
    s = np.zeros((2, 10, 2), np.float32)
    s[0, 2:5, 0] = 0.6
    s[0, 3, 0] = 0.9          # above 0.8 only at frame 3
    s[1, 7:, 1] = 0.7         # runs to the end of the clip
    d = metrics.detections(s, ["a", "b"], ["x", "y"], [0.5, 0.8], 0.25)  # 0.25 s: exact
    assert d[0.5].values.tolist() == [["a", 0.5, 1.25, "x"], ["b", 1.75, 2.5, "y"]]
    assert d[0.8].values.tolist() == [["a", 0.75, 1.0, "x"]]


def test_collapse_std_and_scores():
    torch.manual_seed(0)
    spread = F.normalize(torch.randn(20000, 256), dim=-1)
    assert abs(metrics.collapse_std(spread) - 1 / 16) < 0.002   # 1/sqrt(256) on the sphere
    assert metrics.collapse_std(spread[:1].expand(100, -1)) < 1e-6
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert metrics.score(logits, torch.tensor([0, 1, 1]), False) == pytest.approx(2 / 3)
    y = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])        # class 2 has no positive
    # class 0: scores 3 (pos) > 1 (pos) > 0 -> AP 1; class 1: its one positive ranks last of
    # three -> AP 1/3; class 2 has no positive and is left out of the mean
    s = torch.tensor([[3.0, 0.2, 9], [0.0, 0.1, 9], [1.0, 0.3, 9]])
    assert metrics.score(s, y, True) == pytest.approx((1 + 1 / 3) / 2)
