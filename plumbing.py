"""
Run plumbing shared by every stage: the config block of a script turned into --flags, the
distributed / precision preamble, the one rule that seeds a step, schedules as tensors, atomic
checkpoints and result files, and the log. Nothing here knows a model or a method.
"""
import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Config: the commented globals of a stage script become --flags


def str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def config_keys(g):
    """The config globals of a script: public int/float/bool/str values with lower-case names
    (UPPER_CASE names are constants, imported or not)."""
    return [k for k, v in g.items() if not k.startswith("_") and not k.isupper()
            and type(v) in (int, float, bool, str)]


def _parser(g, keys, helps, sections=None, defaults=True):
    """argparse for the config keys; with defaults (the real parser), --help groups the flags
    by the section comments of the config block (`# I/O`, `# model`, ...)."""
    p = argparse.ArgumentParser(description=g.get("__doc__", "").split("\n\n")[0].strip(),
                                add_help=defaults,
                                argument_default=None if defaults else argparse.SUPPRESS)
    groups = {}
    for k in keys:
        typ = str2bool if type(g[k]) is bool else type(g[k])
        kw = dict(default=g[k], help=(helps.get(k, "") + f" (default {g[k]!r})")
                  .replace("%", "%%")) if defaults else {}
        name = (sections or {}).get(k)
        where = p if name is None else groups.setdefault(name, p.add_argument_group(name))
        where.add_argument(f"--{k}", type=typ, **kw)
    return p


def configure(g, tables=None, implies=None, argv=None, help_files=()):
    """Expose every int/float/bool/str global of a script as --name (the type of its default,
    help = the comment on its line) and resolve the run's config. Lowest to highest precedence:

    1. the config block as shipped;
    2. per table {key: rows}: the row named by the value of `key` (a preset, a task's
       settings); every row lists the same names, and the first row repeats the config block
       as shipped, so a global that differs from it was edited in the script;
    3. a global edited in the script;
    4. a flag.
    implies {name: {other: value}}: when `name` is set by an edit or a flag and `other` is
    not, `other` takes `value` (e.g. setting epochs clears max_steps). --help shows the values
    this command line would run with. Updates the globals; returns the config dict, whose
    `set_by_user` lists the names set by an edit or a flag. help_files: more sources of
    comments (a script that extends another's config)."""
    keys, tables, implies = config_keys(g), tables or {}, implies or {}
    helps, sections = {}, {}
    for path in (*help_files, g["__file__"]):
        section = None
        with open(path) as f:
            for line in f:
                m = re.match(r"^(\w+)\s*=(.*?#\s*(.*))?", line)
                if m:
                    helps[m.group(1)] = m.group(3) or ""
                    sections[m.group(1)] = section
                header = re.match(r"^# (\w.*)$", line)  # a section comment starts a group
                keep = m or line.startswith(" ")                  # an assignment or its comment
                section = header.group(1) if header else section if keep else None
    argv = sys.argv[1:] if argv is None else argv
    given = vars(_parser(g, keys, helps, defaults=False).parse_known_args(argv)[0])
    edited = {k for rows in tables.values() for k, v in next(iter(rows.values())).items()
              if g[k] != v}
    for key, rows in tables.items():
        assert all(r.keys() == next(iter(rows.values())).keys() for r in rows.values()), key
        value = given.get(key, g[key])
        if key == "preset" and value not in rows:
            raise SystemExit(f"--preset {value!r}: choose one of {sorted(rows)}")
        g.update({k: v for k, v in rows.get(value, {}).items() if k not in edited})
    g.update(given)
    by_user = edited | set(given)
    for name, others in implies.items():
        if name in by_user:
            g.update({k: v for k, v in others.items() if k not in by_user})
    g.update(vars(_parser(g, keys, helps, sections).parse_args(argv)))  # --help, flags, types
    return dict({k: g[k] for k in keys}, set_by_user=sorted(by_user))


def describe(cfg):
    """The config line every stage prints at start."""
    line = " ".join(f"{k}={v}" for k, v in cfg.items() if k != "set_by_user")
    return f"config: {line}" + (f"\nset by you (edit or flag): {', '.join(cfg['set_by_user'])}"
                                if cfg.get("set_by_user") else "")

# ----------------------------------------------------------------------------------------------
# Distributed and precision preamble: torchrun -> nccl on CUDA, gloo on CPU; bf16 autocast on
# CUDA by default, on the CPU when asked (--dtype bf16)


@dataclass
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device
    master: bool
    ctx: object        # autocast context: bf16, or a no-op for fp32
    precision: str     # "bf16" | "fp32", what ctx runs (recorded in result files)

    def print(self, *a, **k):
        if self.master:
            print(*a, **k, flush=True)


PRECISIONS = ("auto", "bf16", "fp32")  # the `dtype` flag of every stage


def precision(device, dtype="auto"):
    """The precision a run on `device` uses: dtype "auto" is bf16 on CUDA and fp32 elsewhere;
    "bf16" runs the same autocast on the CPU too (the tests run the GPU's dtype paths that way)."""
    if dtype not in PRECISIONS:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(PRECISIONS)}")
    return "bf16" if dtype == "bf16" or (dtype == "auto" and device.type == "cuda") else "fp32"


def autocast(device, dtype="auto"):
    """bf16 autocast on `device` when precision(device, dtype) is bf16; else a no-op."""
    if precision(device, dtype) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_distributed(device="auto", dtype="auto"):
    cuda = torch.cuda.is_available() and device != "cpu"
    rank, local, world = 0, 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
        torch.set_float32_matmul_precision("high")
    else:
        dev = torch.device("cpu")
    return Dist(rank, local, world, dev, rank == 0, autocast(dev, dtype), precision(dev, dtype))


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model, d):
    """SyncBatchNorm (CUDA) and DistributedDataParallel under torchrun; the module itself on
    one process. Returns (the raw module, what the step calls)."""
    if d.world == 1:
        return model, model
    if d.device.type == "cuda":  # SyncBatchNorm raises on CPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def my_shard(n, d):
    """Indices of n items this rank handles (round robin)."""
    return list(range(d.rank, n, d.world))


def gather_shards(mine, x, n, d):
    """Reassemble per-rank rows (x computed for indices `mine`) into all n rows, on CPU."""
    if d.world == 1:
        return x
    parts = [None] * d.world
    dist.all_gather_object(parts, (mine, x.cpu()))
    full = torch.zeros(n, *x.shape[1:], dtype=x.dtype)
    for idx, part in parts:
        full[idx] = part
    return full


def all_mean(x, d):
    """Mean of a float tensor over ranks (a no-op on one process)."""
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def step_seed(seed, step, rank):
    """The seed of every random draw of one optimizer step on one rank (drop-path, masks,
    augmentations): a resumed run draws what an uninterrupted one drew."""
    return (seed * 1_000_003 + step) * 1024 + rank

# ----------------------------------------------------------------------------------------------
# Schedules: tensors built once, indexed by step


def cosine_schedule(start, end, total_steps, warmup_steps=0, warmup_from=0.0):
    """Tensor of total_steps + 1 values indexed by step: linear warmup from `warmup_from` to
    `start` over warmup_steps, then cosine from `start` to `end` at the last step."""
    warm = torch.linspace(warmup_from, start, warmup_steps + 1)[:-1] if warmup_steps else \
        torch.zeros(0)
    n = total_steps - warmup_steps
    t = torch.arange(n + 1, dtype=torch.float64) / max(n, 1)
    cos = end + (start - end) * (1 + torch.cos(math.pi * t)) / 2
    return torch.cat([warm.double(), cos])


def ema_schedule(m0, total_steps):
    """EMA momentum: m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2, from m0 to 1 (SPEC 3)."""
    return cosine_schedule(m0, 1.0, total_steps)

# ----------------------------------------------------------------------------------------------
# Checkpoints, result files and logs: written atomically (temporary file, fsync, rename)


def _atomic(path, write, mode):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_atomic(obj, path, summary=None):
    """torch.save that a killed run never leaves torn; `summary` (JSON-able) is written beside
    it as PATH.json for people."""
    _atomic(path, lambda f: torch.save(obj, f), "wb")
    if summary is not None:
        save_json(summary, path + ".json")


def save_json(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic(path, lambda f: json.dump(obj, f, indent=1, default=str), "w")


def save_text(text, path):
    _atomic(path, lambda f: f.write(text), "w")


class UserError(RuntimeError):
    """Bad input a user can fix (a file, a flag): stages print its one line and exit 1."""


@contextlib.contextmanager
def user_errors():
    """Around a stage's main: a UserError, also one re-raised from a DataLoader worker with its
    traceback in the message, ends the run with its own last line, not a traceback."""
    try:
        yield
    except UserError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        msg = lines[-1] if lines else type(e).__name__
        msg = msg.split("Error: ", 1)[-1] if "Traceback" in str(e) else msg
        tqdm.write(f"error: {msg}", file=sys.stderr)  # on a line of its own, above any bar
        raise SystemExit(1) from None


def load_checkpoint(path):
    """torch.load of one of our (or a released) checkpoint files, on CPU; an unreadable file
    is an error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint (a truncated or foreign file? "
                        f"torch.load says: {type(e).__name__}: {e})") from None


def clean_partial_writes(out_dir):
    """Remove what saves interrupted by a kill left behind (save_atomic's temporary files);
    returns their paths. Call before anything of this run writes."""
    stale = glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*"))
    for p in stale:
        os.remove(p)
    return stale


def warmup_steps(warmup_epochs, per_epoch, total, say=print):
    """Steps of linear lr warmup. A warmup that would reach the last step (the lr would never
    decay) is cut to a tenth of the run, and said."""
    warmup = int(warmup_epochs * per_epoch)
    if warmup >= total and warmup > 0:
        say(f"warning: a warmup of {warmup_epochs:g} epochs ({warmup} steps) reaches the last "
            f"step ({total}); warming up over {total // 10} steps (a tenth of the run) instead. "
            "Set --warmup_epochs to choose.")
        warmup = total // 10
    return warmup


class Log:
    """One fixed-format line per interval on rank 0, plus the same fields in out_dir/log.jsonl.
    A record is a dict; the line shows its fields in order, `name value`. resume=(key, value):
    a resumed run first drops the records past its checkpoint (rec[key] > value), which the
    run it resumes wrote after saving, so that every step is logged once."""

    def __init__(self, out_dir, master, resume=None):
        self.path = os.path.join(out_dir, "log.jsonl") if master else None
        if self.path and resume and os.path.exists(self.path):
            key, upto = resume
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)[key] <= upto]
            save_text("".join(keep), self.path)

    def __call__(self, rec, line=None):
        if self.path is None:
            return
        tqdm.write(line or " | ".join(f"{k} {_fmt(v)}" for k, v in rec.items()))
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
