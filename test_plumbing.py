"""plumbing.py: schedules, atomic files, the warmup cut, one-line user errors, outputs that
cannot be written, a full disk."""
import errno
import math
import os
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


class _Planted:
    """What a crafted checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoints_are_read_weights_only(tmp_path):
    """A checkpoint holding an object whose unpickling runs a command is refused, naming the
    file and what it holds, and the command never runs; what released training checkpoints
    carry beside tensors (an argparse Namespace of args, numpy scalars and dtypes) loads."""
    import argparse
    import numpy as np
    marker = tmp_path / "ran"
    torch.save(dict(state_dict={"w": torch.ones(2)}, hyper=_Planted(marker)), tmp_path / "x.ckpt")
    with pytest.raises(P.UserError, match=r"x.ckpt: holds a Python object that a weights-only "
                                          r"load refuses \(posix.system\)"):
        P.load_checkpoint(str(tmp_path / "x.ckpt"))
    assert not marker.exists()
    torch.save(dict(teacher={"w": torch.ones(2)}, args=argparse.Namespace(lr=0.1, arch="vit"),
                    epoch=np.int64(3), best=np.float64(0.5), dtype=np.dtype("float32")),
               tmp_path / "dino.pth")
    ck = P.load_checkpoint(str(tmp_path / "dino.pth"))
    assert ck["args"].arch == "vit" and ck["epoch"] == 3 and ck["best"] == 0.5
    assert torch.equal(ck["teacher"]["w"], torch.ones(2))
