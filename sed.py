"""
Sound event detection (SPEC 7, paper Table VI): DCASE 2022 task 4 (DESED) on top of an ATST-Frame,
ATST-Clip or ASiT checkpoint. Last-block frames (ATST 40 ms; ASiT 160 ms, each repeated over
four 40 ms label frames) -> strong sigmoid + class-softmax attention
pooling to a weak prediction; batches of strong + weak clips, loss BCE(strong) + BCE(weak);
SGD lr 0.1, 5 warmup epochs then cosine, grad clip 3. --mode linear trains the head only;
--mode finetune also the last block and final norm (the rest frozen in eval mode). Evaluation:
median filter, 50 thresholds, PSDS1/PSDS2 through psds_eval (the paper's numbers), the exact
threshold-free PSDS1/PSDS2 through sed_scores_eval, intersection F1 at 0.5, PSD-ROC plots,
DESED detection TSVs.

    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed --mode linear
    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed --mode finetune
    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed \
        --teacher out/sed_demo_sed_clip_finetune/best.pt                    # C2F
    torchrun --nproc_per_node=8 sed.py --ckpt atstframe_base.ckpt --data dcase2022
    python sed.py --predict my_audio/ --ckpt out/sed_dcase2022_frame_finetune/best.pt \
        --out events.tsv
"""
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import (AudioError, SedClips, audio_files, dataset_copy, default_data_root,
                  encode_strong, hold_out, load_audio, read_durations, read_strong, read_weak,
                  write_table)
from demo import make_demo
from metrics import detections, evaluate_sed, median_filter
from model import (SAMPLE_RATE, TOKEN_S, SedModel, freeze, load_classifier, load_encoder,
                   random_weights, tokens_for)
from plumbing import (WORKERS, Log, UserError, autocast, check_writable,
                      claim_out_dir, cleanup_distributed, configure, cosine_schedule, describe,
                      gather_shards, load_checkpoint, my_shard, pick_device, save_atomic,
                      save_json, setup_distributed, step_seed, user_errors, warmup_steps,
                      wrap_ddp)

# -------------------------------------------------------------------------------- config
# I/O
ckpt = ""                   # pre-trained checkpoint (training) or an SED checkpoint (--predict)
data = "dcase2022"          # dcase2022 (DESED layout under the data root) | demo_sed | a folder
data_root = ""              # root of named datasets; '' = $ATST_DATA or ./data
out_dir = ""                # '' = out/sed_<data>_<kind>_<mode>
# the DESED files, relative to the --data folder or absolute (README: the real DESED tree)
train_strong_tsv = "train_strong.tsv"      # strong labels: filename onset offset event_label
train_weak_tsv = "train_weak.tsv"          # weak labels: filename event_labels
test_tsv = "test.tsv"                      # test strong labels (DESED public validation)
test_durations_tsv = "test_durations.tsv"  # test clip durations: filename duration
train_strong_audio = "audio/train_strong"  # audio folder of the strong clips
train_weak_audio = "audio/train_weak"      # audio folder of the weak clips
test_audio = "audio/test"                  # audio folder of the test clips
# training
mode = "finetune"           # linear: head only | finetune: + last block and final norm
random_init = False         # baseline: the same encoder with random weights
teacher = ""                # SED checkpoint of another kind: C2F / F2C (any two kinds)
kd_weight = 0.5             # total = task + kd_weight * mean(BCE strong, BCE weak) vs teacher
lr = 0.1                    # SGD, momentum 0.9
epochs = 100                # training epochs
warmup_epochs = 5.0         # linear lr warmup, then cosine to min_lr
min_lr = 1e-6               # lr at the last step
grad_clip = 3.0             # global gradient norm clip
batch_strong = 128          # strong (synthetic) clips per step, all GPUs together
batch_weak = 128            # weak clips per step
weak_valid = 0.1            # weak clips held out for validation (the other 90% train)
strong_valid = 0.1          # strong clips held out for validation (best epoch by their F1)
# evaluation and --predict
median_window = 7           # frames (40 ms) of the median filter
class_windows = ""          # per-class windows, e.g. "Speech:7,Dishes:3" (others: median_window)
n_thresholds = 50           # operating points for psds_eval: 0.01, 0.03, ..., 0.99
threshold = 0.5             # --predict and the F1 / detection TSVs
predict = ""                # files or a folder to detect events in (needs an SED --ckpt)
out = ""                    # --predict output TSV; '' = stdout
# runtime
cache = False               # keep every clip's log-mel (linear: its frozen frames) and teacher
                            # output in memory after one pass: exact (no augmentation, frozen
                            # parts in eval mode), epochs skip audio I/O; RAM: ~0.26 MB per clip
                            # (linear: 4 bytes x 250 x dim), on every rank
num_workers = WORKERS       # DataLoader workers per rank (4, or the cores when fewer)
device = "auto"             # auto (CUDA if torch sees it) | cpu | cuda (an error without CUDA)
dtype = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (CPU too) | fp32
seed = 0                    # every random draw of a step derives from (seed, step, rank)
# --data NAME: per-task settings. Every row lists the same names; the first repeats the block
# above (DESED, SPEC 7), so an edited global wins over any row. The demo is CPU-sized; its
# intermittent events (clicks, plucks, tremolo) need a longer median filter than DESED's 7
# frames (7: test PSDS1 0.000, 31: 0.057, tiny Frame).
TASKS = {
    "dcase2022": dict(epochs=100, batch_strong=128, batch_weak=128, warmup_epochs=5.0, lr=0.1,
                      num_workers=WORKERS, cache=False, median_window=7,
                      class_windows=""),
    "demo_sed": dict(epochs=20, batch_strong=16, batch_weak=16, warmup_epochs=1.0, lr=0.5,
                     num_workers=2, cache=True, median_window=31, class_windows="")}


def task_dir(c):
    """DATA_ROOT/<name>/ (demo_sed lives under demo/sed) or a folder given directly."""
    if os.path.isdir(c.data):
        return c.data
    root = c.data_root or default_data_root()
    if c.data == "demo_sed":
        return os.path.join(make_demo(root), "sed")
    path = os.path.join(root, c.data)
    if not os.path.isdir(path):
        raise UserError(f"SED dataset {c.data!r}: expected the folder {path} "
                        "(README 'Sound event detection' shows the layout)")
    return path


SED_FILES = ("train_strong_tsv", "train_weak_tsv", "test_tsv", "test_durations_tsv",
             "train_strong_audio", "train_weak_audio", "test_audio")


def sed_files(c, root):
    """The DESED files and folders of the flags above, resolved against the task folder; a
    missing one is an error naming it and its flag."""
    paths = {k: os.path.join(root, getattr(c, k)) for k in SED_FILES}
    for k, p in paths.items():
        if not (os.path.isdir(p) if k.endswith("_audio") else os.path.isfile(p)):
            raise UserError(f"{p} not found (--{k} {getattr(c, k)}, relative to the --data "
                            f"folder {root}); README 'Sound event detection' shows the flags")
    return SimpleNamespace(**paths)


@torch.no_grad()
def clip_inputs(model, ds, c, d, features=False, teacher=None):
    """One pass over SedClips in eval mode: CPU tensors (x, n_tok, targets, teacher strong,
    teacher weak); x is the log-mel (B, F, T), or with `features` the encoder's frames."""
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=c.num_workers)
    out = []
    for wav, valid, y in loader:
        wav, valid = wav.to(d.device), valid.to(d.device)
        x, n = model.ae.features(wav, valid)
        with d.ctx:
            none = torch.zeros(len(y), 0)  # no teacher: empty columns
            ts, tw = teacher_outputs(teacher, model.ae, x, n, wav, valid) \
                if teacher is not None else (none, none)
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
        batches = (model.ae.features(w.to(d.device), v.to(d.device)) for w, v, _ in loader)
    out = []
    for x, n in batches:
        with d.ctx:
            out.append(model(x.to(d.device), n.to(d.device), features)[0].float().cpu())
    return gather_shards(mine, torch.cat(out), len(files), d).numpy()


def teacher_outputs(teacher, ae, x, n, wav, valid):
    """(strong, weak) of the SED teacher: on the student's input when both share a front-end,
    else (ASiT <-> ATST) on its own front-end's view of the same waveforms."""
    if not teacher.ae.same_front(ae):
        x, n = teacher.ae.features(wav, valid)
    return teacher(x, n)


def on_grid(*strong):
    """Strong outputs and labels cut to their common number of 40 ms frames (ASiT's 160 ms
    frames cover 9.92 s of a 10 s clip: 248 label frames of 250)."""
    T = min(s.shape[1] for s in strong)
    return [s[:, :T] for s in strong]


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
    d = setup_distributed(c.device, c.dtype)
    d.print(describe(cfg))
    root = task_dir(c)
    fs = sed_files(c, root)
    strong = read_strong(fs.train_strong_tsv)
    weak = read_weak(fs.train_weak_tsv)
    classes = sorted({e[2] for ev in strong.values() for e in ev} |
                     {lab for labels in weak.values() for lab in labels})  # the class list
    durations = read_durations(fs.test_durations_tsv)
    test = read_strong(fs.test_tsv, classes, durations)
    s_train, s_valid = hold_out(sorted(strong), c.strong_valid, c.seed)
    w_train, _ = hold_out(sorted(weak), c.weak_valid, c.seed)
    for n, b, what in ((len(s_train), c.batch_strong, "strong"), (len(w_train), c.batch_weak,
                                                                   "weak")):
        if b % d.world or n // d.world < b // d.world:  # said before encoding anything
            raise UserError(f"--batch_{what} {b}: {n} {what} training clips over {d.world} "
                            f"ranks hold no whole batch (or {b} does not split over the ranks)")
    absent = sorted(set(classes) - {e[2] for f in s_valid for e in strong[f]})
    if absent:
        d.print(f"note: the {len(s_valid)} held-out strong clips hold no event of {absent}; "
                "validation scores the other classes (--strong_valid holds out more)")
    ae = load_encoder(c.ckpt, d.device, pretrained=True)
    if c.random_init:
        random_weights(ae, c.seed)
    out_dir = c.out_dir or os.path.join("out", f"sed_{os.path.basename(c.data)}_{ae.kind}_"
                                               f"{c.mode}{'_random' if c.random_init else ''}")
    claim_out_dir(out_dir, d)
    teacher = None
    if c.teacher:
        teacher = freeze(load_classifier(c.teacher, d.device, expect=["atst-sed"]))
        if teacher.classes != classes:
            raise SystemExit(f"{c.teacher} was trained on other classes: {teacher.classes}")
    torch.manual_seed(c.seed)
    model = SedModel(ae, len(classes)).to(d.device)
    freeze_for(model, c.mode)
    model, ddp = wrap_ddp(model, d)
    params = [p for p in model.parameters() if p.requires_grad]
    d.print(f"{ae.source}: {ae.name}, {len(classes)} classes, {c.mode}: "
            f"{sum(p.numel() for p in params):,} trainable parameters; strong {len(s_train)}/"
            f"{len(s_valid)}, weak {len(w_train)}, test {len(test)} clips")
    opt = torch.optim.SGD(params, lr=c.lr, momentum=0.9)
    n_frames = tokens_for(10 * SAMPLE_RATE)
    s_ds = SedClips(fs.train_strong_audio, s_train, torch.stack(
        [encode_strong(strong[f], classes, n_frames) for f in s_train]))
    w_ds = SedClips(fs.train_weak_audio, w_train, torch.tensor(
        [[float(k in weak[f]) for k in classes] for f in w_train]))
    features = c.cache and c.mode == "linear"
    v_cache = None  # this rank's shard of the validation clips, as predict_scores takes it
    if c.cache:  # one pass over the clips; the epochs then read memory (exact: see the flag)
        t_c = time.time()
        s_ds, w_ds = (torch.utils.data.TensorDataset(*clip_inputs(model, ds, c, d, features,
                                                                  teacher)) for ds in (s_ds, w_ds))
        mine = my_shard(len(s_valid), d)
        v_cache = clip_inputs(model, SedClips(fs.train_strong_audio, [s_valid[i] for i in mine],
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
    total = c.epochs * per_epoch
    sched = cosine_schedule(c.lr, c.min_lr, total,
                            warmup_steps(c.warmup_epochs, per_epoch, total, d.print))
    windows = class_window_list(c, classes)
    valid_gt = os.path.join(out_dir, "valid_strong.tsv")
    valid_dur = os.path.join(out_dir, "valid_durations.tsv")
    if d.master:  # the held-out strong clips, in DESED format, for validation PSDS
        write_table(valid_gt, ["filename", "onset", "offset", "event_label"],
                    ([name, *ev] for name in s_valid for ev in strong[name]))
        write_table(valid_dur, ["filename", "duration"], ([name, 10.0] for name in s_valid))
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
            x, n = model.ae.features(wav, valid)
            with d.ctx:
                ts, tw = teacher_outputs(teacher, model.ae, x, n, wav, valid) \
                    if teacher is not None else (None, None)
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
            torch.manual_seed(step_seed(c.seed, step, d.rank))
            xs, ns_tok, ys, tss, tws = inputs(batch_s)
            xw, nw_tok, yw, tsw, tww = inputs(batch_w)
            ns = xs.shape[0]
            with d.ctx:
                s, w = ddp(torch.cat([xs, xw]), torch.cat([ns_tok, nw_tok]), features)
            loss = F.binary_cross_entropy(*on_grid(s[:ns].float(), ys)) + \
                F.binary_cross_entropy(w[ns:].float(), yw)
            if teacher is not None:
                ts, tw = torch.cat([tss, tsw]), torch.cat([tws, tww])
                kd_strong = F.binary_cross_entropy(*on_grid(s.float(), ts.float()))
                loss = loss + c.kd_weight * (kd_strong +
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
        scores = predict_scores(model, fs.train_strong_audio, s_valid, c, d, v_cache)
        v = evaluate_sed(scores, s_valid, classes, valid_gt, valid_dur, windows, TOKEN_S,
                         c.n_thresholds, c.threshold, quick=True)[0] if d.master else {}
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
    scores = predict_scores(model, fs.test_audio, files, c, d)
    if d.master:
        res, det = evaluate_sed(scores, files, classes, fs.test_tsv, fs.test_durations_tsv,
                                windows, TOKEN_S,
                                c.n_thresholds, c.threshold, plot_dir=out_dir,
                                title=f"{os.path.basename(out_dir)}:")
        write_table(os.path.join(out_dir, f"detections_{c.threshold:.2f}.tsv"),
                    list(det.columns), det.round(3).itertuples(index=False))
        res.update(stage="sed", dataset=c.data, dataset_copy=dataset_copy(root),
                   checkpoint=c.ckpt, kind=ae.kind, mode=c.mode, precision=d.precision,
                   random_init=c.random_init,
                   classes=classes,
                   teacher=c.teacher or None, best_epoch=best["epoch"], lr=c.lr, seed=c.seed,
                   elapsed_s=round(time.time() - t0, 1), config=cfg)
        save_json(res, os.path.join(out_dir, "result.json"))
        d.print(f"sed {c.data} | {ae.name} {c.mode}{' + teacher' if c.teacher else ''} | "
                f"PSDS1 {res['psds1']:.3f} PSDS2 {res['psds2']:.3f} (psds_eval, "
                f"{res['psds_eval_s']:.1f}s) | exact {res['psds1_exact']:.3f} / "
                f"{res['psds2_exact']:.3f} ({res['sed_scores_eval_s']:.1f}s) | F1 "
                f"{res['f1_intersection']:.3f} | {out_dir}")
    cleanup_distributed()


def detect(c):
    """--predict: events (filename, onset, offset, event_label) in files of any length and
    sample rate, with the SED checkpoint's classes and median windows (--median_window /
    --class_windows, when you set them, instead). A file found in a folder is named by its
    path inside that folder; an unreadable file is said and skipped, the others processed,
    and the exit status is then 1."""
    device = pick_device(c.device)
    if c.out:
        check_writable(c.out, "out")
    model = load_classifier(c.ckpt, device, expect=["atst-sed"])
    ck = load_checkpoint(c.ckpt)
    windows = ck.get("median_windows") or class_window_list(c, model.classes)
    if {"median_window", "class_windows"} & set(c.set_by_user):
        windows = class_window_list(c, model.classes)
    named = {}  # path -> its name in the output
    for p in c.predict.split(","):
        if os.path.isdir(p):                                   # an empty folder is an error
            named.update((f, os.path.relpath(f, p)) for f in audio_files(p))
        else:
            named[p] = os.path.basename(p)
    rows, failed = [], []
    for path, name in named.items():
        try:
            wav, n = load_audio(path, where="--predict")
        except AudioError as e:
            failed.append(path)
            tqdm.write(f"skipped: {e}", file=sys.stderr)
            continue
        audio, lengths = model.ae.prepare(wav, SAMPLE_RATE)
        with torch.no_grad(), autocast(device, c.dtype):
            s, _ = model(*model.ae.features(audio, lengths))
        s = median_filter(s.float().cpu().numpy(), windows)
        det = detections(s, [name], model.classes, [c.threshold], TOKEN_S)
        dur = n / SAMPLE_RATE
        rows += [(f, f"{min(a, dur):.3f}", f"{min(b, dur):.3f}", label)
                 for f, a, b, label in det[c.threshold].itertuples(index=False)]
    header = ["filename", "onset", "offset", "event_label"]
    write_table(c.out or sys.stdout, header, rows)
    print(f"{len(rows)} events in {len(named) - len(failed)} files" +
          (f" -> {c.out}" if c.out else "") +
          (f"; {len(failed)} files could not be read: {', '.join(failed)}" if failed else ""),
          file=sys.stdout if c.out else sys.stderr)
    if failed:
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    cfg = configure(globals(), dict(data=TASKS))
    if not cfg["ckpt"]:
        raise SystemExit("sed.py needs --ckpt (a pre-trained checkpoint, or with --predict an "
                         "SED checkpoint)")
    with user_errors():
        detect(SimpleNamespace(**cfg)) if cfg["predict"] else train(cfg)
