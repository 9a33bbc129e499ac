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

import finetune
import plumbing as P
import pretrain_asit
import pretrain_clip
import pretrain_frame
import sed
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


def _script(tmp_path, **edits):
    """A config block as shipped (lr 0.1, epochs 100, max_steps 500), with `edits` applied
    the way a user edits the file; returns its globals."""
    g = dict(lr=0.1, epochs=100, max_steps=500, flag=False, name="a", preset="base",
             mode="group", span=5)
    g.update(edits)
    path = tmp_path / "s.py"
    path.write_text("".join(f"{k} = {v!r}  # the {k}\n" for k, v in g.items()))
    return dict(g, __file__=str(path), __doc__="a script")


PRESETS = {"base": dict(lr=0.1, epochs=100, max_steps=500),
           "tiny": dict(lr=0.5, epochs=4, max_steps=0)}
MODES = {"group": dict(span=5), "random": dict(span=1)}
IMPLIES = dict(epochs=dict(max_steps=0))


def _cfg(g, *argv):
    return P.configure(g, dict(preset=PRESETS, mode=MODES), IMPLIES, list(argv))


def test_config_precedence_block_row_edit_flag(tmp_path):
    """shipped block < the chosen row < an edited global < a flag; set_by_user says which."""
    cfg = _cfg(_script(tmp_path))
    assert (cfg["lr"], cfg["max_steps"], cfg["set_by_user"]) == (0.1, 500, [])
    cfg = _cfg(_script(tmp_path), "--preset", "tiny")
    assert (cfg["lr"], cfg["epochs"], cfg["max_steps"]) == (0.5, 4, 0)
    cfg = _cfg(_script(tmp_path, lr=0.2), "--preset", "tiny")      # the edit wins over the row
    assert (cfg["lr"], cfg["epochs"]) == (0.2, 4) and cfg["set_by_user"] == ["lr", "preset"]
    cfg = _cfg(_script(tmp_path, lr=0.2), "--preset", "tiny", "--lr", "0.3")   # the flag wins
    assert cfg["lr"] == 0.3
    cfg = _cfg(_script(tmp_path, preset="tiny"))                     # an edited preset applies
    assert cfg["lr"] == 0.5
    assert _cfg(_script(tmp_path), "--mode", "random")["span"] == 1
    assert _cfg(_script(tmp_path), "--mode", "random", "--span", "3")["span"] == 3
    assert _cfg(_script(tmp_path), "--flag", "true")["flag"] is True
    with pytest.raises(SystemExit, match="choose one of"):
        _cfg(_script(tmp_path), "--preset", "huge")


def test_setting_epochs_clears_max_steps(tmp_path):
    """epochs set by a flag or an edit takes effect (max_steps 0 = derive from epochs), unless
    max_steps is set too."""
    assert _cfg(_script(tmp_path), "--epochs", "50")["max_steps"] == 0
    assert _cfg(_script(tmp_path, epochs=50))["max_steps"] == 0
    assert _cfg(_script(tmp_path, epochs=50), "--max_steps", "7")["max_steps"] == 7
    assert _cfg(_script(tmp_path, epochs=50, max_steps=9))["max_steps"] == 9


def test_help_shows_what_the_command_would_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cfg(_script(tmp_path), "--preset", "tiny", "--help")
    out = capsys.readouterr().out
    assert "the lr (default 0.5)" in out and "the max_steps (default 0)" in out


@pytest.mark.parametrize("module,tables", [
    (pretrain_frame, ["PRESETS", "MASK_MODES"]), (pretrain_clip, ["PRESETS"]),
    (pretrain_asit, ["PRESETS"]),
    (finetune, ["TASKS"]), (sed, ["TASKS"])])
def test_first_row_of_every_table_repeats_the_config_block(module, tables):
    """configure() tells an edited global from a shipped one by the first row: it must equal
    the block as shipped, and every row must list the same names."""
    for name in tables:
        rows = getattr(module, name)
        first = next(iter(rows.values()))
        assert first == {k: getattr(module, k) for k in first}, (module.__name__, name)
        assert all(r.keys() == first.keys() for r in rows.values())


@pytest.mark.parametrize("script,edit,want", [
    ("finetune.py", ("lr = 0.1 ", "lr = 0.2 "), "--lr LR peak lr"),
    ("pretrain_frame.py", ("epochs = 200.0", "epochs = 30.0"), "--max_steps MAX_STEPS"),
])
def test_an_edited_script_runs_with_its_edit(tmp_path, script, edit, want):
    """Edit the config block as a user would and ask the script what it would run: the edit
    wins over the default task (finetune: demo_events has lr 0.5) and epochs takes effect."""
    text = open(os.path.join(HERE, script)).read()
    assert edit[0] in text
    (tmp_path / script).write_text(text.replace(edit[0], edit[1], 1))
    env = dict(os.environ, PYTHONPATH=HERE)
    out = subprocess.run([sys.executable, str(tmp_path / script), "--help"], env=env,
                         capture_output=True, text=True, timeout=120).stdout
    flat = " ".join(out.split())
    assert want in flat
    if script == "finetune.py":
        assert "(default 0.2)" in flat.split("--lr LR")[-1].split("--")[0]
    else:
        assert "(default 0)" in flat.split("--max_steps MAX_STEPS")[-1].split("--")[0]


def test_atomic_files_leave_no_temporaries_and_bad_files_are_named(tmp_path):
    path = str(tmp_path / "ck.pt")
    P.save_atomic(dict(w=torch.ones(3)), path, summary=dict(step=3))
    P.save_json(dict(a=1), str(tmp_path / "r" / "result.json"))
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "ck.pt.json", "r"]
    assert torch.equal(P.load_checkpoint(path)["w"], torch.ones(3))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(P.UserError, match="junk.pt: not a readable checkpoint"):
        P.load_checkpoint(str(tmp_path / "junk.pt"))


@pytest.mark.parametrize("script", ["pretrain_frame.py", "pretrain_clip.py", "pretrain_asit.py",
                                    "linear_eval.py", "finetune.py", "distill.py", "sed.py",
                                    "bench.py"])
def test_every_flag_is_documented_and_grouped(script, capsys):
    """Every config global has a comment (its --help text), and --help groups the flags by
    the block's section comments; the test-only kill switch is not a flag."""
    import importlib
    import re
    module = importlib.import_module(script[:-3])
    keys = ["teacher", "kd_weight"] if script == "distill.py" else \
        P.config_keys(vars(module))
    text = open(os.path.join(HERE, script)).read()
    for k in keys:
        assert re.search(rf"^{k}\s*=.*#\s*\S", text, re.M), (script, k)
    assert "die_at_step" not in keys
    if script.startswith("pretrain"):
        out = subprocess.run([sys.executable, script, "--help"], cwd=HERE, capture_output=True,
                             text=True, timeout=120).stdout
        assert "\nI/O:\n" in out and "\nmodel:\n" in out


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


@pytest.mark.parametrize("script,flags,want", [
    ("pretrain_frame.py", ["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    ("pretrain_asit.py", ["--batch_size", "-4"], "--batch_size -4: must be >= 1"),
    ("pretrain_frame.py", ["--max_steps", "-5"], "--max_steps -5: must be >= 0"),
    ("finetune.py", ["--epochs", "-1"], "--epochs -1: must be > 0"),
    ("linear_eval.py", ["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    ("sed.py", ["--epochs", "0"], "--epochs 0: must be > 0"),
    ("sed.py", ["--predict", "x.wav", "--threshold", "1.5"], "--threshold 1.5: must be in (0, 1)"),
    ("sed.py", ["--predict", "x", "--threshold", "-0.5"], "--threshold -0.5: must be in (0, 1)"),
    ("finetune.py", ["--lr", "nan"], "--lr nan: must be > 0")])
def test_impossible_numbers_stop_at_parse_time(script, flags, want, monkeypatch):
    """Every numeric flag is checked against plumbing.RANGES when the command line is read:
    one line naming the flag and the allowed range."""
    module = {"pretrain_frame.py": pretrain_frame, "pretrain_asit.py": pretrain_asit,
              "finetune.py": finetune, "sed.py": sed}.get(script)
    if module is None:
        import linear_eval as module
    g = dict(vars(module))
    tables = dict(preset=module.PRESETS) if hasattr(module, "PRESETS") else \
        dict(data=module.TASKS) if hasattr(module, "TASKS") else None
    with pytest.raises(SystemExit) as e:
        P.configure(g, tables, argv=["--ckpt", "x.pt", *flags] if "ckpt" in g else flags)
    assert str(e.value.code) == f"error: {want}"


def test_every_numeric_flag_has_a_range_and_every_default_is_inside_it():
    import linear_eval
    import bench
    for module in (pretrain_frame, pretrain_clip, pretrain_asit, finetune, linear_eval, sed,
                   bench):
        g = vars(module)
        for k in P.config_keys(g):
            if type(g[k]) in (int, float):
                assert k in P.RANGES and P.in_range(g[k], P.RANGES[k]), (module.__name__, k)
        for rows in (getattr(module, "PRESETS", {}), getattr(module, "TASKS", {})):
            for name, row in rows.items():
                for k, v in row.items():
                    assert type(v) not in (int, float) or P.in_range(v, P.RANGES[k]), (name, k)


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
