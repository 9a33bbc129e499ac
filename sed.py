"""
Sound event detection (REFERENCE.md R7, paper Table VI): DCASE 2022 task 4 (DESED) on top of an
ATST-Frame, ATST-Clip or ASiT checkpoint. Last-block frames (ATST 40 ms; ASiT 160 ms, each
repeated over four 40 ms label frames) -> strong sigmoid + class-softmax attention pooling to a
weak prediction; batches of strong + weak clips, loss BCE(strong) + BCE(weak); SGD lr 0.1, 5
warmup epochs then cosine, grad clip 3. --mode linear trains the head only; --mode finetune
also the last block and final norm (the rest frozen in eval mode). Evaluation: median filter,
50 thresholds, PSDS1/PSDS2 through psds_eval (the paper's numbers), the exact threshold-free
PSDS1/PSDS2 through sed_scores_eval, intersection F1 at 0.5, PSD-ROC plots, DESED detection
TSVs.

    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed --mode linear
    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed --mode finetune
    python sed.py --ckpt out/frame_tiny/ckpt.pt --data demo_sed \
        --teacher out/sed_demo_sed_clip_finetune/best.pt                    # C2F
    torchrun --nproc_per_node=8 sed.py --ckpt atstframe_base.ckpt --data dcase2022
    torchrun --nproc_per_node=2 sed.py --ckpt X.ckpt --data dcase2022 --micro_batch 32  # accum 4
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

from cluster import (accumulate, cleanup_distributed, gather_shards, my_shard, pick_device,
                     split_batch, visible, workers, wrap_ddp)
from config import configure
from data import AudioError, dataset_copy, hold_out, load_audio, named_audio, on_device
from desed import (CLIP_FRAMES, SedClips, encode_strong, read_task, reference_files, sed_files,
                   task_dir)
from downstream import (EVAL_BATCH, publish, record, resume, run_dir, save_epoch, start,
                        start_encoder)
from heads import SedModel, load_classifier, on_grid
from loaders import Unreadable, make_loader, pad_collate, replaced
from metrics import evaluate_sed, median_windows
from model import SAMPLE_RATE, TOKEN_S, freeze
from plumbing import (Log, UserError, check_writable, cosine_schedule, load_checkpoint,
                      save_atomic, step_seed, user_errors, warmup_steps, write_table)

# -------------------------------------------------------------------------------- config
# None = the value of the task's TASKS row (below); anything written here, or a flag, wins.
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
frame_pool = ""             # ASiT's 8 band tokens a frame: mean | concat; '' = the kind's (mean)
teacher = ""                # SED checkpoint of another kind: C2F / F2C (any two kinds)
kd_weight = 0.5             # total = task + kd_weight * mean(BCE strong, BCE weak) vs teacher
lr = None                   # SGD, momentum 0.9
epochs = None               # training epochs
warmup_epochs = None        # linear lr warmup, then cosine to min_lr
min_lr = 1e-6               # lr at the last step
grad_clip = 3.0             # global gradient norm clip
batch_strong = None         # strong (synthetic) clips per step, all GPUs together
batch_weak = None           # weak clips per step
micro_batch = 0             # strong + weak clips per GPU in one forward (gradient accumulation);
                            # 0 = (batch_strong + batch_weak) / GPUs
weak_valid = 0.1            # weak clips held out for validation (the other 90% train)
strong_valid = 0.1          # strong clips held out for validation (best epoch by their F1)
# evaluation and --predict
median_window = None        # frames (40 ms) of the median filter
class_windows = None        # per-class windows, e.g. "Speech:7,Dishes:3" (others: median_window)
n_thresholds = 50           # operating points for psds_eval: 0.01, 0.03, ..., 0.99
threshold = 0.5             # --predict and the F1 / detection TSVs
predict = ""                # files or a folder to detect events in (needs an SED --ckpt)
out = ""                    # --predict output TSV; '' = stdout
# runtime
cache = None                # keep each clip's log-mel (linear: frozen frames, 4 bytes x 250 x dim)
                            # and teacher output in memory (~0.26 MB a clip, every rank) after
                            # one pass: exact (nothing augmented, frozen parts in eval mode)
num_workers = -1            # DataLoader workers per rank; -1: the CPUs / ranks here, less one
device = "auto"             # auto (CUDA if torch sees it) | cpu | cuda (an error without CUDA)
dtype = "auto"              # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 (CPU too) | fp32
seed = 0                    # every random draw of a step derives from (seed, step, rank)
# --data NAME: per-task settings (dcase2022: R7; a folder takes that row too). The demo is
# CPU-sized; its intermittent events (clicks, plucks, tremolo) need a longer median filter
# than DESED's 7 frames (7: test PSDS1 0.000, 31: 0.057, tiny Frame).
TASKS = {
    "dcase2022": dict(epochs=100, batch_strong=128, batch_weak=128, warmup_epochs=5.0, lr=0.1,
                      cache=False, median_window=7, class_windows=""),
    "demo_sed": dict(epochs=20, batch_strong=16, batch_weak=16, warmup_epochs=1.0, lr=0.5,
                     cache=True, median_window=31, class_windows="")}
TABLES = dict(data=TASKS)


@torch.no_grad()
def clip_inputs(model, ds, c, d, features=False, teacher=None):
    """One pass over SedClips in eval mode: CPU tensors (x, n_tok, targets, teacher strong,
    teacher weak); x is the log-mel (B, F, T), or with `features` the encoder's frames. []
    for no clips (a rank whose shard is empty)."""
    model.eval()
    loader = make_loader(ds, d.device, c.num_workers, batch_size=EVAL_BATCH,
                         collate_fn=pad_collate)  # one pass
    out = []
    for wav, valid, y in tqdm(loader, desc=f"caching {len(ds)} clips", disable=not d.master,
                              leave=False):
        wav, valid = on_device(wav, d.device), valid.to(d.device, non_blocking=True)
        x, n = model.ae.features(wav, valid)
        with d.ctx:
            none = torch.zeros(len(y), 0)  # no teacher: empty columns
            ts, tw = teacher.teach(model.ae, x, n, wav, valid) \
                if teacher is not None else (none, none)
            if features:
                x = model.ae.encode(x, n).frames
        out.append([x.float().cpu(), n.cpu(), y, ts.float().cpu(), tw.float().cpu()])
    return [torch.cat(col) for col in zip(*out)]


def scoring_loader(audio_dir, files, c, d):
    """This rank's shard of the clips to score (a rank may have none): (its indices into
    files, a loader of them, made once per run), for predict_scores."""
    mine = my_shard(len(files), d)
    ds = SedClips(audio_dir, [files[i] for i in mine], torch.zeros(len(mine)))
    return mine, make_loader(ds, d.device, c.num_workers, batch_size=EVAL_BATCH,
                             collate_fn=pad_collate)


@torch.no_grad()
def predict_scores(model, n_clips, shard, c, d):
    """Strong scores (N, T, C) of n_clips 10 s clips, sharded over ranks. `shard`: this
    rank's (indices, clips), the clips a loader streaming them from disk (scoring_loader) or
    as clip_inputs cached them (x, n_tok, ...). A rank may have no clips."""
    model.eval()
    mine, clips = shard
    if isinstance(clips, torch.utils.data.DataLoader):
        features = False
        batches = (model.ae.features(on_device(w, d.device), v.to(d.device, non_blocking=True))
                   for w, v, _ in clips)
    else:
        features = c.cache and c.mode == "linear"
        batches = zip(clips[0].split(EVAL_BATCH), clips[1].split(EVAL_BATCH)) if clips else ()
    out = []
    for x, n in tqdm(batches, desc=f"scoring {n_clips} clips", disable=not d.master,
                     total=-(-len(mine) // EVAL_BATCH), leave=False):
        with d.ctx:
            out.append(model(x.to(d.device), n.to(d.device), features)[0].float().cpu())
    return gather_shards(mine, out, n_clips, d).numpy()


def setup(cfg):
    """Everything a training run needs, before its first epoch: data, model, optimizer,
    loaders, schedule, the validation files; a namespace."""
    c, d, t0 = start(cfg)
    root = task_dir(c.data, c.data_root)
    fs = sed_files(c, root)
    strong, weak, classes, test = read_task(fs)
    s_train, s_valid = hold_out(sorted(strong), c.strong_valid, c.seed)
    w_train, _ = hold_out(sorted(weak), c.weak_valid, c.seed)
    # a forward of each rank holds micro strong + weak clips, in the batches' proportion
    micro, accum = split_batch(c.batch_strong + c.batch_weak, c.micro_batch, d,
                               "batch_strong + --batch_weak")
    for n, b, what in ((len(s_train), c.batch_strong, "strong"), (len(w_train), c.batch_weak,
                                                                   "weak")):
        if b % (d.world * accum) or n // d.world < b // d.world:  # said before encoding
            raise UserError(f"--batch_{what} {b}: {n} {what} training clips over {d.world} "
                            f"ranks hold no whole batch (or {b} does not split over "
                            f"{d.world} ranks x {accum} accumulation steps)")
    absent = sorted(set(classes) - {e[2] for f in s_valid for e in strong[f]})
    if absent:
        d.print(f"note: the {len(s_valid)} held-out strong clips hold no event of {absent}; "
                "validation scores the other classes (--strong_valid holds out more)")
    ae = start_encoder(c, d).pool_frames(c.frame_pool)
    out_dir = run_dir(c, d, "sed", ae, c.mode, *([c.frame_pool] if c.frame_pool else []))
    teacher = None
    if c.teacher:
        teacher = freeze(load_classifier(c.teacher, d.device, expect=["atst-sed"]))
        if teacher.classes != classes:
            raise SystemExit(f"{c.teacher} was trained on other classes: {teacher.classes}")
    torch.manual_seed(c.seed)
    model = SedModel(ae, len(classes)).to(d.device)  # DDP after resume (train)
    model.trainable(c.mode)
    params = [p for p in model.parameters() if p.requires_grad]
    d.print(f"{ae.source}: {ae.name}, {len(classes)} classes, {c.mode}: "
            f"{sum(p.numel() for p in params):,} trainable parameters; strong {len(s_train)}/"
            f"{len(s_valid)}, weak {len(w_train)}, test {len(test)} clips")
    opt = torch.optim.SGD(params, lr=c.lr, momentum=0.9)
    # clips read in the epochs replace an unreadable one; the cache's one pass, minutes before
    # the first step, ends the run with its line instead
    s_ds = SedClips(fs.train_strong_audio, s_train, torch.stack(
        [encode_strong(strong[f], classes, CLIP_FRAMES) for f in s_train]), train=not c.cache,
        seed=c.seed)
    w_ds = SedClips(fs.train_weak_audio, w_train, torch.tensor(
        [[float(k in weak[f]) for k in classes] for f in w_train]), train=not c.cache,
        seed=c.seed)
    features = c.cache and c.mode == "linear"
    valid = scoring_loader(fs.train_strong_audio, s_valid, c, d)  # this rank's, as validated
    if c.cache:  # one pass over the clips; the epochs then read memory (exact: see the flag)
        t_c = time.time()
        s_ds, w_ds = (torch.utils.data.TensorDataset(*clip_inputs(model, ds, c, d, features,
                                                                  teacher)) for ds in (s_ds, w_ds))
        valid = valid[0], clip_inputs(model, valid[1].dataset, c, d, features)
        d.print(f"cached {'frames' if features else 'log-mels'} of {len(s_ds) + len(w_ds)} "
                f"training clips in {time.time() - t_c:.0f}s")
    # the workers shared by batch size (the two loaders read side by side); cached clips are
    # in memory already: workers would only pickle them through a pipe. SedClips draws
    # nothing by epoch (replacements by (seed, index)): persistent workers read what fresh
    # ones would
    n = 0 if c.cache else workers(c.num_workers)
    n_strong = min(max(round(n * c.batch_strong / (c.batch_strong + c.batch_weak)), 1), n)
    loaders = []
    for ds, b, k in ((s_ds, c.batch_strong, n_strong),
                     (w_ds, c.batch_weak, max(n - n_strong, min(n, 1)))):
        sampler = torch.utils.data.DistributedSampler(ds, d.world, d.rank, seed=c.seed,
                                                      drop_last=True)
        loaders.append((sampler, make_loader(ds, d.device, k,
                                             batch_size=b // (d.world * accum), sampler=sampler,
                                             drop_last=True,
                                             collate_fn=None if c.cache else pad_collate)))
    per_epoch = len(loaders[0][1]) // accum
    total = c.epochs * per_epoch
    sched = cosine_schedule(c.lr, c.min_lr, total,
                            warmup_steps(c.warmup_epochs, per_epoch, total, d.print))
    d.print(f"batch {c.batch_strong} strong + {c.batch_weak} weak = {micro} x {d.world} ranks "
            f"x {accum} accum, {per_epoch} steps/epoch")
    valid_gt, valid_dur = reference_files(out_dir, "valid", strong, s_valid, d.master)
    return SimpleNamespace(c=c, d=d, t0=t0, cfg=cfg, root=root, fs=fs, classes=classes,
                           test=test, s_valid=s_valid, ae=ae, out_dir=out_dir, teacher=teacher,
                           model=model, params=params, opt=opt, loaders=loaders, accum=accum,
                           per_epoch=per_epoch, sched=sched, features=features, valid=valid,
                           windows=median_windows(c.class_windows, classes, c.median_window),
                           valid_gt=valid_gt, valid_dur=valid_dur)


def inputs(r, batch):
    """A loader batch -> (x, n_tok, targets, teacher strong, teacher weak) on the device."""
    batch = [t.to(r.d.device, non_blocking=True) for t in batch]
    if r.c.cache:
        return batch
    wav, valid, y = on_device(batch[0], r.d.device), *batch[1:]
    with torch.no_grad():
        x, n = r.model.ae.features(wav, valid)
        with r.d.ctx:
            ts, tw = r.teacher.teach(r.model.ae, x, n, wav, valid) \
                if r.teacher is not None else (None, None)
    return x, n, y, ts, tw


def in_steps(loader, accum):
    """A loader's batches, endlessly, each pass cut to whole steps of accum micro-batches (the
    weak clips cycle while the strong ones make the epoch)."""
    while True:
        for _, batch in zip(range(len(loader) // accum * accum), loader):
            yield batch


def run_epoch(r, epoch):
    """One epoch of optimizer steps, each over r.accum micro-batches of strong + weak clips per
    rank; returns the mean loss (over ranks too). A non-finite loss stops every rank."""
    c, d, opt = r.c, r.d, r.opt
    r.model.train_mode(c.mode)
    for sampler, _ in r.loaders:
        sampler.set_epoch(epoch)
    strong, weak = iter(r.loaders[0][1]), in_steps(r.loaders[1][1], r.accum)
    said = []  # messages of the clips replaced in this step's batches (read from disk)
    if not c.cache:
        strong, weak = replaced(strong, said), replaced(weak, said)
    loss_sum = 0.0
    for i in tqdm(range(r.per_epoch), disable=not d.master, leave=False):
        step = epoch * r.per_epoch + i
        for g in opt.param_groups:
            g["lr"] = r.sched[step].item()

        def micro(k):
            torch.manual_seed(step_seed(c.seed, step * r.accum + k, d.rank))
            return micro_loss(r, next(strong), next(weak))
        loss_val = accumulate(r.ddp, r.accum, d, micro)
        r.unreadable(step + 1, said, (step + 1) * (c.batch_strong + c.batch_weak))
        torch.nn.utils.clip_grad_norm_(r.params, c.grad_clip)
        if not math.isfinite(loss_val):
            raise SystemExit(f"non-finite loss ({loss_val}) at epoch {epoch}: stopping")
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss_val
    return loss_sum / r.per_epoch


def micro_loss(r, batch_s, batch_w):
    """BCE(strong) on the strong clips + BCE(weak) on the weak ones, plus the teacher's term,
    for one micro-batch of each, through DDP (r.ddp) in one forward."""
    xs, ns_tok, ys, tss, tws = inputs(r, batch_s)
    xw, nw_tok, yw, tsw, tww = inputs(r, batch_w)
    ns = xs.shape[0]
    with r.d.ctx:
        s, w = r.ddp(torch.cat([xs, xw]), torch.cat([ns_tok, nw_tok]), r.features)
    loss = F.binary_cross_entropy(*on_grid(s[:ns].float(), ys)) + \
        F.binary_cross_entropy(w[ns:].float(), yw)
    if r.teacher is not None:
        ts, tw = torch.cat([tss, tsw]), torch.cat([tws, tww])
        kd_strong = F.binary_cross_entropy(*on_grid(s.float(), ts.float()))
        loss = loss + r.c.kd_weight * (kd_strong +
                                       F.binary_cross_entropy(w.float(), tw.float())) / 2
    return loss


def validate(r):
    """Intersection F1 and exact PSDS1 on the held-out strong clips (the same on every rank)."""
    scores = predict_scores(r.model, len(r.s_valid), r.valid, r.c, r.d)
    v = evaluate_sed(scores, r.s_valid, r.classes, r.valid_gt, r.valid_dur, r.windows, TOKEN_S,
                     r.c.n_thresholds, r.c.threshold, quick=True)[0] if r.d.master else {}
    if r.d.world > 1:
        box = [v]
        dist.broadcast_object_list(box)
        v = box[0]
    return v


def train(cfg):
    r = setup(cfg)
    c, d, model = r.c, r.d, r.model
    ckpt_path, best_path = (os.path.join(r.out_dir, f) for f in ("ckpt.pt", "best.pt"))
    epoch, best = resume(ckpt_path, model, r.opt, d, cfg)
    best = best or dict(obj=-1.0, epoch=0)
    model, r.ddp = wrap_ddp(model, d)  # after resume: every rank starts from rank 0's weights
    r.model = model
    r.unreadable = Unreadable(r.out_dir, d, epoch * r.per_epoch)
    log = Log(r.out_dir, d.master, resume=("epoch", epoch))
    for epoch in range(epoch, c.epochs):
        t_ep = time.time()
        loss = run_epoch(r, epoch)
        v = validate(r)
        # model selection: intersection F1 on the held-out strong clips (the DCASE 2022
        # baseline's synthetic-validation objective); PSDS1 of a few clips is mostly 0 early on
        obj = v["f1_intersection"] + 1e-3 * v["psds1_exact"]
        if obj > best["obj"]:
            best = dict(obj=obj, epoch=epoch + 1)
            if d.master:
                save_atomic(dict(kind="atst-sed", model=model.export(), classes=r.classes,
                                 encoder_args=r.ae.encoder.args, encoder_kind=r.ae.kind,
                                 frame_pool=r.ae.frame_pool,
                                 median_windows=r.windows, config=cfg, pretrained=c.ckpt,
                                 epoch=epoch + 1), best_path)
        save_epoch(ckpt_path, model, r.opt, epoch + 1, best, cfg, d)
        log(dict(epoch=epoch + 1, loss=loss, valid=v), f"epoch {epoch + 1}/{c.epochs} | loss "
            f"{loss:.4f} | valid F1 {v['f1_intersection']:.3f} PSDS1 {v['psds1_exact']:.3f} | "
            f"best epoch {best['epoch']} | {time.time() - t_ep:.0f}s")
    if d.world > 1:
        dist.barrier()
    model.load_export(load_checkpoint(visible(best_path, d, "out_dir"))["model"])
    files = sorted(r.test)
    scores = predict_scores(model, len(files), scoring_loader(r.fs.test_audio, files, c, d), c,
                            d)
    if d.master:
        res, det = evaluate_sed(scores, files, r.classes, r.fs.test_tsv,
                                r.fs.test_durations_tsv, r.windows, TOKEN_S, c.n_thresholds,
                                c.threshold, plot_dir=r.out_dir,
                                title=f"{os.path.basename(r.out_dir)}:")
        write_table(os.path.join(r.out_dir, f"detections_{c.threshold:.2f}.tsv"),
                    list(det.columns), det.round(3).itertuples(index=False))
        res.update(record("sed", c.data, dataset_copy(r.root), c, d, r.ae, r.t0, cfg,
                          mode=c.mode, frame_pool=r.ae.frame_pool, classes=r.classes,
                          teacher=c.teacher or None,
                          best_epoch=best["epoch"], lr=c.lr))
        publish(res, os.path.join(r.out_dir, "result.json"), d, f"sed {c.data} | {r.ae.name} "
                f"{c.mode}{' + teacher' if c.teacher else ''} | PSDS1 {res['psds1']:.3f} PSDS2 "
                f"{res['psds2']:.3f} (psds_eval, {res['psds_eval_s']:.1f}s) | exact "
                f"{res['psds1_exact']:.3f} / {res['psds2_exact']:.3f} "
                f"({res['sed_scores_eval_s']:.1f}s) | F1 {res['f1_intersection']:.3f}")
    cleanup_distributed()


def detect(c):
    """--predict: events (filename, onset, offset, event_label) in files of any length and
    sample rate, with the SED checkpoint's classes and median windows (--median_window /
    --class_windows, when you set them, instead). A file is named by its path inside the
    folder given, or inside the deepest folder holding the files given (data.named_audio); an
    unreadable file is said and skipped, the others processed, and the exit status is then
    1."""
    device = pick_device(c.device)
    if c.out and os.path.isdir(c.out):
        raise UserError(f"--out {c.out} is a folder: give the TSV file to write")
    if c.out:
        check_writable(c.out, "out")
    named = named_audio(c.predict)  # a missing input is said before the model loads
    model = load_classifier(c.ckpt, device, expect=["atst-sed"])
    windows = model.median_windows
    if not windows or {"median_window", "class_windows"} & set(c.set_by_user):
        windows = median_windows(c.class_windows, model.classes, c.median_window)
    rows, failed = [], []
    for path, name in tqdm(named.items(), desc="detecting", unit=" files", leave=False):
        try:
            wav, n = load_audio(path, where="--predict")
        except AudioError as e:
            failed.append(path)
            tqdm.write(f"skipped: {e}", file=sys.stderr)
            continue
        rows += model.events(wav, name, n / SAMPLE_RATE, windows, c.threshold, c.dtype)
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
    cfg = configure(globals(), TABLES)
    if not cfg["ckpt"]:
        raise SystemExit("sed.py needs --ckpt (a pre-trained checkpoint, or with --predict an "
                         "SED checkpoint)")
    with user_errors():
        detect(SimpleNamespace(**cfg)) if cfg["predict"] else train(cfg)
