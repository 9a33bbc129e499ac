"""plumbing.py: config flags and their precedence and ranges, schedules, atomic files, the
device, the out_dir lock, a full disk."""
import errno
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import plumbing as P
from conftest import HERE


def test_schedules_hit_end_points():
    lr = P.cosine_schedule(1e-3, 1e-6, 1000, warmup_steps=100)
    assert len(lr) == 1001 and lr[0] == 0 and math.isclose(lr[100].item(), 1e-3)
    assert math.isclose(lr[-1].item(), 1e-6) and (lr[:101].diff() > 0).all()
    assert (lr[100:].diff() <= 0).all()
    wd = P.cosine_schedule(0.04, 0.4, 500)
    assert math.isclose(wd[0].item(), 0.04) and math.isclose(wd[-1].item(), 0.4)
    m = P.ema_schedule(0.996, 500)
    assert math.isclose(m[0].item(), 0.996) and m[-1].item() == 1.0 and (m.diff() >= 0).all()
    assert math.isclose(m[250].item(), 1 - 0.004 / 2, rel_tol=1e-9)  # half way: cos = 0


def test_atomic_files_leave_no_temporaries_and_bad_files_are_named(tmp_path):
    path = str(tmp_path / "ck.pt")
    P.save_atomic(dict(w=torch.ones(3)), path, summary=dict(step=3))
    P.save_json(dict(a=1), str(tmp_path / "r" / "result.json"))
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "ck.pt.json", "r"]
    assert torch.equal(P.load_checkpoint(path)["w"], torch.ones(3))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(P.UserError, match="junk.pt: not a readable checkpoint"):
        P.load_checkpoint(str(tmp_path / "junk.pt"))


def test_warmup_that_would_outlast_the_run_is_cut_and_said():
    said = []
    assert P.warmup_steps(4.0, 8, 300, said.append) == 32 and not said
    assert P.warmup_steps(4.0, 375, 300, said.append) == 30          # 1500 >= 300 steps
    assert "reaches the last step (300); warming up over 30 steps" in said[0]
    assert P.warmup_steps(4.0, 1, 1, said.append) == 0 and len(said) == 2  # a one-step run
    assert P.warmup_steps(0.0, 8, 1, said.append) == 0 and len(said) == 2


def test_user_errors_end_with_one_line(capsys):
    """A UserError, also as a DataLoader re-raises it (the worker's traceback in its message),
    ends the run (exit 1) with its own last line."""
    with pytest.raises(SystemExit) as e:
        with P.user_errors():
            raise P.UserError("Caught AudioError in DataLoader worker process 0.\nOriginal "
                              "Traceback (most recent call last):\n  File \"data.py\", line 1"
                              "\ndata.AudioError: m.csv line 3: audio file not found: x.wav\n")
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: m.csv line 3: audio file not found: x.wav\n"
    with pytest.raises(SystemExit):
        with P.user_errors():
            raise P.UserError("plain")
    assert capsys.readouterr().err == "error: plain\n"


# ---------------------------------------------------------------- what a cluster job meets


def one_line_error(p):
    """The last stderr line of a stage that stopped on bad input: exit 1, no traceback."""
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])
    return p.stderr.strip().splitlines()[-1]


def test_a_device_asked_for_and_absent_stops_at_start(monkeypatch, tmp_path):
    """--device cuda on a node where torch sees no CUDA is an error before anything is read
    (the checkpoint named does not even exist), saying what torch sees; auto says what it
    chose."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "linear_eval.py", "--device", "cuda", "--ckpt",
                        str(tmp_path / "nothing.pt")], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=120)
    line = one_line_error(p)
    assert "--device cuda" in line and "torch.cuda.is_available() is False" in line
    assert "device_count() is 0" in line and "nothing.pt" not in p.stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(P.UserError, match="choose one of auto, cpu, cuda"):
        P.pick_device("gpu")
    assert P.pick_device("auto") == torch.device("cpu")


def test_second_job_on_an_out_dir_stops_and_a_dead_jobs_lock_is_taken_over(tmp_path, capsys):
    """A live holder (here a sleeping process of this host) stops a second job at once, named;
    a lock of a process that no longer runs is taken over and said; a lock of another host is
    not guessed at; a job's own lock is gone when it exits."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    lock = os.path.join(out, P.LOCK)
    one = P.Dist(0, 0, 1, torch.device("cpu"), True, None, "fp32")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(lock, "w") as f:
            json.dump(dict(host=socket.gethostname(), pid=holder.pid, since="then",
                           command="pretrain_frame.py --out_dir run"), f)
        with pytest.raises(P.UserError, match=f"in use by pid {holder.pid} on "
                           f"{socket.gethostname()} since then \\(pretrain_frame.py"):
            P.claim_out_dir(out, one)
        p = subprocess.run([sys.executable, "pretrain_frame.py", "--preset", "tiny", "--out_dir",
                            out], cwd=HERE, capture_output=True, text=True, timeout=120)
        assert f"in use by pid {holder.pid}" in one_line_error(p)
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "run" / "ck.pt.tmp123").write_text("torn")          # a killed save's debris
    P.claim_out_dir(out, one)
    said = capsys.readouterr().out
    assert f"took over {lock}" in said and "which no longer runs" in said
    assert json.load(open(lock))["pid"] == os.getpid()
    assert not (tmp_path / "run" / "ck.pt.tmp123").exists()
    open(lock, "w").close()                     # torn: a job killed as it wrote its lock
    P.claim_out_dir(out, one)
    assert f"took over {lock} from a torn lock" in capsys.readouterr().out
    with open(lock, "w") as f:
        json.dump(dict(host="node-17", pid=1, since="then", command="x"), f)
    with pytest.raises(P.UserError, match=f"on node-17 .*if that job is gone, delete {lock}"):
        P.claim_out_dir(out, one)
    os.remove(lock)
    code = ("import torch, plumbing as P; P.claim_out_dir(%r, P.Dist(0, 0, 1, "
            "torch.device('cpu'), True, None, 'fp32'))" % out)
    subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True, timeout=120)
    assert not os.path.exists(lock)                                  # released at exit


def test_unwritable_outputs_are_said_before_the_work(tmp_path):
    """linear_eval.py --out where nothing can be written (under a file, which even root cannot
    write into) stops before any feature is extracted."""
    (tmp_path / "afile").write_text("x")
    p = subprocess.run([sys.executable, "linear_eval.py", "--ckpt", str(tmp_path / "none.pt"),
                        "--out", str(tmp_path / "afile" / "res.json")], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    line = one_line_error(p)
    assert "--out" in line and "cannot write there" in line and "afile" in line
    with pytest.raises(P.UserError, match="--out_dir .*cannot write there"):
        P.check_writable(str(tmp_path / "afile" / "run"), "out_dir", folder=True)


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_save(tmp_path,
                                                                             monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    P.save_atomic(dict(step=1), path)
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(P.UserError) as e:
        P.save_atomic(dict(step=2), path)
    msg = str(e.value)
    assert msg.startswith(f"could not write {path}: No space left on device (")
    assert "GiB free there); the previous file is unchanged" in msg
    assert P.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]
    with pytest.raises(P.UserError, match="result.json: No space left on device .*nothing was"):
        P.save_json(dict(a=1), str(tmp_path / "result.json"))
    monkeypatch.undo()
    real_save = torch.save                      # torch's writer fails with a RuntimeError
    monkeypatch.setattr(torch, "save", lambda obj, f: (real_save(obj, f), (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                     "writing file data/0: file write failed")))[0])
    with pytest.raises(P.UserError, match="could not write .*ckpt.pt: .*file write failed"):
        P.save_atomic(dict(step=3), path)
    assert P.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_launchers_torchrun_srun_tasks_and_one_process():
    """torchrun's variables win; the tasks of an srun step of several tasks form one job, whose
    rendezvous is the step's first node and a port from the job id unless set; a batch
    script's own shell (SLURM_NTASKS, no step) is one process, not rank 0 of a job that would
    wait for tasks that never come."""
    assert P.launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                         "SLURM_PROCID": "0"}) == (3, 1, 8, "torchrun")
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-010],big1",
           "SLURM_JOB_NODELIST": "gpu[001-010],big1"}
    assert P.launch_env(env) == (5, 1, 8, "srun")
    assert env["MASTER_ADDR"] == "gpu007" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "head",
           "MASTER_PORT": "1234", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert P.launch_env(env) == (0, 0, 2, "srun") and env["MASTER_ADDR"] == "head"
    assert P.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}) == \
        (0, 0, 1, None)
    assert P.launch_env({}) == (0, 0, 1, None)
    for nodes, first in (("node1", "node1"), ("a[3,5-9]-ib,b2", "a3-ib"), ("x,y[1-2]", "x"),
                         ("gpu[0042]", "gpu0042")):
        assert P.first_host(nodes) == first


def test_a_process_that_sees_one_gpu_uses_it(monkeypatch):
    """A scheduler that binds one GPU per task shows each process one device, whatever its
    local rank (local_world 1: no other process of its launcher shares what it sees); a
    process that sees several takes its local rank's; more processes than GPUs (torchrun's 4
    processes of a node seeing one GPU, or 2 GPUs for local rank 3) is one line saying so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for count, local, local_world, want in ((1, 3, 1, "cuda:0"), (4, 2, 4, "cuda:2"),
                                            (4, 0, 1, "cuda:0"), (1, 0, 4, "cuda:0")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        assert P.pick_device("auto", local, local_world) == torch.device(want)
        assert P.pick_device("cuda", local, local_world) == torch.device(want)
    for count, local, local_world in ((2, 3, 1), (1, 2, 4)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        with pytest.raises(P.UserError, match=f"for local rank {local}: .*one process per GPU"):
            P.pick_device("auto", local, local_world)
    assert P.pick_device("cpu", 3) == torch.device("cpu")


def test_a_restart_of_the_same_job_takes_its_lock_over_from_another_host(tmp_path, capsys,
                                                                        monkeypatch):
    """A requeued SLURM job (the same SLURM_JOB_ID, a higher SLURM_RESTART_COUNT) whose rank 0
    now runs on another host takes over the lock its earlier start left there, and says so;
    another job's lock on another host, or one of the same start (a concurrent step of the
    job), stops the run, naming the job and how to clear the lock; a lock naming this very
    process (a container restarted with the same pid) is left behind, not in use; torchrun's
    default rendezvous id ('none') names no job."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    lock = os.path.join(out, P.LOCK)
    one = P.Dist(0, 0, 1, torch.device("cpu"), True, None, "fp32")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for job, restart in (("slurm 4243", 0), ("slurm 4242", 1)):
        with open(lock, "w") as f:
            json.dump(dict(host="node-17", pid=1, since="then", command="x", job=job,
                           restart=restart), f)
        with pytest.raises(P.UserError, match=f"on node-17 since then \\(x; job {job}\\); if "
                           f"that job is gone, delete {lock} \\(squeue -j {job[6:]} lists it"):
            P.claim_out_dir(out, one)
    with open(lock, "w") as f:
        json.dump(dict(host="node-17", pid=1, since="then", command="x", job="slurm 4242",
                       restart=0), f)
    P.claim_out_dir(out, one)
    said = capsys.readouterr().out
    assert f"took over {lock} from pid 1 on node-17" in said and "an earlier start of this job" \
        in said
    held = json.load(open(lock))
    assert (held["job"], held["restart"], held["host"]) == ("slurm 4242", 1,
                                                             socket.gethostname())
    with open(lock, "w") as f:
        json.dump(dict(held, token="older", since="before"), f)
    P.claim_out_dir(out, one)
    assert "since before" in capsys.readouterr().out and json.load(open(lock))["token"] != "older"
    assert P.job_id({"TORCHELASTIC_RUN_ID": "none"}) == ("", 0)
    assert P.job_id({"TORCHELASTIC_RUN_ID": "frame_base", "TORCHELASTIC_RESTART_COUNT": "2"}) \
        == ("torchrun frame_base", 2)


def test_global_batches_split_into_ranks_and_accumulation_steps():
    one = lambda world: P.Dist(0, 0, world, torch.device("cpu"), True, None, "fp32")
    assert P.split_batch(1024, 0, one(8)) == (128, 1)
    assert P.split_batch(1024, 32, one(8)) == (32, 4)
    for batch, micro, world in ((512, 0, 24), (512, 48, 8), (128, 0, 256)):
        with pytest.raises(P.UserError, match=f"--batch_size {batch} is not --micro_batch"):
            P.split_batch(batch, micro, one(world))
