"""
Run plumbing shared by every stage: precision, the one rule that seeds a step, schedules as
tensors, atomic checkpoints and result files, errors a user can fix, and the log. Nothing here
knows a model or a method (the config block: config.py) or other processes (cluster.py).
"""
import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Precision: bf16 autocast on CUDA by default, on the CPU when asked (--dtype bf16)


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


PARTIAL = re.compile(r"^\..+\.atst-partial-\d+$")  # write_atomic's temporary names, no other


def partial_name(path):
    """The temporary file write_atomic writes `path` through: .NAME.atst-partial-PID beside it
    (hidden; a name no user file is likely to have, so that clean-up removes ours alone)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.atst-partial-{os.getpid()}")


def remove_partials(folder, say=print):
    """Delete what saves interrupted by a kill left in `folder` (write_atomic's temporary
    names only, never a user's `notes.tmp`), and say each."""
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(folder)):
            if PARTIAL.match(name):
                os.remove(os.path.join(folder, name))
                say(f"removed {os.path.join(folder, name)}: a save interrupted by a kill")


def write_atomic(path, write, mode="wb"):
    """write(f) to a temporary file (partial_name), fsync, rename over path: every file we
    write goes through here (checkpoints, JSON, text, .npz, safetensors, FLAC). A failed write
    (a full disk, a quota, an I/O error: an OSError, or torch.save's RuntimeError around one)
    removes the temporary file, leaves any previous `path` as it was, and is one line naming
    the file."""
    tmp = partial_name(path)
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


def digest(path, chars=16):
    """What a file or folder holds, for telling runs apart: the sha256 of a file's bytes (as
    sha256sum prints it), or of a folder's file names and bytes (an exported model), its
    first `chars` hex digits; None when `path` names neither (a Hub id, a dataset name)."""
    if os.path.isdir(path):
        files = [(f, os.path.join(path, f)) for f in sorted(os.listdir(path))
                 if os.path.isfile(os.path.join(path, f)) and not PARTIAL.match(f)]
    elif os.path.isfile(path):
        files = [(None, path)]
    else:
        return None
    h = hashlib.sha256()
    for name, p in files:
        if name is not None:
            h.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:chars]


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


# What a checkpoint may hold besides tensors and plain containers, unpickled weights-only
# (torch's allowlist: nothing else is constructed, no code runs): the `args` Namespace of the
# DINO-style ATST-Clip and ASiT training checkpoints (R9, R18), numpy scalars (also under
# NumPy 1's name, which files saved with it carry) and dtypes
SAFE_GLOBALS = [argparse.Namespace, np.dtype, np._core.multiarray.scalar,
                (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                *(t for t in vars(np.dtypes).values() if isinstance(t, type))]


def load_checkpoint(path):
    """One of our (or a released) checkpoint files, on CPU, read weights-only: reading it never
    runs code it holds. A file that needs more than tensors, plain values and SAFE_GLOBALS, or
    that is unreadable, is an error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        said = " ".join(str(e).split("WeightsUnpickler error:", 1)[-1]
                        .split("Check the documentation")[0].split())
        refused = re.search(r"GLOBAL (\S+)", said)
        if refused:
            raise UserError(f"{path}: holds a Python object that a weights-only load refuses "
                            f"({refused.group(1)}): unpickling it could run code, so the file "
                            "is not read. Where you trust it, save its tensors alone (a dict of "
                            "state dicts) and load that") from None
        raise UserError(f"{path}: not a readable checkpoint (a truncated or foreign file? "
                        f"torch.load says: {said})") from None
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
