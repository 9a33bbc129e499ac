"""
The built-in demo data (like nanoGPT's data/*/prepare.py): real 16-bit WAV files of synthetic
scenes, generated once and deterministically, so that every stage runs and is tested end to end
without a download (README "Demo data").

    python demo.py [--data_root DIR] [--force]      # ~350 MB under DIR/demo, ~30 s on 2 cores

- `demo`: a 256-clip unlabeled corpus of 10 s scenes (pre-training);
- `demo_events`: 8-class single-label clips of 1-4 s (train / valid / test; the test split is
  22.05 kHz stereo so that resampling and down-mixing are exercised);
- `demo_tags`: multi-label 6 s scenes tagged with the classes present;
- `demo_sed`: a SED task in the DESED TSV layout (strong train, weak train, strong test).
"""
import argparse
import fcntl
import os
import time

import numpy as np
import soundfile as sf
import torch
import torchaudio

from model import SAMPLE_RATE
from plumbing import default_data_root, write_table

# Deterministic synthetic sounds whose classes differ in spectro-temporal structure
# (pitch contour, modulation, envelope, bandwidth), never in loudness alone: every event and
# background gets a random gain, and pitch / band / rate are drawn per event.

DEMO_VERSION = 2
EVENTS = ("tone", "vibrato", "chirp_up", "chirp_down", "pluck", "clicks", "band_noise",
          "tremolo_noise")


def _bandpass(x, sr, lo, hi):
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, len(x))


def synth_event(kind, dur, rng, sr=SAMPLE_RATE):
    """One event of class `kind`, `dur` seconds, peak-normalised."""
    n = int(dur * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(150, 700)
    harm = lambda phase: sum(np.sin(k * phase) / k for k in range(1, 5))
    if kind == "tone":
        x = harm(2 * np.pi * f0 * t)
    elif kind == "vibrato":
        rate, depth = rng.uniform(5, 8), rng.uniform(0.04, 0.08)
        x = harm(2 * np.pi * f0 * t - depth * f0 / rate * np.cos(2 * np.pi * rate * t))
    elif kind in ("chirp_up", "chirp_down"):
        a, b = rng.uniform(200, 500), rng.uniform(2000, 4000)
        if kind == "chirp_down":
            a, b = b, a
        k = np.log(b / a) / max(dur, 1e-3)
        x = np.sin(2 * np.pi * a * (np.exp(k * t) - 1) / k)
    elif kind == "pluck":
        x = np.zeros(n)
        period = rng.uniform(0.15, 0.35)
        for s in np.arange(0, dur, period):
            m = t >= s
            x[m] += harm(2 * np.pi * f0 * (t[m] - s)) * np.exp(-(t[m] - s) * rng.uniform(15, 30))
    elif kind == "clicks":
        x = np.zeros(n)
        rate = rng.uniform(6, 14)
        for s in np.arange(rng.uniform(0, 1 / rate), dur, 1 / rate):
            i = int(s * sr)
            c = rng.standard_normal(min(80, n - i)) * np.exp(-np.arange(min(80, n - i)) / 15)
            x[i:i + len(c)] += c
    elif kind == "band_noise":
        c = rng.uniform(800, 4000)
        x = _bandpass(rng.standard_normal(n), sr, c / 1.3, c * 1.3)
    elif kind == "tremolo_noise":
        rate = rng.uniform(2, 4)
        x = rng.standard_normal(n) * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t)) ** 2
        x = _bandpass(x, sr, 100, 6000)
    else:
        raise ValueError(kind)
    ramp = np.minimum(1, np.minimum(t, dur - t) / 0.01)  # 10 ms fades: no clicks at the edges
    x = x * ramp
    return x / (np.abs(x).max() + 1e-9)


def _background(n, rng):
    """Pink-ish noise at a random level (about 25-45 dB below the events)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9) * 10 ** (rng.uniform(-45, -25) / 20)


def synth_scene(dur, n_events, rng, classes=EVENTS, min_len=0.4, max_len=3.0):
    """A `dur`-second scene: background + events at random times. Returns (audio, events)."""
    n = int(dur * SAMPLE_RATE)
    x = _background(n, rng)
    events = []
    # distinct classes per scene: same-class events never overlap (psds_eval rejects that)
    for k in rng.choice(len(classes), min(n_events, len(classes)), replace=False):
        kind = classes[k]
        length = min(rng.uniform(min_len, max_len), dur)
        onset = rng.uniform(0, dur - length)
        e = synth_event(kind, length, rng) * 10 ** (rng.uniform(-20, 0) / 20)
        i = int(onset * SAMPLE_RATE)
        x[i:i + len(e)] += e[:n - i]
        events.append((round(onset, 3), round(onset + length, 3), kind))
    return x / max(1.0, np.abs(x).max() / 0.99), events


def _write(path, x, sr=SAMPLE_RATE):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")


def make_demo(root=None, force=False):
    """Generate the demo data under ROOT/demo once (a lock makes concurrent ranks wait)."""
    root = root or default_data_root()
    out = os.path.join(root, "demo")
    stamp = os.path.join(out, "VERSION")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".demo.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and os.path.isfile(stamp) and open(stamp).read().strip() == str(DEMO_VERSION):
            return out
        t0 = time.time()
        print(f"writing the demo data to {out} (once; about a minute on 2 cores) ...",
              flush=True)
        _make_demo(out)
        with open(stamp, "w") as f:
            f.write(f"{DEMO_VERSION}\n")
        print(f"demo data written to {out} in {time.time() - t0:.1f}s", flush=True)
    return out


def _make_demo(out):
    rng = np.random.default_rng(1234)
    # unlabeled pre-training corpus: 10 s scenes with 2-6 events
    rows = []
    for i in range(256):
        x, _ = synth_scene(10.0, int(rng.integers(2, 7)), rng)
        _write(os.path.join(out, "pretrain", "audio", f"{i:04d}.wav"), x)
        rows.append([f"audio/{i:04d}.wav"])
    write_table(os.path.join(out, "pretrain", "train.csv"), ["path"], rows)
    # single-label task: one event of 1-4 s per clip; the test split is 22.05 kHz stereo so
    # that the resampling and down-mixing path is exercised
    for split, n in (("train", 320), ("valid", 80), ("test", 160)):
        rows = []
        for i in range(n):
            kind = EVENTS[i % len(EVENTS)]
            dur = rng.uniform(1.0, 4.0)
            x = _background(int(dur * SAMPLE_RATE), rng)
            x += synth_event(kind, dur, rng) * 10 ** (rng.uniform(-20, 0) / 20)
            name = f"audio/{split}_{i:04d}.wav"
            if split == "test":
                x = torchaudio.functional.resample(torch.from_numpy(x).float(), SAMPLE_RATE,
                                                   22050).numpy()
                x = np.stack([x, 0.8 * x], 1)
                _write(os.path.join(out, "events", name), x, 22050)
            else:
                _write(os.path.join(out, "events", name), x)
            rows.append([name, kind])
        write_table(os.path.join(out, "events", f"{split}.csv"), ["path", "label"], rows)
    # multi-label task: 6 s scenes with 1-3 events, tagged with the classes present
    for split, n in (("train", 240), ("valid", 60), ("test", 120)):
        rows = []
        for i in range(n):
            x, ev = synth_scene(6.0, int(rng.integers(1, 4)), rng)
            name = f"audio/{split}_{i:04d}.wav"
            _write(os.path.join(out, "tags", name), x)
            rows.append([name, ";".join(sorted({e[2] for e in ev}))])
        write_table(os.path.join(out, "tags", f"{split}.csv"), ["path", "labels"], rows)
    # SED task in the DESED layout: strong train, weak train, strong test with durations
    sed = os.path.join(out, "sed")
    for split, n in (("train_strong", 200), ("train_weak", 100), ("test", 100)):
        strong, weak, durs = [], [], []
        for i in range(n):
            x, ev = synth_scene(10.0, int(rng.integers(1, 4)), rng, min_len=0.3, max_len=4.0)
            name = f"{split}_{i:04d}.wav"
            _write(os.path.join(sed, "audio", split, name), x)
            strong += [[name, f"{a:.3f}", f"{b:.3f}", k] for a, b, k in ev]
            weak.append([name, ",".join(sorted({e[2] for e in ev}))])
            durs.append([name, "10.000"])
        if split == "train_weak":
            write_table(os.path.join(sed, f"{split}.tsv"), ["filename", "event_labels"], weak)
        else:
            write_table(os.path.join(sed, f"{split}.tsv"),
                       ["filename", "onset", "offset", "event_label"], strong)
        if split == "test":
            write_table(os.path.join(sed, "test_durations.tsv"), ["filename", "duration"], durs)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="generate the demo data")
    p.add_argument("--data_root", default=default_data_root())
    p.add_argument("--force", action="store_true", help="write it again")
    a = p.parse_args()
    print(make_demo(a.data_root, a.force))
