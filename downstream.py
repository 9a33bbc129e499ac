"""
What the downstream stages share (linear_eval.py, finetune.py, distill.py, sed.py): the start
(distributed preamble, the config print), the encoder they train or probe (a pre-trained
checkpoint, or the same shape with fresh weights: --random_init), the run folder (named,
locked, cleared of interrupted saves), resuming after the last finished epoch, and the fields
every result file starts with.
"""
import functools
import json
import os
import signal
import time
from types import SimpleNamespace

from cluster import claim_out_dir, decide, setup_distributed, visible
from config import describe
from plumbing import (UserError, default_data_root, digest, load_checkpoint, save_atomic,
                       save_json)
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
    """--out_dir, or out/<stage>_<data>_<kind>[_<parts>][_random], claimed for this job. A
    folder holding a run with other settings is refused now, before the data are read
    (from the summary save_epoch writes beside its checkpoint; resume() checks again)."""
    name = "_".join([stage, os.path.basename(c.data), ae.kind, *parts])
    out_dir = claim_out_dir(c.out_dir or os.path.join(
        "out", name + ("_random" if c.random_init else "")), d)
    path = os.path.join(out_dir, "ckpt.pt")
    then = decide(lambda: os.path.exists(path) and (_json(path + ".json") or {}).get(
        "settings"), d)
    if then:
        same_run(path, then, vars(c), d)
    return out_dir


def _json(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


# What may change when a run resumes: where and how fast it runs (a micro-batch splits the
# same batch; a cache holds exactly what it replaces) and how its values were given (a flag
# or a row), not what it trains
RUNTIME_KEYS = ("out_dir", "out", "num_workers", "device", "micro_batch", "cache", "cache_dir",
                "predict", "data_root", "set_by_user", "from_rows")


def settings(cfg):
    """What shapes a run's model and its reported result: every config value but RUNTIME_KEYS;
    a value naming a file by what it holds (the same checkpoint by another path or name is the
    same run, an overwritten one is not), one naming a folder by its real path (not read
    through: an audio folder), a named dataset with the root it was read from."""
    out = {k: (_held(os.path.realpath(v), os.stat(v).st_mtime_ns) if isinstance(v, str) and v
               and os.path.exists(v) else v) for k, v in cfg.items() if k not in RUNTIME_KEYS}
    if "data" in cfg and not os.path.exists(cfg["data"]):
        root = os.path.abspath(cfg.get("data_root") or default_data_root())
        out["data"] = f"{cfg['data']} in {root}"
    return json.loads(json.dumps(out, default=str))  # as the checkpoint's summary holds it


def same_run(path, then, cfg, d):
    """A UserError naming every setting in which the run saved at `path` (its settings
    `then`) and this one (cfg) differ."""
    now = decide(lambda: settings(cfg), d)
    other = {k: (then.get(k), now.get(k)) for k in {**then, **now} if then.get(k) != now.get(k)}
    if other:
        said = "; ".join(f"{k} {a!r}, this run {b!r}" for k, (a, b) in sorted(other.items()))
        raise UserError(f"{path} is another run's ({said}): use another --out_dir, or the "
                        "settings it was trained with")


@functools.lru_cache
def _held(path, mtime):
    """A file's digest, once per version of it (not at every epoch); a folder's real path."""
    return f"sha256 {digest(path)}" if os.path.isfile(path) else path


def resume(path, model, opt, d, cfg):
    """(epochs done, best so far or None) from a run folder's ckpt.pt, loaded into model and
    optimizer on every rank (before DDP is built); (0, None) when the run starts afresh. Rank
    0 decides which. A folder of a run with other settings (any value but RUNTIME_KEYS: a
    checkpoint, the data, lr, epochs, ...) is an error, not a silent continuation whose result
    file would name settings the model was not trained with."""
    if not decide(lambda: os.path.exists(path), d):
        return 0, None
    ck = load_checkpoint(visible(path, d, "out_dir"))
    same_run(path, ck.get("settings") or settings(ck["config"]), cfg, d)  # older: no settings
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
        made = settings(cfg)
        save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                         best=best, config=cfg, settings=made), path,
                    summary=dict(epoch=epoch, settings=made))
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
