"""
Run plumbing shared by every stage: the distributed / precision preamble, the one rule that
seeds a step, schedules as tensors, atomic checkpoints and result files, the run folder's
lock, and the log. Nothing here knows a model or a method (the config block: config.py).
"""
import atexit
import contextlib
import csv
import datetime
import glob
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

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


DEVICES = ("auto", "cpu", "cuda")  # the `device` flag of every stage
WORKERS = min(4, os.cpu_count() or 1)  # default DataLoader workers: 4, or the cores when fewer


def pick_device(device="auto", local_rank=0):
    """The torch device a run asked for: auto (CUDA when torch sees it, else the CPU), cpu, or
    cuda, which is an error, before any data is read, when torch sees no CUDA device for this
    local rank (a node whose driver failed must not train on its CPU for days)."""
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    seen = torch.cuda.is_available()
    count = torch.cuda.device_count() if seen else 0
    if device == "cuda" and local_rank >= count:
        raise UserError(f"--device cuda, but torch sees no CUDA device for local rank "
                        f"{local_rank}: torch.cuda.is_available() is {seen}, "
                        f"torch.cuda.device_count() is {count} (torch {torch.__version__}, "
                        f"built for CUDA {torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); check the node's "
                        "driver, or pass --device cpu")
    return torch.device(f"cuda:{local_rank}" if seen and device != "cpu" else "cpu")


def setup_distributed(device="auto", dtype="auto"):
    """torchrun's environment -> Dist; nccl on CUDA, gloo on the CPU. Says which device and
    precision it chose."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local)
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
        rank, world = dist.get_rank(), dist.get_world_size()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.set_float32_matmul_precision("high")
    d = Dist(rank, local, world, dev, rank == 0, autocast(dev, dtype), precision(dev, dtype))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        "CUDA not available" if device == "auto" else "asked for"
    d.print(f"device {dev} ({name}), {d.precision}" + (f", {world} ranks" if world > 1 else ""))
    return d


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


def ema_schedule(m0, total_steps, ramp="cosine"):
    """EMA momentum from m0 at step 0 to 1 at the last: cosine, m = 1 - (1 - m0) (1 + cos(pi
    t / T)) / 2 (R3, R16), or linear."""
    if ramp == "linear":
        return torch.linspace(m0, 1.0, total_steps + 1, dtype=torch.float64)
    if ramp != "cosine":
        raise SystemExit(f"error: --ema_ramp {ramp!r}: cosine or linear")
    return cosine_schedule(m0, 1.0, total_steps)

# ----------------------------------------------------------------------------------------------
# Checkpoints, result files and logs: written atomically (temporary file, fsync, rename)


def write_atomic(path, write, mode="wb"):
    """write(f) to a temporary file, fsync, rename over path: every file we write goes through
    here (checkpoints, JSON, text, .npz, safetensors, FLAC). A failed write (a full disk, a
    quota, an I/O error: an OSError, or torch.save's RuntimeError around one) removes the
    temporary file, leaves any previous `path` as it was, and is one line naming the file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else \
            str(e).strip().splitlines()[-1]
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise UserError(f"could not write {path}: {why} ({free / 2**30:.2f} GiB free there); "
                        + ("the previous file is unchanged" if os.path.exists(path) else
                           "nothing was written")) from None


def save_atomic(obj, path, summary=None):
    """torch.save that a killed run never leaves torn; `summary` (JSON-able) is written beside
    it as PATH.json for people."""
    write_atomic(path, lambda f: torch.save(obj, f))
    if summary is not None:
        save_json(summary, path + ".json")


def save_json(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: json.dump(obj, f, indent=1, default=str), "w")


def save_text(text, path):
    write_atomic(path, lambda f: f.write(text), "w")


def write_table(path, header, rows):
    """A CSV manifest or, for a .tsv path (or an open file), a DESED-style TSV: header, rows."""
    if not isinstance(path, str):
        return _write_rows(path, "\t", header, rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: _write_rows(f, "," if path.endswith(".csv") else "\t", header,
                                             rows), "w")


def _write_rows(f, delimiter, header, rows):
    w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)


def default_data_root():
    """Where named datasets and the demo live: $ATST_DATA, else ./data."""
    return os.environ.get("ATST_DATA", "data")


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


def check_writable(path, flag, folder=False):
    """`path` (a folder, or a file's folder) can be written now: said before the work, not
    after it."""
    where = path if folder else os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(where, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        up = where
        while not os.path.exists(up):
            up = os.path.dirname(up)
        why = f"{up} is a file, not a folder" if not os.path.isdir(up) else e.strerror or e
        raise UserError(f"--{flag} {path}: cannot write there ({why})") from None


LOCK = "run.lock"


def claim_out_dir(out_dir, d, flag="out_dir"):
    """Make out_dir this job's: writable, locked, and cleared of what saves interrupted by a
    kill left behind (save_atomic's temporary files). The lock, out_dir/run.lock, holds host,
    pid and command; a second job on the same folder stops at once naming the holder. A lock
    left by a process of this host that no longer runs (a killed job) is taken over, and said.
    A lock from another host (a shared filesystem) cannot be checked: the job stops and says to
    delete the lock if that job is gone. The lock is removed when the job exits."""
    check_writable(out_dir, flag, folder=True)
    err, note = _lock(out_dir) if d.master else (None, None)
    if d.world > 1:  # every rank stops, not only rank 0
        box = [err]
        dist.broadcast_object_list(box)
        err = box[0]
    if err:
        raise UserError(err)
    if d.master:
        if note:
            print(note)
        for p in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp*")):
            os.remove(p)
            print(f"removed {p}: a save interrupted by a kill")
    return out_dir


def _lock(out_dir):
    """Take out_dir's lock: (error or None, note of a stale lock taken over or None). A lock
    file without a readable holder (a job killed as it wrote it) counts as stale."""
    path, host = os.path.join(out_dir, LOCK), socket.gethostname()
    me = dict(host=host, pid=os.getpid(), since=datetime.datetime.now().isoformat(
        timespec="seconds"), command=" ".join(sys.argv))
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    held = json.load(f)
            except (OSError, ValueError):
                held = {}
            holder = (f"pid {held.get('pid')} on {held.get('host')} since {held.get('since')} "
                      f"({held.get('command', '?')})")
            if held and held.get("host") != host:
                return (f"{out_dir} is in use by {holder}; if that job is gone, delete {path}",
                        None)
            if held and _alive(held.get("pid")):
                return f"{out_dir} is in use by {holder}: use another --out_dir", None
            os.remove(path)  # a killed run's lock, on this host
            note = f"took over {path} from {holder if held else 'a torn lock'}, which no " \
                "longer runs"
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(_unlock, path, os.getpid())
        return None, note
    return f"could not take {path}: another job is taking it", None


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _unlock(path, pid):
    try:
        with open(path) as f:
            if json.load(f).get("pid") == pid:
                os.remove(path)
    except (OSError, ValueError):
        pass


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
