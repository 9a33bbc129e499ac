"""cluster.py: how a run was launched (torchrun, srun's tasks), the device of each process,
the out_dir lock and the jobs it knows, global batches over ranks and accumulation steps."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import cluster as C
from conftest import HERE
from plumbing import UserError
from test_plumbing import one_line_error


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
    with pytest.raises(UserError, match="choose one of auto, cpu, cuda"):
        C.pick_device("gpu")
    assert C.pick_device("auto") == torch.device("cpu")


def test_second_job_on_an_out_dir_stops_and_a_dead_jobs_lock_is_taken_over(tmp_path, capsys):
    """A live holder (here a sleeping process of this host) stops a second job at once, named;
    a lock of a process that no longer runs is taken over and said; a lock of another host is
    not guessed at; a job's own lock is gone when it exits."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    lock = os.path.join(out, C.LOCK)
    one = C.Dist(0, 0, 1, torch.device("cpu"), True, None, "fp32")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(lock, "w") as f:
            json.dump(dict(host=socket.gethostname(), pid=holder.pid, since="then",
                           command="pretrain_frame.py --out_dir run"), f)
        with pytest.raises(UserError, match=f"in use by pid {holder.pid} on "
                           f"{socket.gethostname()} since then \\(pretrain_frame.py"):
            C.claim_out_dir(out, one)
        p = subprocess.run([sys.executable, "pretrain_frame.py", "--preset", "tiny", "--out_dir",
                            out], cwd=HERE, capture_output=True, text=True, timeout=120)
        assert f"in use by pid {holder.pid}" in one_line_error(p)
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "run" / ".ck.pt.atst-partial-123").write_text("torn")  # a killed save's debris
    for mine in ("survey.tmp.csv", "notes.tmp", "ck.pt.tmp123", ".x.atst-partial-"):  # a user's
        (tmp_path / "run" / mine).write_text("keep")
    C.claim_out_dir(out, one)
    said = capsys.readouterr().out
    assert f"took over {lock}" in said and "which no longer runs" in said
    assert json.load(open(lock))["pid"] == os.getpid()
    assert sorted(os.listdir(out)) == sorted([".x.atst-partial-", C.LOCK, "ck.pt.tmp123",
                                              "notes.tmp", "survey.tmp.csv"])
    assert f"removed {out}/.ck.pt.atst-partial-123: a save interrupted by a kill" in said
    held = json.load(open(lock))
    if held["started"] is not None:  # where /proc says when a process started (Linux)
        with open(lock, "w") as f:   # a live pid, but not the process that took the lock
            json.dump(dict(held, pid=os.getppid(), started=held["started"] + 1), f)
        C.claim_out_dir(out, one)
        assert f"from pid {os.getppid()} on" in capsys.readouterr().out
    with open(lock, "w") as f:
        json.dump(dict(host=socket.gethostname(), pid=os.getppid(), since="then", command="x"), f)
    with pytest.raises(UserError, match=f"if pid {os.getppid()} is not that run, its number "
                       f"reused since, delete {lock}"):
        C.claim_out_dir(out, one)
    open(lock, "w").close()                     # torn: a job killed as it wrote its lock
    C.claim_out_dir(out, one)
    assert f"took over {lock} from a torn lock" in capsys.readouterr().out
    with open(lock, "w") as f:
        json.dump(dict(host="node-17", pid=1, since="then", command="x"), f)
    with pytest.raises(UserError, match=f"on node-17 .*if that job is gone, delete {lock}"):
        C.claim_out_dir(out, one)
    os.remove(lock)
    code = ("import torch, cluster as C; C.claim_out_dir(%r, C.Dist(0, 0, 1, "
            "torch.device('cpu'), True, None, 'fp32'))" % out)
    subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True, timeout=120)
    assert not os.path.exists(lock)                                  # released at exit


def test_launchers_torchrun_srun_tasks_and_one_process():
    """torchrun's variables win; the tasks of an srun step of several tasks form one job, whose
    rendezvous is the step's first node and a port from the job id unless set; a batch
    script's own shell (SLURM_NTASKS, no step) is one process, not rank 0 of a job that would
    wait for tasks that never come."""
    assert C.launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                         "SLURM_PROCID": "0"}) == (3, 1, 8, "torchrun")
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-010],big1",
           "SLURM_JOB_NODELIST": "gpu[001-010],big1"}
    assert C.launch_env(env) == (5, 1, 8, "srun")
    assert env["MASTER_ADDR"] == "gpu007" and env["MASTER_PORT"] == str(20000 + 123456 % 20000)
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "head",
           "MASTER_PORT": "1234", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert C.launch_env(env) == (0, 0, 2, "srun") and env["MASTER_ADDR"] == "head"
    assert C.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}) == \
        (0, 0, 1, None)
    assert C.launch_env({}) == (0, 0, 1, None)
    for nodes, first in (("node1", "node1"), ("a[3,5-9]-ib,b2", "a3-ib"), ("x,y[1-2]", "x"),
                         ("gpu[0042]", "gpu0042")):
        assert C.first_host(nodes) == first


def test_a_process_that_sees_one_gpu_uses_it(monkeypatch):
    """A scheduler that binds one GPU per task shows each process one device, whatever its
    local rank (local_world 1: no other process of its launcher shares what it sees); a
    process that sees several takes its local rank's; more processes than GPUs (torchrun's 4
    processes of a node seeing one GPU, or 2 GPUs for local rank 3) is one line saying so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for count, local, local_world, want in ((1, 3, 1, "cuda:0"), (4, 2, 4, "cuda:2"),
                                            (4, 0, 1, "cuda:0"), (1, 0, 4, "cuda:0")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        assert C.pick_device("auto", local, local_world) == torch.device(want)
        assert C.pick_device("cuda", local, local_world) == torch.device(want)
    for count, local, local_world in ((2, 3, 1), (1, 2, 4)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        with pytest.raises(UserError, match=f"for local rank {local}: .*one process per GPU"):
            C.pick_device("auto", local, local_world)
    assert C.pick_device("cpu", 3) == torch.device("cpu")


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
    lock = os.path.join(out, C.LOCK)
    one = C.Dist(0, 0, 1, torch.device("cpu"), True, None, "fp32")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for job, restart in (("slurm 4243", 0), ("slurm 4242", 1)):
        with open(lock, "w") as f:
            json.dump(dict(host="node-17", pid=1, since="then", command="x", job=job,
                           restart=restart), f)
        with pytest.raises(UserError, match=f"on node-17 since then \\(x; job {job}\\); if "
                           f"that job is gone, delete {lock} \\(squeue -j {job[6:]} lists it"):
            C.claim_out_dir(out, one)
    with open(lock, "w") as f:
        json.dump(dict(host="node-17", pid=1, since="then", command="x", job="slurm 4242",
                       restart=0), f)
    C.claim_out_dir(out, one)
    said = capsys.readouterr().out
    assert f"took over {lock} from pid 1 on node-17" in said and "an earlier start of this job" \
        in said
    held = json.load(open(lock))
    assert (held["job"], held["restart"], held["host"]) == ("slurm 4242", 1,
                                                             socket.gethostname())
    with open(lock, "w") as f:
        json.dump(dict(held, token="older", since="before"), f)
    C.claim_out_dir(out, one)
    assert "since before" in capsys.readouterr().out and json.load(open(lock))["token"] != "older"
    assert C.job_id({"TORCHELASTIC_RUN_ID": "none"}) == ("", 0)
    assert C.job_id({"TORCHELASTIC_RUN_ID": "frame_base", "TORCHELASTIC_RESTART_COUNT": "2"}) \
        == ("torchrun frame_base", 2)


def test_global_batches_split_into_ranks_and_accumulation_steps():
    one = lambda world: C.Dist(0, 0, world, torch.device("cpu"), True, None, "fp32")
    assert C.split_batch(1024, 0, one(8)) == (128, 1)
    assert C.split_batch(1024, 32, one(8)) == (32, 4)
    for batch, micro, world in ((512, 0, 24), (512, 48, 8), (128, 0, 256)):
        with pytest.raises(UserError, match=f"--batch_size {batch} is not --micro_batch"):
            C.split_batch(batch, micro, one(world))
