"""
Collect run_all.sh's result files into markdown tables shaped like the paper's Tables II-VI
(same rows and columns, plus ASiT rows beside ATST-Clip and ATST-Frame in Tables IV-VI; each
cell "ours (paper)", `-` where not run; demo tasks as extra columns), a note of the scale of
every run, the checks the demo is meant to show, and PNG plots (pre-training loss and collapse
std per run; the PSD-ROC curves sed.py saved).

    python tables.py --out results          # -> results/tables.md, results/plots/*.png
"""
import argparse
import json
import math
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from model import KINDS as MODEL_KINDS  # noqa: E402
from plumbing import save_text  # noqa: E402

# the paper's numbers for our methods (Tables II-VI)
T2_COLS = ["as20k", "spcv2", "vox1", "nsynth", "us8k"]
T2 = {"clip_single_1s": [21.0, 94.3, 52.3, 73.8, 79.3],
      "clip_two_1s": [19.1, 91.3, 50.0, 74.3, 76.6],
      "clip_single_6s": [25.7, 94.0, 57.3, 73.8, 80.9],
      "clip_two_6s": [27.9, 93.6, 61.9, 75.3, 82.0]}
T2_ROWS = {"clip_single_1s": "single | 1", "clip_two_1s": "two | 1",
           "clip_single_6s": "single | 6", "clip_two_6s": "two | 6"}
T3 = {"frame_A": [8.0, 63.3, 25.8, 56.8, 60.1], "frame_B": [18.0, 85.2, 43.7, 69.9, 76.1],
      "frame_C": [22.5, 88.2, 47.0, 72.9, 72.9], "frame_D": [28.1, 92.3, 67.0, 72.5, 84.0],
      "frame_E": [28.5, 92.5, 59.6, 74.7, 83.4]}
T3_ROWS = {"frame_A": "A | 0 | | ✓ | group", "frame_B": "B | 1 | | ✓ | random",
           "frame_C": "C | 1 | ✓ | ✓ | group", "frame_D": "D | 1 | | ✓ | group",
           "frame_E": "E | 2 | | ✓ | group"}
T4_COLS = ["as20k", "spcv2", "vox1", "nsynth", "us8k", "fsd50k"]
T4 = {"clip": [33.8, 95.1, 72.0, 76.2, 85.8, 58.5], "frame": [33.0, 94.9, 77.4, 75.9, 85.8, 55.1]}
KINDS = {k: row.name for k, row in MODEL_KINDS.items()}  # in the tables' row order
T4_ROWS = {**KINDS, **{f"{k}_random": f"{v}, random weights" for k, v in KINDS.items()},
           "asit_concat": "ASiT, band tokens concatenated",  # runtime FRAME_POOLS
           "asit_random_concat": "ASiT, random weights, band tokens concatenated"}
T5_COLS = ["as2m", "as20k", "spcv2", "vox1", "fsd50k"]
T5 = {"clip": [45.2, 37.9, 98.0, 95.5, 63.4], "frame": [48.0, 39.0, 98.1, 97.3, 61.8],
      "c2f": [49.7, 40.5, 98.4, 97.5, 65.5], "f2c": [46.8, 39.0, 98.1, 95.5, 64.6],
      "asit": [None, 35.2, 98.8, 63.1, None]}  # ASiT: as the ATST paper's Table V quotes it
T5_ROWS = {"clip": KINDS["clip"], "frame": KINDS["frame"], "c2f": "ATST-C2F", "f2c": "ATST-F2C",
           "asit": KINDS["asit"]}
T6 = {"clip_linear": [0.115, 0.293], "frame_linear": [0.304, 0.507],
      "clip_finetune": [0.223, 0.422], "frame_finetune": [0.361, 0.581],
      "c2f": [0.357, 0.607], "f2c": [0.259, 0.445]}
T6_ROWS = {**{f"{k}_linear": f"Linear | {v}" for k, v in KINDS.items()},
           **{f"{k}_finetune": f"Finetuning | {v}" for k, v in KINDS.items()},
           "c2f": "Finetuning | ATST-C2F", "f2c": "Finetuning | ATST-F2C",
           "asit_linear_concat": "Linear | ASiT, band tokens concatenated"}
# output frame of each row: its kind's (the distilled rows are ATST students: 40 ms)
RESOLUTION = {name: f"{MODEL_KINDS[name.split('_')[0]].unit * 10} ms"
              for name in T6_ROWS if name.split("_")[0] in MODEL_KINDS}
METRIC = {"as20k": "mAP", "as2m": "mAP", "fsd50k": "mAP", "demo_tags": "mAP"}
NAMES = {"as20k": "AS-20K", "as2m": "AS-2M", "spcv2": "SPCV2", "vox1": "VOX1", "nsynth": "NSYNTH",
         "us8k": "US8K", "fsd50k": "FSD50K", "as1.9m": "AS-1.9M", "as200k": "AS-200K",
         "dcase2022": "DESED"}
EXTRA_NAMES = {"esc50": "ESC-50"}  # real datasets outside the paper's tables (columns after it)


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def linear_result(out, name, task):
    return load(os.path.join(out, "linear", f"{name}_{task}.json"))


def finetune_result(out, name, task):
    return load(os.path.join(out, "finetune", f"{name}_{task}", "result.json"))


def linear_score(out, name, task):
    r = linear_result(out, name, task)
    return None if r is None else 100 * r["test"]


def fmt(x, paper=None, digits=1, note=""):
    ours = "-" if x is None else f"{x:.{digits}f}"
    return (ours if paper is None else f"{ours} ({paper:.{digits}f})") + note


def copy_note(rec, notes):
    """' [^key]': a footnote naming the dataset copy a result was measured on (prepare.py's
    info.json, which every stage records), its text kept in `notes`; '' for data prepare.py did
    not write (the demo)."""
    cp = (rec or {}).get("dataset_copy")
    if not cp:
        return ""
    key = re.sub(r"[^A-Za-z0-9]+", "-", f"{cp['dataset']}-{cp['fingerprint'][:8]}")
    name = {**NAMES, **EXTRA_NAMES}.get(cp["dataset"], cp["dataset"])
    notes[key] = (f"{name}, copy {cp['fingerprint']}: " +
                  ", ".join(f"{split} {v['found']:,} / {v['listed']:,} clips"
                            for split, v in cp["splits"].items()) +
                  f" (found / listed by the official metadata; prepared "
                  f"{str(cp.get('prepared'))[:10]} from {cp.get('source')})")
    return f" [^{key}]"


def extra_tasks(out, names, get):
    """Tasks outside the paper's columns (the demo ones, ESC-50) with at least one result."""
    found = set()
    for sub in ("linear", "finetune"):
        folder = os.path.join(out, sub)
        for f in os.listdir(folder) if os.path.isdir(folder) else []:
            for n in names:
                if f.startswith(n + "_"):
                    found.add(f[len(n) + 1:].removesuffix(".json"))
    return sorted(t for t in found if (t.startswith("demo") or t in EXTRA_NAMES) and
                  any(get(out, n, t) is not None for n in names))


def mean(xs):
    return None if any(x is None for x in xs) else sum(xs) / len(xs)


def table(out, title, head, rows, paper, cols, get, notes, avg_from=None, digits=1):
    """One markdown table: row labels, the paper's columns as 'ours (paper)' with a footnote
    naming the dataset copy, an optional average (over cols[avg_from:]), then columns outside
    the paper (demo tasks, ESC-50; ours only). get(out, name, task) -> a result record."""
    extra = extra_tasks(out, list(rows), get)
    score = lambda r: None if r is None else 100 * r["test"]
    hdr = [f"{NAMES[c]} {METRIC.get(c, 'Acc')} (%)" for c in cols]
    if avg_from is not None:
        hdr.append("Average")
    hdr += [f"{EXTRA_NAMES.get(t, t)} {METRIC.get(t, 'Acc')} (%)" for t in extra]
    lines = [f"### {title}", "", f"| {head} | " + " | ".join(hdr) + " |",
             "|" + "---|" * (len(head.split("|")) + len(hdr))]
    for name, label in rows.items():
        recs = [get(out, name, c) for c in cols]
        ours = [score(r) for r in recs]
        ref = paper.get(name) or [None] * len(cols)
        cells = [fmt(o, p, digits, copy_note(r, notes)) for o, p, r in zip(ours, ref, recs)]
        if avg_from is not None:
            pa = mean(ref[avg_from:]) if name in paper else None  # None when one is missing
            cells.append(fmt(mean(ours[avg_from:]), pa, digits))
        for t in extra:
            r = get(out, name, t)
            cells.append(fmt(score(r), None, digits, copy_note(r, notes)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def sed_table(out, notes):
    """Table VI: the paper's DESED columns hold ours only for runs on DESED (dcase2022); every
    run's own numbers, on whatever data it ran, follow in columns of their own."""
    lines = ["### Table VI: DCASE task 4 SED, PSDS (psds_eval, 50 thresholds). DESED columns: "
             "ours (paper) for runs on DESED; then each run's own numbers on its data (exact "
             "PSDS through sed_scores_eval, intersection F1 at 0.5)", "",
             "| Setting | Method | resolution | DESED PSDS1 | DESED PSDS2 | data | PSDS1 | PSDS2 "
             "| PSDS1 exact | PSDS2 exact | F1 | PSD-ROC |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in T6_ROWS.items():
        r = load(os.path.join(out, "sed", name, "result.json")) or {}
        desed = r.get("dataset") == "dcase2022"
        p1, p2 = T6.get(name, (None, None))
        roc = os.path.join("sed", name, "psd_roc_psds1.png")
        link = f"[PSDS1]({roc}), [PSDS2]({roc.replace('psds1', 'psds2')})" \
            if os.path.exists(os.path.join(out, roc)) else "-"
        note = copy_note(r, notes) if desed else ""
        cells = [fmt(r.get("psds1") if desed else None, p1, 3, note),
                 fmt(r.get("psds2") if desed else None, p2, 3, note), r.get("dataset", "-")] + [
            fmt(r.get(k), None, 3) for k in ("psds1", "psds2", "psds1_exact", "psds2_exact",
                                             "f1_intersection")]
        lines.append(f"| {label} | {RESOLUTION.get(name, '40 ms')} | " + " | ".join(cells) +
                     f" | {link} |")
    return lines + [""]


def read_log(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(out, names, path, title):
    """Loss and teacher/student collapse std against step, one line per run."""
    logs = {n: read_log(os.path.join(out, "pretrain", n)) for n in names}
    logs = {n: recs for n, recs in logs.items() if recs}
    if not logs:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, recs in logs.items():
        steps = [r["step"] for r in recs]
        ax[0].plot(steps, [r["loss"] for r in recs], label=n)
        line = ax[1].plot(steps, [r["std_t"] for r in recs], label=f"{n} teacher")[0]
        if "std_s" in recs[0]:
            ax[1].plot(steps, [r["std_s"] for r in recs], ls="--", color=line.get_color(),
                       label=f"{n} student")
    s = load(os.path.join(out, "pretrain", next(iter(logs)), "ckpt.pt.json"))
    dim = s and (s["model_args"].get("proj_dim") or s["model_args"].get("bottleneck"))
    if dim:  # the std of unit vectors spread over d dimensions
        ax[1].axhline(dim ** -0.5, color="grey", ls=":", label="1/sqrt(d): no collapse")
    ax[0].set(xlabel="step", ylabel="loss", title=f"{title}: loss")
    ax[1].set(xlabel="step", ylabel="std of normalised outputs", title=f"{title}: collapse",
              ylim=(0, None))
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_note(out, notes):
    lines = ["| Run | preset | data | steps | batch | precision | final loss | min teacher std |",
             "|---|---|---|---|---|---|---|---|"]
    pre, said, flat = os.path.join(out, "pretrain"), [], 0
    for n in sorted(os.listdir(pre)) if os.path.isdir(pre) else []:
        s = load(os.path.join(pre, n, "ckpt.pt.json"))
        recs = read_log(os.path.join(pre, n))
        if not s:
            continue
        c = s["config"]
        if recs and "loss_r" in recs[0]:  # ASiT: which of its terms moved, and how
            flat += recs[-1]["loss"] > recs[0]["loss"]
            said.append(f"{n} ({c['preset']}, {s['step']} steps): total loss "
                        f"{recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}, reconstruction loss "
                        f"{recs[0]['loss_r']:.3f} -> {recs[-1]['loss_r']:.3f} (lowest "
                        f"{min(r['loss_r'] for r in recs):.3f}), global teacher entropy "
                        f"{recs[0]['ent_g']:.2f} -> {recs[-1]['ent_g']:.2f}, teacher std "
                        f"lowest {min(r['std_t'] for r in recs):.3f}.")
        last = f"{recs[-1]['loss']:.3f}" if recs else "-"
        std = f"{min(r['std_t'] for r in recs):.3f}" if recs else "-"
        alias = f" (= {os.readlink(os.path.join(pre, n))})" if os.path.islink(
            os.path.join(pre, n)) else ""
        lines.append(f"| {n}{alias} | {c['preset']} | {c['data']}{copy_note(s, notes)} | "
                     f"{s['step']}/{s['total']} | {c['batch_size']} | "
                     f"{s.get('precision', '-')} | {last} | {std} |")
    if said:
        lines += ["", "ASiT " + " ".join(said) + (
            " A total loss that rises while the teacher's entropy nears its maximum (the log of "
            "the global head's output count) and its std falls under the no-collapse line is "
            "ASiT's global and local heads going flat, which the authors' code does too at a "
            "small scale (tiny models, a few hundred steps); the reconstruction loss is the "
            "term to watch there, and such a run says nothing of ASiT at the paper's scale."
            if flat else "")]
    return lines + [""]


def lead(d, digits):
    """'ahead by x', 'behind by x' or 'level' for a difference d."""
    return "level" if d == 0 else f"{'ahead' if d > 0 else 'behind'} by {abs(d):.{digits}f}"


def compare(a, b, ra):
    """'ahead / behind by x points' and whether that is beyond the noise of the test set: the
    standard error of a difference of two accuracies on n clips (independent binomials, a
    conservative bound for paired runs); no standard error for mAP or PSDS (one seed)."""
    d = a - b
    words = lead(d, 1) + ("" if d == 0 else " points")
    n = (ra.get("n") or [None])[-1]
    if ra.get("metric") != "accuracy" or not n:
        return f"{words} (one seed; no standard error for {ra.get('metric', 'this metric')})"
    pa, pb = a / 100, b / 100
    se = 100 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n)
    return (f"{words}, standard error of the difference {se:.1f} on {n} test clips: "
            f"{'beyond' if abs(d) > 2 * se else 'within'} noise")


def checks(out):
    """The comparisons the demo should show, stated from the numbers (not assumed), with the
    test-set size and, where there is one, a standard error."""
    lines = []
    tasks = extra_tasks(out, ["clip", "frame", "clip_random", "frame_random"], linear_score) + \
        [t for t in T4_COLS if linear_score(out, "frame", t) is not None]
    for t in tasks:
        for k in KINDS:
            a, b = linear_score(out, k, t), linear_score(out, f"{k}_random", t)
            if a is not None and b is not None:
                ra = load(os.path.join(out, "linear", f"{k}_{t}.json"))
                lines.append(f"- Linear evaluation, {t}: pre-trained {KINDS[k]} "
                             f"{a:.1f} vs the same encoder with random weights {b:.1f}: "
                             f"{compare(a, b, ra)}.")
    for t in tasks:  # ASiT's frames: its 8 band tokens averaged (default) or side by side
        for k in ("asit", "asit_random"):
            a, b = linear_score(out, f"{k}_concat", t), linear_score(out, k, t)
            if a is not None and b is not None:
                ra = load(os.path.join(out, "linear", f"{k}_concat_{t}.json"))
                lines.append(f"- Linear evaluation, {t}: {T4_ROWS[k]} with band tokens "
                             f"concatenated {a:.1f} vs averaged {b:.1f}: {compare(a, b, ra)}.")
    for mode in ("linear", "finetune"):
        f = load(os.path.join(out, "sed", f"frame_{mode}", "result.json")) or {}
        for other in ("clip", "asit"):
            c = load(os.path.join(out, "sed", f"{other}_{mode}", "result.json")) or {}
            if f.get("psds1") is not None and c.get("psds1") is not None:
                d = f["psds1"] - c["psds1"]
                lines.append(f"- SED ({mode}): ATST-Frame PSDS1 {f['psds1']:.3f} vs "
                             f"{KINDS[other]} {c['psds1']:.3f}: {lead(d, 3)} (one seed; no "
                             "standard error for PSDS).")
    return lines + [""] if lines else []


def main(out):
    notes = {}  # footnote key -> the dataset copy it names
    md = ["# ATST and ASiT reproduction: results", "",
          "Each cell: ours (paper). `-`: not run at this scale. Columns named demo_* are the "
          "built-in demo tasks (no paper value). A footnote names the copy of the dataset a "
          "number was measured on (clips found of those the official metadata lists). Written "
          f"by tables.py from the result files under `{out}/`.", "", "## Scale of the runs",
          ""] + scale_note(out, notes)
    md += ["## Checks", ""] + (checks(out) or ["(no comparable results yet)", ""])
    md += ["## Tables", ""]
    md += table(out, "Table II: ATST-Clip ablations (linear evaluation; Average over the last "
                "four paper tasks)", "Segments | length (s)", T2_ROWS, T2, T2_COLS,
                linear_result, notes, avg_from=1)
    md += table(out, "Table III: ATST-Frame ablations (linear evaluation)",
                "Config | augmented views | mask teacher | mask student | mask strategy", T3_ROWS,
                T3, T2_COLS, linear_result, notes, avg_from=0)
    md += table(out, "Table IV: linear evaluation", "Method", T4_ROWS, T4, T4_COLS,
                linear_result, notes)
    md += table(out, "Table V: fine-tuning", "Method", T5_ROWS, T5, T5_COLS, finetune_result,
                notes)
    md += sed_table(out, notes)
    if notes:
        md += ["## Dataset copies", ""] + [f"[^{k}]: {v}" for k, v in sorted(notes.items())] + [
            ""]
    md += ["## Plots", ""]
    for names, fname, title in ((["clip", "frame"], "pretrain_main.png", "Pre-training"),
                                (["asit"], "pretrain_asit.png", "ASiT pre-training"),
                                (list(T2), "pretrain_table2.png", "Table II runs"),
                                (list(T3), "pretrain_table3.png", "Table III runs")):
        p = plot_runs(out, names, os.path.join(out, "plots", fname), title)
        if p:
            md.append(f"![{title}](plots/{fname})")
            md.append("")
    path = os.path.join(out, "tables.md")
    save_text("\n".join(md), path)
    print(f"tables -> {path}")
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out", default="results", help="run_all.sh's output folder")
    main(p.parse_args().out)
