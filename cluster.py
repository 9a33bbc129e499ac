"""
The run across processes and nodes: how it was launched (torchrun, or srun's tasks), the
device of each process and the process group, DDP, the one answer every rank shares (rank 0
decides "is it there / is it done / where to resume"; work over many files split over the
ranks; an error on one rank stops them all), gradient accumulation, and the run folder every
rank writes to, with its job-aware lock. Precision, schedules, files, the log: plumbing.py.
"""
import atexit
import contextlib
import datetime
import json
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plumbing import UserError, autocast, check_writable, precision, remove_partials

# ----------------------------------------------------------------------------------------------
# Launch, devices, the process group: torchrun or srun -> nccl on CUDA, gloo on the CPU (so
# every DDP path runs on a laptop); bf16 autocast on CUDA by default (plumbing.precision)


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


DEVICES = ("auto", "cpu", "cuda")  # the `device` flag of every stage


def pick_device(device="auto", local_rank=0, local_world=1):
    """The torch device a run asked for: auto (CUDA when torch sees it, else the CPU), cpu, or
    cuda, which is an error, before any data is read, when torch sees no CUDA device (a node
    whose driver failed must not train on its CPU for days). A process that sees one GPU and
    shares it with no other process of its launcher on the node (local_world 1: a scheduler
    that binds one GPU per task) uses it whatever its local rank; otherwise each takes the GPU
    of its local rank (torchrun, one process per GPU), and more processes than GPUs is an
    error."""
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    seen = torch.cuda.is_available()
    count = torch.cuda.device_count() if seen else 0
    if device == "cpu" or (device == "auto" and not count):
        return torch.device("cpu")
    index = 0 if count == 1 and local_world == 1 else local_rank
    if index >= count:
        sees = f"{count} CUDA devices" if count else "no CUDA device"
        raise UserError(f"--device {device}, but torch sees {sees} for local rank {local_rank}: "
                        f"torch.cuda.is_available() is {seen}, torch.cuda.device_count() is "
                        f"{count} (torch {torch.__version__}, built for CUDA {torch.version.cuda}"
                        f", CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
                        "); " + ("start at most one process per GPU (--nproc_per_node), or bind "
                                 "one GPU per task" if count else
                                 "check the node's driver, or pass --device cpu"))
    return torch.device(f"cuda:{index}")


def launch_env(env=os.environ):
    """(rank, local rank, world size, launcher) of this process. torchrun sets RANK,
    LOCAL_RANK and WORLD_SIZE. A task of an srun step of several tasks without torchrun (`srun
    python pretrain_frame.py`) has SLURM's SLURM_PROCID, SLURM_LOCALID and
    SLURM_STEP_NUM_TASKS (set by srun, not in a batch script's own shell, which is one
    process); its rendezvous is MASTER_ADDR:MASTER_PORT when set, else the step's first node
    and a port derived from the job id (launch_env sets them). Anything else is one process."""
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), \
            "torchrun"
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", 1))
    if tasks > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        env.setdefault("MASTER_ADDR", first_host(nodes))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), tasks, "srun"
    return 0, 0, 1, None


def first_host(nodelist):
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    first = re.match(r"[^,\[]*(\[[^\]]*\])?[^,]*", nodelist).group(0)
    m = re.match(r"([^\[]*)\[([^\],-]*)[^\]]*\](.*)", first)
    return m.group(1) + m.group(2) + m.group(3) if m else first


def setup_distributed(device="auto", dtype="auto"):
    """The process group of this run (launch_env: torchrun, or srun's tasks) -> Dist; nccl on
    CUDA, gloo on the CPU, one process without a group. Says which device and precision it
    chose."""
    rank, local, world, launcher = launch_env()
    # torchrun's processes of a node see the same GPUs; srun's tasks may each be bound to one
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launcher == "torchrun" else 1
    dev = pick_device(device, local, local_world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.set_float32_matmul_precision("high")
    if launcher:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
        atexit.register(cleanup_distributed)  # also when a stage stops early on every rank
        # (a group left to the interpreter's exit aborts the process)
    d = Dist(rank, local, world, dev, rank == 0, autocast(dev, dtype), precision(dev, dtype))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        "CUDA not available" if device == "auto" else "asked for"
    d.print(f"device {dev} ({name}), {d.precision}" + (
        f", {world} ranks ({launcher})" if world > 1 else ""))
    return d


def workers(n=-1):
    """DataLoader workers per process: n, or for -1 the CPUs this process may use (its
    affinity: what SLURM's --cpus-per-task or a container grants) shared by the processes of
    its node (LOCAL_WORLD_SIZE under torchrun), less the one the process itself runs on;
    at least 1."""
    if n >= 0:
        return n
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model, d):
    """SyncBatchNorm (CUDA) and DistributedDataParallel under torchrun; the module itself on
    one process. Returns (the raw module, what the step calls). Wrap after loading a
    checkpoint: DDP starts every rank from rank 0's weights. Parameters that do not train
    must have requires_grad False (frozen or unused ones would stall DDP's reducer)."""
    if d.world == 1:
        return model, model
    if d.device.type == "cuda":  # SyncBatchNorm raises on CPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def my_shard(n, d):
    """Indices of n items this rank handles (round robin; none on a rank past the last)."""
    return list(range(d.rank, n, d.world))


def gather_shards(mine, parts, n, d):
    """All n rows, on the CPU, from every rank's `parts` (a list of (k, ...) tensors computed
    for the indices `mine`; empty on a rank whose shard is empty)."""
    x = torch.cat(parts).cpu() if parts else None
    if d.world == 1:
        return x
    got = [None] * d.world
    dist.all_gather_object(got, (mine, x))
    like = next(part for _, part in got if part is not None)
    full = torch.zeros(n, *like.shape[1:], dtype=like.dtype)
    for idx, part in got:
        if part is not None:
            full[idx] = part
    return full


def all_mean(x, d):
    """Mean of a float tensor over ranks (a no-op on one process)."""
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


# ----------------------------------------------------------------------------------------------
# One answer for every rank: rank 0 decides "is it there / is it done / where do we resume",
# work over many files is split over the ranks, and an error on any rank stops them all


def decide(question, d):
    """question() asked on rank 0 only, its answer returned on every rank (d None: one
    process). A UserError it raises is raised on every rank; another exception on rank 0
    stops the others with one line (rank 0 shows the traceback)."""
    if d is None or d.world == 1:
        return question()
    box = [None]
    if d.master:
        try:
            box = [("answer", question())]
        except UserError as e:
            box = [("error", e)]
        except BaseException:
            dist.broadcast_object_list([("crash", None)])
            raise
    dist.broadcast_object_list(box)
    what, value = box[0]
    if what == "crash":
        raise SystemExit(f"rank {d.rank}: rank 0 failed (its traceback says why)")
    if what == "error":
        raise value
    return value


def together(fn, d):
    """fn() on every rank, its result. A UserError (or an OSError) on any rank is raised on
    every rank: a rank that cannot go on never leaves the others waiting in a collective."""
    out, err = None, None
    try:
        out = fn()
    except UserError as e:
        err = e
    except OSError as e:  # a file gone since it was listed, a filesystem's error
        err = UserError((f"rank {d.rank} on {socket.gethostname()}: " if d and d.world > 1
                         else "") + str(e))
    if d is not None and d.world > 1:
        errs = [None] * d.world
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e is not None), None)
    if err is not None:
        raise err
    return out


def shared_work(items, fn, d=None):
    """[fn(x) for x in items] on every rank, each item done by one rank (round robin) and the
    answers gathered: a question about many files (is it there? how long?) asked once in the
    job, not once per rank (d None: one process). Errors as together()."""
    if d is None or d.world == 1:
        return [fn(x) for x in items]
    mine = together(lambda: [fn(x) for x in items[d.rank::d.world]], d)
    got = [None] * d.world
    dist.all_gather_object(got, mine)
    out = [None] * len(items)
    for r, vals in enumerate(got):
        out[r::d.world] = vals
    return out


def must_see(check, what, d, flag):
    """Every rank but rank 0 sees `what` (check() true now or within a few seconds: a network
    filesystem shows another node's new file once its attribute cache expires); else every
    rank stops with one line saying that --flag must be a shared folder."""
    def look():
        for i in range(5):
            if i:
                time.sleep(1.0)
            if d.master or check():
                return
        raise UserError(f"rank {d.rank} on {socket.gethostname()} does not see {what}: with "
                        f"several nodes, --{flag} must be a folder every node sees (a shared "
                        "filesystem), not node-local scratch or a relative path in a node-local "
                        "folder")
    together(look, d)


def check_shared(folder, d, flag):
    """Every rank sees what rank 0 writes in `folder` (rank 0's answers name files there): a
    probe file rank 0 writes and removes; one line naming the flag otherwise."""
    if d.world == 1:
        return
    probe = os.path.join(folder, f".shared_check_{decide(lambda: secrets.token_hex(8), d)}")
    if d.master:
        open(probe, "w").close()
    dist.barrier()
    try:
        must_see(lambda: os.path.exists(probe), f"{folder} as rank 0 does", d, flag)
    finally:
        if d.master:
            os.remove(probe)


def visible(path, d, flag):
    """`path`, which rank 0 found, is there for every rank too (must_see); returns it."""
    must_see(lambda: os.path.exists(path), f"{path}, which rank 0 found", d, flag)
    return path


def split_batch(batch, micro, d, flag="batch_size"):
    """(clips per rank in one forward, accumulation steps) of a global batch: batch = micro x
    ranks x accumulation steps, micro 0 = the whole per-rank share (no accumulation); else one
    line naming the flags."""
    micro = micro or batch // d.world
    accum = batch // (micro * d.world) if micro else 0
    if not accum or accum * micro * d.world != batch:
        raise UserError(f"--{flag} {batch} is not --micro_batch {micro} x {d.world} ranks x a "
                        "whole number of accumulation steps (README 'Several nodes': the GPU "
                        "counts a batch allows)")
    return micro, accum


def accumulate(ddp, accum, d, loss_of):
    """The gradients of one optimizer step over accum micro-batches: loss_of(k) runs the
    forward of micro-batch k (through `ddp`) and returns its loss; each loss / accum is
    backpropagated, DDP all-reducing the gradients after the last one only. Returns the loss
    averaged over the micro-batches and the ranks (the same number on every rank, so that a
    non-finite one stops them all)."""
    total = torch.zeros((), device=d.device)
    for k in range(accum):
        with ddp.no_sync() if d.world > 1 and k < accum - 1 else contextlib.nullcontext():
            loss = loss_of(k)
            (loss / accum).backward()
        total += loss.detach()
    return all_mean(total / accum, d).item()

# ----------------------------------------------------------------------------------------------
# The run folder: written by rank 0, read by every rank, locked for one job at a time


LOCK = "run.lock"


def claim_out_dir(out_dir, d, flag="out_dir"):
    """Make out_dir this job's: writable, locked, seen alike by every rank, and cleared of what
    saves interrupted by a kill left behind (write_atomic's temporary names alone). The lock,
    out_dir/run.lock, holds host, pid, command and job (job_id); a second job on the same
    folder stops at once naming the holder. A lock the holder left behind is taken over, and
    said: one of a process of this host that no longer runs (a killed job), or one of an
    earlier start of this job (a requeue, a restart) on any host. A lock of another job on
    another host cannot be checked: the run stops and says how to clear it. Every rank reads
    rank 0's lock back, so a folder that is not shared between the nodes stops the run here.
    The lock is removed when the job exits."""
    together(lambda: check_writable(out_dir, flag, folder=True), d)
    token, note = decide(lambda: _lock(out_dir), d)
    must_see(lambda: _holder(os.path.join(out_dir, LOCK)).get("token") == token,
             f"the lock rank 0 took in {out_dir}", d, flag)
    if d.master:
        if note:
            print(note)
        remove_partials(out_dir)
    return out_dir


def job_id(env=os.environ):
    """(what names this job across its restarts, which start of it this is): SLURM's job id
    and SLURM_RESTART_COUNT (a requeue keeps the id and counts up), else torchrun's rendezvous
    id (--rdzv_id; not its default 'none'; --standalone draws a new one at every launch) and
    TORCHELASTIC_RESTART_COUNT; ('', 0) otherwise."""
    if env.get("SLURM_JOB_ID"):
        return f"slurm {env['SLURM_JOB_ID']}", int(env.get("SLURM_RESTART_COUNT") or 0)
    run = env.get("TORCHELASTIC_RUN_ID", "none")
    return ("", 0) if run == "none" else (f"torchrun {run}",
                                          int(env.get("TORCHELASTIC_RESTART_COUNT") or 0))


def _holder(path):
    """The lock file's record ({} when absent, torn or unreadable)."""
    try:
        with open(path) as f:
            held = json.load(f)
        return held if isinstance(held, dict) else {}
    except (OSError, ValueError):
        return {}


def _lock(out_dir):
    """Take out_dir's lock: (its token, a note of a lock taken over or None); a UserError when
    another job holds it. A lock file without a readable holder (a job killed as it wrote it)
    counts as left behind."""
    path, host, (job, restart) = os.path.join(out_dir, LOCK), socket.gethostname(), job_id()
    me = dict(host=host, pid=os.getpid(), since=datetime.datetime.now().isoformat(
        timespec="seconds"), command=" ".join(sys.argv), job=job, restart=restart,
        token=secrets.token_hex(8), started=_started(os.getpid()))
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            held = _holder(path)
            holder = (f"pid {held.get('pid')} on {held.get('host')} since {held.get('since')} "
                      f"({held.get('command', '?')}" + (f"; job {held['job']}" if held.get(
                          "job") else "") + ")")
            # a later start of the same job (a requeue, an elastic restart) may take it over
            # wherever the earlier one ran; a concurrent one (the same count) may not
            same_job = bool(job) and held.get("job") == job and held.get("restart", 0) < restart
            here = held.get("host") == host
            if held and not here and not same_job:
                raise UserError(f"{out_dir} is in use by {holder}; if that job is gone, "
                                f"delete {path}" + (" (squeue -j " + held["job"].split()[1] +
                                                     " lists it while it runs)"
                                                     if held.get("job", "").startswith("slurm")
                                                     else ""))
            if held and here and held.get("pid") != os.getpid() and _alive(held):
                raise UserError(f"{out_dir} is in use by {holder}: use another --out_dir (if "
                                f"pid {held.get('pid')} is not that run, its number reused "
                                f"since, delete {path})")
            os.remove(path)
            note = f"took over {path} from " + (
                "a torn lock" if not held else f"{holder}, an earlier start of this job"
                if same_job and not here else f"{holder}, which no longer runs")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(_unlock, path, me["token"])
        return me["token"], note
    raise UserError(f"could not take {path}: another job is taking it")


def _started(pid):
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None
    where /proc does not say: with the pid, it names one process, whose number may be reused."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, TypeError, IndexError):
        return None


def _alive(held):
    """The lock holder's process still runs: its pid is live and, where both are known, started
    when the holder's did (else the number was reused: a reboot, a restarted container)."""
    pid = held.get("pid")
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # another user's live process
        pass
    then, now = held.get("started"), _started(pid)
    return then is None or now is None or then == now


def _unlock(path, token):
    if _holder(path).get("token") == token:  # still ours, not a later start's
        with contextlib.suppress(OSError):
            os.remove(path)

