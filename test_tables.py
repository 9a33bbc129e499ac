"""tables.py and run_all.sh: cells, averages and checks from result files; a rerun over
finished results runs no stage; the paper's protocol in miniature on prepared copies of the
real datasets."""
import json
import os
import re
import subprocess
import time

import numpy as np
import soundfile as sf

from conftest import HERE, run
from plumbing import load_checkpoint

PRETRAIN_RUNS = ["clip", "frame", "asit", "clip_single_1s", "clip_two_1s", "clip_single_6s",
                 "frame_A", "frame_B", "frame_C", "frame_E"]


def fake_results(out, linear, sed_psds1):
    """What run_all.sh leaves behind at demo scale, with chosen scores."""
    def put(path, obj):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj))
    for n in PRETRAIN_RUNS:
        put(os.path.join(out, "pretrain", n, "ckpt.pt.json"), dict(
            step=48, total=48, model_args=dict(proj_dim=128),
            config=dict(preset="tiny", data="demo", batch_size=32)))
        asit = lambda s: dict(loss=s / 4, loss_r=0.3 / s, ent_g=6.0 + s / 240) \
            if n == "asit" else {}                 # ASiT at demo scale: its total loss rises
        put(os.path.join(out, "pretrain", n, "log.jsonl"), "".join(
            json.dumps({**dict(step=s, loss=1.0 / s, std_t=0.05), **asit(s)}) + "\n"
            for s in (16, 32, 48)))
    for name, score in linear.items():  # (score, metric, test clips) or a bare score
        score, metric, n = score if isinstance(score, tuple) else (score, None, None)
        put(os.path.join(out, "linear", f"{name}.json"), dict(test=score, metric=metric,
                                                             n=[0, 0, n]))
    for n in ("clip", "frame", "c2f", "f2c", "asit"):
        put(os.path.join(out, "finetune", f"{n}_demo_events", "result.json"),
            dict(test=0.25 if n == "asit" else 0.5))
    for n in ("clip_linear", "frame_linear", "clip_finetune", "frame_finetune", "c2f", "f2c",
              "asit_linear", "asit_finetune", "asit_linear_concat"):
        put(os.path.join(out, "sed", n, "result.json"), dict(
            psds1=sed_psds1.get(n, 0.1), psds2=0.2, psds1_exact=0.1, psds2_exact=0.2,
            f1_intersection=0.5, dataset="dcase2022" if n == "frame_finetune" else "demo_sed"))


def test_tables_cells_averages_and_checks(tmp_path):
    import tables
    out = str(tmp_path)
    acc = lambda x, n=160: (x, "accuracy", n)
    linear = {"frame_demo_events": acc(0.8), "frame_random_demo_events": acc(0.6),
              "clip_demo_events": acc(0.5), "clip_random_demo_events": acc(0.7),
              "frame_us8k": acc(0.855, 873), "frame_random_us8k": acc(0.84, 873),
              "frame_demo_tags": (0.62, "mAP", 120), "frame_random_demo_tags": (0.6, "mAP", 120),
              "asit_demo_events": acc(0.7), "asit_random_demo_events": acc(0.55),
              "asit_demo_tags": (0.5, "mAP", 120), "asit_random_demo_tags": (0.5, "mAP", 120),
              "asit_concat_demo_events": acc(0.75), "asit_random_concat_demo_events": acc(0.6)}
    fake_results(out, linear, {"frame_finetune": 0.3, "clip_finetune": 0.2,
                               "asit_finetune": 0.05})
    md = open(tables.main(out)).read()
    row = next(line for line in md.splitlines() if line.startswith("| ATST-Frame |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Table IV: AS-20K, SPCV2, VOX1, NSYNTH, US8K, FSD50K, then the demo column
    assert cells[1] == "- (33.0)" and cells[5] == "85.5 (85.8)" and cells[7] == "80.0"
    # Table II averages the last four tasks: the paper's own 74.9 for single / 1 s
    row = next(line for line in md.splitlines() if line.startswith("| single | 1 |"))
    assert "- (74.9)" in row
    row = next(line for line in md.splitlines() if line.startswith("| A | 0 |"))
    assert "- (42.8)" in row  # Table III averages all five
    # checks: the standard error of a difference of accuracies, sqrt((.8 .2 + .6 .4) / 160)
    # = 5.0 points; 20 points is beyond 2 SE, 1.5 on US8K (SE 1.7) is within
    assert ("ATST-Frame 80.0 vs the same encoder with random weights 60.0: ahead by 20.0 "
            "points, standard error of the difference 5.0 on 160 test clips: beyond noise") in md
    assert "ATST-Clip 50.0 vs the same encoder with random weights 70.0: behind by 20.0" in md
    assert "85.5 vs the same encoder with random weights 84.0: ahead by 1.5 points, standard " \
        "error of the difference 1.7 on 873 test clips: within noise" in md
    assert "62.0 vs the same encoder with random weights 60.0: ahead by 2.0 points (one seed; " \
        "no standard error for mAP)" in md
    assert "SED (finetune): ATST-Frame PSDS1 0.300 vs ATST-Clip 0.200: ahead by 0.100" in md
    assert "ASiT 50.0 vs the same encoder with random weights 50.0: level (one seed" in md
    # Table VI: the paper's DESED columns hold ours only for a run on DESED
    row = next(line for line in md.splitlines() if line.startswith("| Finetuning | ATST-Frame"))
    assert "| 0.300 (0.361) | 0.200 (0.581) | dcase2022 |" in row
    row = next(line for line in md.splitlines() if line.startswith("| Linear | ATST-Clip"))
    assert "| - (0.115) | - (0.293) | demo_sed | 0.100 | 0.200 |" in row
    # ASiT beside ATST: Table IV / V rows (Table V with the paper's quoted ASiT numbers), Table
    # VI at 160 ms, and its checks
    lines = md.splitlines()
    t4 = lines.index(next(x for x in lines if x.startswith("### Table IV")))
    cells = lambda start: [c.strip() for c in next(
        x for x in lines[t4:] if x.startswith(start)).strip("|").split("|")]
    assert cells("| ASiT |")[1:8] == ["-"] * 6 + ["70.0"]        # no paper value in Table IV
    assert cells("| ASiT, random weights |")[7] == "55.0"
    assert cells("| ASiT, band tokens concatenated |")[7] == "75.0"
    assert ("demo_events: ASiT with band tokens concatenated 75.0 vs averaged 70.0: ahead by "
            "5.0 points") in md
    assert "ASiT, random weights with band tokens concatenated 60.0 vs averaged 55.0" in md
    t5 = lines.index(next(x for x in lines if x.startswith("### Table V:")))
    row = next(x for x in lines[t5:] if x.startswith("| ASiT |"))
    assert [c.strip() for c in row.strip("|").split("|")][1:7] == [
        "-", "- (35.2)", "- (98.8)", "- (63.1)", "-", "25.0"]
    row = next(line for line in lines if line.startswith("| Finetuning | ASiT |"))
    assert row.startswith("| Finetuning | ASiT | 160 ms | - | - | demo_sed | 0.050 |")
    assert next(x for x in lines if x.startswith("| Linear | ATST-Frame |")).startswith(
        "| Linear | ATST-Frame | 40 ms |")
    assert "pre-trained ASiT 70.0 vs the same encoder with random weights 55.0: ahead by 15" in md
    assert "SED (finetune): ATST-Frame PSDS1 0.300 vs ASiT 0.050: ahead by 0.250" in md
    for plot in ("pretrain_main.png", "pretrain_asit.png"):
        assert os.path.getsize(os.path.join(out, "plots", plot)) > 1000
    assert ("ASiT asit (tiny, 48 steps): total loss 4.000 -> 12.000, reconstruction loss 0.019 "
            "-> 0.006 (lowest 0.006), global teacher entropy 6.07 -> 6.20, teacher std lowest "
            "0.050. A total loss that rises") in md and "nothing of ASiT at the paper's" in md


def test_run_all_skips_finished_work(data_root, tmp_path):
    """A rerun over finished results runs nothing but the tables (issue 6: rerun < 1 min)."""
    out = str(tmp_path / "res")
    names = ["clip", "frame", "asit", "clip_random", "frame_random", "asit_random",
             "asit_concat", "asit_random_concat"]
    linear = {f"{n}_{t}": 0.5 for n in names for t in ("demo_events", "demo_tags")}
    linear.update({f"{n}_demo_events": 0.5 for n in PRETRAIN_RUNS[2:] + ["clip_two_6s",
                                                                          "frame_D"]})
    fake_results(out, linear, {})
    env = dict(os.environ, OUT=out, ATST_DATA=data_root)
    p = subprocess.run(["bash", "run_all.sh"], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pre-train" not in p.stdout and "tables ->" in p.stdout
    assert os.path.islink(os.path.join(out, "pretrain", "frame_D"))  # = the main Frame run
    assert "| D | 1 |" in open(os.path.join(out, "tables.md")).read()


def table_cells(md, title):
    """{(row label, column header): cell} of the markdown table under '### <title>...'."""
    lines = md.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(f"### {title}"))
    rows = []
    for x in lines[start + 2:]:
        if not x.startswith("|"):
            break
        rows.append([c.strip() for c in x.strip("|").split("|")])
    head, body = rows[0], rows[2:]
    n_label = next(i for i, h in enumerate(head) if h.split()[0] in REAL_COLUMNS)
    return {(" | ".join(r[:n_label]), h): c for r in body for h, c in zip(head, r)
            if h.split()[0] in REAL_COLUMNS}


REAL_COLUMNS = {"AS-20K": "as20k", "AS-2M": "as2m", "SPCV2": "spcv2", "VOX1": "vox1",
                "NSYNTH": "nsynth", "US8K": "us8k", "FSD50K": "fsd50k", "ESC-50": "esc50",
                "DESED": "dcase2022"}


def test_miniature_of_the_real_protocol(prepared, downloads, tmp_path):
    """The paper's protocol on the prepared miniatures of the real datasets (run_all.sh's
    real-data branch with its budget knobs, every stage in bf16 on the CPU, two cells at a
    time): every real-data cell of Tables II-VI is filled, and names the copy of the dataset
    it was measured on; every result records its precision and dataset copy."""
    root, prep_times = prepared
    out = str(tmp_path / "res")
    env = dict(os.environ, DATA_ROOT=root, PRESET="tiny", STEPS="4", EPOCHS="1",
               LINEAR_EPOCHS="10", BATCH="8", DTYPE="bf16", WORKERS="0", JOBS="2", OUT=out)
    t0 = time.time()
    p = subprocess.run(["bash", "run_all.sh"], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    print(f"miniature of the real protocol: {time.time() - t0:.0f} s; prepare.py: {prep_times}")
    md = open(os.path.join(out, "tables.md")).read()
    notes = dict(line[2:].split("]: ", 1) for line in md.splitlines() if line.startswith("[^"))
    shapes = {"Table II": (4, 5), "Table III": (5, 5), "Table IV": (8, 7), "Table V": (5, 5),
              "Table VI": (9, 2)}  # IV, VI: with ASiT's concatenated band tokens
    for title, (n_rows, n_cols) in shapes.items():
        cells = table_cells(md, title)
        assert len(cells) == n_rows * n_cols, (title, sorted(cells))
        for (row, col), cell in cells.items():
            m = re.fullmatch(r"\d+\.\d+( \(\d+\.\d+\))? \[\^([\w-]+)\]", cell)
            assert m, (title, row, col, cell)                    # a number, then its copy
            key = m.group(2)
            assert key.startswith(REAL_COLUMNS[col.split()[0]].replace(".", "-") + "-")
            assert "clips" in notes[key] and downloads["audioset"].rsplit(os.sep, 1)[0] in \
                notes[key]                                       # found / listed, where from
    assert "| AS-20K mAP (%) |" in md and "ESC-50 Acc (%)" in md
    assert "as20k-" in " ".join(notes) and "train 10 / 11 clips" in md     # one never downloaded
    scale = [x for x in md.splitlines() if x.startswith("| clip") or x.startswith("| frame")]
    assert scale and all("| tiny | as" in x and "[^as" in x and "| bf16 |" in x for x in scale)
    for sub in ("linear", "finetune", "sed"):
        for dp, _, files in os.walk(os.path.join(out, sub)):
            for f in files:
                if f.endswith(".json") and (sub == "linear" or f == "result.json"):
                    r = json.load(open(os.path.join(dp, f)))
                    assert r["precision"] == "bf16" and r["dataset_copy"]["fingerprint"], f
    _concat_frames_reach_every_stage(out, root)


def _concat_frames_reach_every_stage(out, data_root):
    """run_all's ASiT cells with --frame_pool concat (its 8 band tokens side by side): linear
    evaluation's features, the SED head, its best.pt and --predict, and the result files say
    so. (Tiny preset: dim 64, 4 blocks.)"""
    dim, depth = 64, 4
    lin = [json.load(open(os.path.join(out, "linear", f))) for f in os.listdir(
        os.path.join(out, "linear")) if f.startswith("asit_concat_") and f.endswith(".json")]
    assert len(lin) == 7                                           # Table IV's columns
    assert all(r["frame_pool"] == "concat" and r["feature_dim"] == depth * (dim + 8 * dim)
               for r in lin)
    sed = os.path.join(out, "sed", "asit_linear_concat")
    assert json.load(open(os.path.join(sed, "result.json")))["frame_pool"] == "concat"
    best = load_checkpoint(os.path.join(sed, "best.pt"))
    assert best["frame_pool"] == "concat"
    assert best["model"]["head.strong.weight"].shape[1] == 8 * dim
    wav = os.path.join(out, "silence.wav")
    sf.write(wav, np.zeros(3 * 16000, np.float32), 16000)
    p = run("sed.py", "--predict", wav, "--ckpt", os.path.join(sed, "best.pt"),
            data_root=data_root)
    assert p.stdout.startswith("filename\tonset")
