"""config.py: the config block as flags, what a table row decides and what an edit or a flag
overrides, the start-up print of where each value came from, the range of every number; and
the traps a user editing a block would fall into (each reproduced on the scripts themselves)."""
import importlib
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

import bench
import config as C
import finetune
import pretrain
import pretrain_asit
import pretrain_clip
import pretrain_frame
import sed
from conftest import HERE
from plumbing import UserError

SCRIPTS = [pretrain_frame, pretrain_clip, pretrain_asit, finetune, sed]


def _script(tmp_path, **edits):
    """A config block as shipped (lr, epochs, max_steps and span left to the rows: None), with
    `edits` applied the way a user edits the file; returns its globals."""
    g = dict(lr=None, epochs=None, max_steps=None, flag=False, name="a", preset="base",
             mode="group", span=None)
    g.update(edits)
    path = tmp_path / "s.py"
    path.write_text("".join(f"{k} = {v!r}  # the {k}\n" for k, v in g.items()))
    return dict(g, __file__=str(path), __doc__="a script", PRESETS=PRESETS, MODES=MODES)


PRESETS = {"base": dict(lr=0.1, epochs=100, max_steps=500),
           "tiny": dict(lr=0.5, epochs=4, max_steps=0)}
MODES = {"group": dict(span=5), "random": dict(span=1)}
IMPLIES = dict(epochs=dict(max_steps=0))


def _cfg(g, *argv):
    return C.configure(g, dict(preset=PRESETS, mode=MODES), IMPLIES, list(argv))


def _run(module, *argv, **edits):
    """The config `module`'s block resolves to, with `edits` written into the block."""
    g = dict(vars(module), **edits)
    return C.configure(g, getattr(module, "TABLES", None), getattr(module, "IMPLIES", None),
                       argv=list(argv))


def test_config_precedence_row_then_block_then_flag(tmp_path):
    """A row fills what the block leaves None; a value written in the block wins over any row;
    a flag wins over everything; set_by_user and from_rows say which."""
    cfg = _cfg(_script(tmp_path))
    assert (cfg["lr"], cfg["max_steps"], cfg["set_by_user"]) == (0.1, 500, [])
    assert cfg["from_rows"] == {"PRESETS['base']": dict(lr=0.1, epochs=100, max_steps=500),
                                "MODES['group']": dict(span=5)}
    cfg = _cfg(_script(tmp_path), "--preset", "tiny")
    assert (cfg["lr"], cfg["epochs"], cfg["max_steps"]) == (0.5, 4, 0)
    cfg = _cfg(_script(tmp_path, lr=0.2), "--preset", "tiny")      # the edit wins over the row
    assert (cfg["lr"], cfg["epochs"]) == (0.2, 4) and cfg["set_by_user"] == ["lr", "preset"]
    cfg = _cfg(_script(tmp_path, lr=0.1), "--preset", "tiny")      # even the base row's value
    assert cfg["lr"] == 0.1
    cfg = _cfg(_script(tmp_path, lr=0.2), "--preset", "tiny", "--lr", "0.3")   # the flag wins
    assert cfg["lr"] == 0.3 and "lr" not in cfg["from_rows"]["PRESETS['tiny']"]
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


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_the_block_never_shows_a_value_a_row_replaces(module):
    """Every name a table row sets is None in the block (so no block value is silently
    replaced), every row of a table lists the same names, and every value the block shows
    is what a run with no flags uses."""
    g = vars(module)
    for key, rows in module.TABLES.items():
        names = next(iter(rows.values())).keys()
        assert all(r.keys() == names for r in rows.values()), (module.__name__, key)
        assert all(g[k] is None for k in names), (module.__name__, key)
    cfg = _run(module)
    shown = {k: v for k, v in g.items() if k in C.config_keys(g) and v is not None}
    assert {k: cfg[k] for k in shown} == shown


@pytest.mark.parametrize("module,edits,argv,want", [
    # finetune.py on AS-20K with Mixup switched off and 100 epochs written in the block
    (finetune, dict(data="as20k", mixup=False, epochs=100), [], dict(mixup=False, epochs=100)),
    (finetune, dict(mixup=False), ["--data", "as20k"], dict(mixup=False, epochs=200)),
    # the tiny preset (a log line every 20 steps) with 5 written in the block
    (pretrain_frame, dict(preset="tiny", log_every=5), [], dict(log_every=5, batch_size=32)),
    # SED on the demo with DESED's 7-frame median filter written in the block
    (sed, dict(data="demo_sed", median_window=7), [], dict(median_window=7, epochs=20)),
])
def test_a_value_written_in_the_block_is_what_runs(module, edits, argv, want):
    """The traps of a block that showed values a row silently replaced: writing the value the
    block showed did nothing (finetune ran AS-20K with Mixup for 200 epochs, the tiny preset
    logging every 20 steps, the SED demo with a 31-frame filter)."""
    cfg = _run(module, *argv, **edits)
    assert {k: cfg[k] for k in want} == want
    assert set(edits) - {"data", "preset"} <= set(cfg["set_by_user"])


def test_the_start_up_print_names_the_row_of_each_value():
    text = C.describe(_run(finetune, "--data", "as20k", "--epochs", "3"))
    rows = " " + re.search(r"^from TASKS\['as20k'\]: (.*)$", text, re.M).group(1)
    assert "mixup True" in rows and "batch_size 512" in rows and " epochs" not in rows
    assert re.search(r"^set by you \(edit or flag\): data, epochs$", text, re.M)
    csv = C.describe(_run(finetune, "--data", "my/train.csv"))
    assert "from TASKS['default']: epochs 100" in csv


def test_model_size_has_its_own_flag_apart_from_the_run_defaults():
    """`--model tiny --data as200k`: a tiny model with the paper's run settings, not the CPU
    demo's (which --preset tiny brings)."""
    c = _run(pretrain_frame, "--model", "tiny", "--data", "as200k")
    args = pretrain_frame.model_args(type("C", (), c))
    assert args["dim"] == 64 and (c["batch_size"], c["warmup_epochs"]) == (864, 10.0)
    c = _run(pretrain_asit, "--preset", "tiny", "--model", "small")
    assert pretrain_asit.model_args(type("C", (), c))["dim"] == 384 and c["batch_size"] == 32
    with pytest.raises(SystemExit, match=r"--model 'huge': choose one of \['base', 'small'"):
        pretrain_frame.model_args(type("C", (), _run(pretrain_frame, "--model", "huge")))


@pytest.mark.parametrize("module", [pretrain_frame, pretrain_clip, pretrain_asit],
                         ids=lambda m: m.__name__)
def test_bench_reads_a_scripts_config_as_the_script_does(module):
    for preset, row in module.PRESETS.items():
        got = vars(bench.preset_config(module, preset))
        assert got == _run(module, "--preset", preset)
        assert all(got[k] == v for k, v in row.items())   # the row's values, not the block's
    if module is pretrain_asit:
        assert bench.preset_config(module, "tiny").crop_sec == 2.0


def test_the_loop_names_the_config_keys_it_lacks():
    cfg = _run(pretrain_frame)
    del cfg["beta2"], cfg["ema_ramp"]
    with pytest.raises(KeyError, match=r"\['beta2', 'ema_ramp'\]"):
        pretrain.train(cfg, {}, None, None)
    assert set(pretrain.NEEDS) <= set(_run(pretrain_asit)) & set(_run(pretrain_clip))


@pytest.mark.parametrize("script,edit,want", [
    ("finetune.py", ("lr = None ", "lr = 0.2 "), "--lr LR peak lr"),
    ("pretrain_frame.py", ("epochs = None ", "epochs = 30.0"), "--max_steps MAX_STEPS"),
])
def test_an_edited_script_runs_with_its_edit(tmp_path, script, edit, want):
    """Edit the config block as a user would and ask the script what it would run: the edit
    wins over the default task's row and epochs takes effect."""
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


@pytest.mark.parametrize("script", ["pretrain_frame.py", "pretrain_clip.py", "pretrain_asit.py",
                                    "linear_eval.py", "finetune.py", "distill.py", "sed.py",
                                    "bench.py", "embed.py"])
def test_every_flag_is_documented_and_grouped(script, capsys):
    """Every config global has a comment (its --help text), and --help groups the flags by
    the block's section comments; the test-only kill switch is not a flag."""
    module = importlib.import_module(script[:-3])
    keys = ["teacher", "kd_weight"] if script == "distill.py" else \
        C.config_keys(vars(module))
    text = open(os.path.join(HERE, script)).read()
    for k in keys:
        assert re.search(rf"^{k}\s*=.*#\s*\S", text, re.M), (script, k)
    assert "die_at_step" not in keys


@pytest.mark.parametrize("script,flags,want", [
    ("pretrain_frame.py", ["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    ("pretrain_asit.py", ["--batch_size", "-4"], "--batch_size -4: must be >= 1"),
    ("pretrain_frame.py", ["--max_steps", "-5"], "--max_steps -5: must be >= 0"),
    ("pretrain_clip.py", ["--beta2", "1.0"], "--beta2 1.0: must be in [0, 1)"),
    ("finetune.py", ["--epochs", "-1"], "--epochs -1: must be > 0"),
    ("linear_eval.py", ["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    ("sed.py", ["--epochs", "0"], "--epochs 0: must be > 0"),
    ("sed.py", ["--predict", "x.wav", "--threshold", "1.5"], "--threshold 1.5: must be in (0, 1)"),
    ("sed.py", ["--predict", "x", "--threshold", "-0.5"], "--threshold -0.5: must be in (0, 1)"),
    ("finetune.py", ["--lr", "nan"], "--lr nan: must be > 0")])
def test_impossible_numbers_stop_at_parse_time(script, flags, want):
    """Every numeric flag is checked against config.RANGES when the command line is read:
    one line naming the flag and the allowed range."""
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit) as e:
        _run(module, *(["--ckpt", "x.pt", *flags] if hasattr(module, "ckpt") else flags))
    assert str(e.value.code) == f"error: {want}"


@pytest.mark.parametrize("module,flags,want", [
    (pretrain_asit, ["--crop_sec", "20"], "--crop_sec 20 is longer than --seconds 10, the "
     "audio read per clip: shorten the crop or raise --seconds"),
    (pretrain_clip, ["--crop_sec2", "12"], "--crop_sec2 12 is longer than --seconds 10"),
    (pretrain_clip, ["--segments", "single", "--crop_sec2", "2"], "--segments single gives "
     "two views of one crop: leave --crop_sec2 at 0")])
def test_crops_the_audio_read_cannot_give_stop_before_the_run(module, flags, want):
    """A crop longer than the audio read per clip was a traceback at the first step: now the
    views, built before the run starts, say it in one line."""
    views = {pretrain_asit: "AsitViews", pretrain_clip: "ClipViews"}[module]
    with pytest.raises(UserError, match=re.escape(want)):
        getattr(module, views)(SimpleNamespace(**_run(module, *flags)))


def test_every_numeric_flag_has_a_range_and_every_default_is_inside_it():
    import embed
    import linear_eval
    for module in (*SCRIPTS, linear_eval, bench, embed):
        g = vars(module)
        for k in C.config_keys(g):
            if type(g[k]) in (int, float):
                assert k in C.RANGES and C.in_range(g[k], C.RANGES[k]), (module.__name__, k)
        for rows in getattr(module, "TABLES", {}).values():
            for name, row in rows.items():
                for k, v in row.items():
                    assert type(v) not in (int, float) or C.in_range(v, C.RANGES[k]), (name, k)


def test_every_stage_reads_with_the_workers_its_cpus_allow():
    """Every stage's DataLoader workers default to -1 (cluster.workers: the CPUs this process
    may use over the ranks of its node, less one), and no table row sets another count."""
    import embed
    import linear_eval
    for module in (*SCRIPTS, linear_eval, embed):
        assert vars(module)["num_workers"] == -1, module.__name__
        for rows in getattr(module, "TABLES", {}).values():
            assert not any("num_workers" in row for row in rows.values()), module.__name__


def test_the_readme_gpu_counts_are_the_default_batches_divisors():
    """README 'Several nodes' lists, for each stage's default global batch, the GPU counts (up
    to 64) that split it; they are what plumbing.split_batch accepts for the scripts' own
    configs (SED: the strong + weak forward and each of the two batches)."""
    import cluster
    import torch
    table = {}
    for line in open(os.path.join(HERE, "README.md")).read().split("## Several nodes")[1] \
            .split("## Benchmark")[0].splitlines():
        cells = [x.strip() for x in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[1][0].isdigit():
            table[cells[0]] = [int(x) for x in cells[1].split(", ")]

    def counts(*batches):
        ok = []
        for world in range(1, 65):
            d = cluster.Dist(0, 0, world, torch.device("cpu"), True, None, "fp32")
            try:
                _, accum = cluster.split_batch(sum(batches), 0, d)
            except cluster.UserError:
                continue
            if all(b % (world * accum) == 0 for b in batches):
                ok.append(world)
        return ok
    cfg = lambda m, *argv: C.script_config(m, *argv)
    rows = {"pretrain_frame.py base (864)": counts(cfg(pretrain_frame)["batch_size"]),
            "pretrain_frame.py small (1024), finetune.py / distill.py AS-2M (1024), others "
            "(512)": counts(cfg(pretrain_frame, "--preset", "small")["batch_size"]),
            "pretrain_clip.py base and small (1536)": counts(cfg(pretrain_clip)["batch_size"]),
            "pretrain_asit.py (128), sed.py (128 strong + 128 weak)": counts(
                cfg(sed)["batch_strong"], cfg(sed)["batch_weak"])}
    assert cfg(pretrain_frame)["batch_size"] == 864 and cfg(pretrain_asit)["batch_size"] == 128
    assert cfg(finetune, "--data", "as2m")["batch_size"] == 1024
    assert cfg(finetune, "--data", "fsd50k")["batch_size"] == 512
    assert cfg(pretrain_clip, "--preset", "small")["batch_size"] == 1536
    assert counts(512) == counts(1024) == counts(128) and counts(1024)[-1] == 64
    for name, want in rows.items():
        assert table[name] == want, name
