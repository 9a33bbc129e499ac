"""
What the downstream stages share (linear_eval.py, finetune.py, distill.py, sed.py): the start
(distributed preamble, the config print), the encoder they train or probe (a pre-trained
checkpoint, or the same shape with fresh weights: --random_init), the run folder (named,
locked, cleared of interrupted saves), resuming after the last finished epoch, and the fields
every result file starts with.
"""
import os
import signal
import time
from types import SimpleNamespace

from cluster import claim_out_dir, decide, setup_distributed, visible
from config import describe
from plumbing import UserError, load_checkpoint, save_atomic, save_json
from runtime import load_encoder, random_weights

EVAL_BATCH = 32  # clips per rank per batch where nothing is trained (caching, scoring)


def start(cfg):
    """(config namespace, Dist, start time): the preamble every stage runs first."""
    t0 = time.time()
    c = SimpleNamespace(**cfg)
    d = setup_distributed(c.device, c.dtype)
    d.print(describe(cfg))
    return c, d, t0


def start_encoder(c, d):
    """The pre-trained AudioEncoder of --ckpt or, with --random_init, the same shape with
    fresh weights (the baseline); a fine-tuned checkpoint is refused."""
    ae = load_encoder(c.ckpt, d.device, pretrained=True)
    if c.random_init:
        random_weights(ae, c.seed)
    return ae


def run_dir(c, d, stage, ae, *parts):
    """--out_dir, or out/<stage>_<data>_<kind>[_<parts>][_random], claimed for this job."""
    name = "_".join([stage, os.path.basename(c.data), ae.kind, *parts])
    return claim_out_dir(c.out_dir or os.path.join(
        "out", name + ("_random" if c.random_init else "")), d)


RUN_KEYS = ("ckpt", "teacher", "data", "mode", "frame_pool", "random_init", "seed")


def resume(path, model, opt, d, cfg):
    """(epochs done, best so far or None) from a run folder's ckpt.pt, loaded into model and
    optimizer on every rank (before DDP is built); (0, None) when the run starts afresh. Rank
    0 decides which. A folder of another run (another checkpoint, data, mode, ...: RUN_KEYS)
    is an error, not a silent continuation."""
    if not decide(lambda: os.path.exists(path), d):
        return 0, None
    ck = load_checkpoint(visible(path, d, "out_dir"))
    other = {k: (ck["config"].get(k), cfg.get(k)) for k in RUN_KEYS
             if ck["config"].get(k) != cfg.get(k)}
    if other:
        said = ", ".join(f"{k} {a!r}, this run {b!r}" for k, (a, b) in other.items())
        raise UserError(f"{path} is another run's ({said}): use another --out_dir")
    model.load_state_dict(ck["model"])
    try:
        opt.load_state_dict(ck["optimizer"])
    except ValueError as e:  # e.g. written when the mask token was still trained (it is not)
        raise UserError(f"{path}: its optimizer state does not fit this run's parameters ({e}); "
                        "finish it with the code that wrote it, or use another --out_dir") \
            from None
    d.print(f"resumed from {path} after epoch {ck['epoch']}")
    return ck["epoch"], ck["best"]


def save_epoch(path, model, opt, epoch, best, cfg, d):
    """The state resume() reads, after each finished epoch (rank 0, atomically)."""
    if d.master:
        save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                         best=best, config=cfg), path)
    if epoch == int(os.environ.get("ATST_DIE_AFTER_EPOCH", -1)):  # tests: a kill mid-run
        os.kill(os.getpid(), signal.SIGKILL)


def record(stage, dataset, copy, c, d, ae, t0, cfg, **fields):
    """A result file's fields: what ran on what (stage, dataset and its copy, checkpoint,
    kind, precision, baseline or not, seed), the stage's own fields, time and config."""
    return dict(stage=stage, dataset=dataset, dataset_copy=copy, checkpoint=c.ckpt,
                kind=ae.kind, precision=d.precision, random_init=c.random_init, seed=c.seed,
                **fields, elapsed_s=round(time.time() - t0, 1), config=cfg)


def publish(res, path, d, line):
    """Rank 0 writes the result file and prints its one line."""
    if d.master:
        save_json(res, path)
        d.print(f"{line} -> {path}")
