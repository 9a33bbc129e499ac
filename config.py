"""
The config block of a stage script turned into --flags, and the run's config resolved from
it: the block, the rows of its tables (presets, per-task settings), edits and flags; the
allowed range of every numeric value; the start-up print of what runs and where each value
came from.
"""
import argparse
import math
import re
import sys

def str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def config_keys(g):
    """The config globals of a script: public int/float/bool/str values, or None (a value a
    table row decides), with lower-case names (UPPER_CASE names are constants)."""
    return [k for k, v in g.items() if not k.startswith("_") and not k.isupper()
            and (v is None or type(v) in (int, float, bool, str))]


def _parser(g, keys, helps, types, sections=None, defaults=True):
    """argparse for the config keys; with defaults (the real parser), --help groups the flags
    by the section comments of the config block (`# I/O`, `# model`, ...)."""
    p = argparse.ArgumentParser(description=(g.get("__doc__") or "").split("\n\n")[0].strip(),
                                add_help=defaults,
                                argument_default=None if defaults else argparse.SUPPRESS)
    groups = {}
    for k in keys:
        typ = str2bool if types[k] is bool else types[k]
        kw = dict(default=g[k], help=(helps.get(k, "") + f" (default {g[k]!r})")
                  .replace("%", "%%")) if defaults else {}
        name = (sections or {}).get(k)
        where = p if name is None else groups.setdefault(name, p.add_argument_group(name))
        where.add_argument(f"--{k}", type=typ, **kw)
    return p


def _comments(paths):
    """{name: the comment on its line}, {name: the section comment above it}."""
    helps, sections = {}, {}
    for path in paths:
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
    return helps, sections


def configure(g, tables=None, implies=None, argv=None, help_files=()):
    """Expose every config global of a script as --name (typed by its value, or by its row
    value when the block leaves it None; help = the comment on its line) and resolve the
    run's config. A global the block sets to None is decided by a table: per {key: rows}, the
    row named by the value of `key` (a preset, a task; a name no row has takes the first row,
    "default", except for `preset`, where it is an error). Whatever the block shows is in force:
    a value written there (shipped or edited) is never replaced by a row, and a flag wins over
    everything. implies {name: {other: value}}: when `name` is set by an edit of a
    row-decided global or a flag and `other` is not, `other` takes `value` (setting epochs
    clears max_steps). --help shows the values this command line would run with. Updates the
    globals; returns the config dict, with `set_by_user` (names set by a flag or by an edit
    of a row-decided global) and `from_rows` ({"TABLE['row']": {name: value}}) saying where
    values came from (describe() prints them). help_files: more sources of comments (a
    script that extends another's config)."""
    tables, implies = tables or {}, implies or {}
    keys = config_keys(g)
    helps, sections = _comments((*help_files, g["__file__"]))
    types = {k: type(g[k]) for k in keys if g[k] is not None}
    for key, rows in tables.items():
        first = next(iter(rows.values()))
        assert all(r.keys() == first.keys() for r in rows.values()), key
        types.update({k: type(v) for k, v in first.items() if k not in types})
    loose = [k for k in keys if k not in types]
    assert not loose, f"{loose}: None in the config block but set by no table row"
    argv = sys.argv[1:] if argv is None else argv
    given = vars(_parser(g, keys, helps, types, defaults=False).parse_known_args(argv)[0])
    decided = {k for rows in tables.values() for k in next(iter(rows.values()))}
    edited = {k for k in decided if g[k] is not None}
    from_rows = {}
    for key, rows in tables.items():
        value = given.get(key, g[key])
        if key == "preset":
            choose(rows, value, "preset")
        name = value if value in rows else next(iter(rows))
        table = next((t for t, v in g.items() if v is rows), key)
        took = {k: v for k, v in rows[name].items() if g[k] is None and k not in given}
        g.update({k: v for k, v in rows[name].items() if g[k] is None})
        if took:
            from_rows[f"{table}[{name!r}]"] = took
    g.update(given)
    by_user = edited | set(given)
    for name, others in implies.items():
        if name in by_user:
            g.update({k: v for k, v in others.items() if k not in by_user})
            for took in from_rows.values():
                for k in others:
                    if k not in by_user:
                        took.pop(k, None)
    g.update(vars(_parser(g, keys, helps, types, sections).parse_args(argv)))  # --help, flags
    check_ranges(g, keys)
    return dict({k: g[k] for k in keys}, set_by_user=sorted(by_user), from_rows=from_rows)


def choose(table, name, flag):
    """table[name], or one line naming --flag and its choices."""
    if name not in table:
        raise SystemExit(f"--{flag} {name!r}: choose one of {sorted(table)}")
    return table[name]


def script_config(module, *argv):
    """A stage script's config for these flags, resolved as the script resolves it (its block,
    its TABLES rows and IMPLIES), without touching the module: what bench.py and tests read."""
    return configure(dict(vars(module)), getattr(module, "TABLES", None),
                     getattr(module, "IMPLIES", None), argv=list(argv))


# The allowed range of every numeric config value of the stages, by name (a name means the same
# in every script): "[a, b]" closed, "(a, b)" open, "inf" unbounded. configure checks them
# all, whatever set the value (block, row, edit or flag).
RANGES = {
    **dict.fromkeys(["batch_size", "batch_strong", "batch_weak", "batch", "extract_batch",
                     "log_every", "ckpt_every", "mixup_bank", "mask_span", "align", "steps",
                     "data_batches", "median_window"], "[1, inf)"),
    "num_workers": "[-1, inf)",
    **dict.fromkeys(["seed", "micro_batch", "max_steps", "folds", "data_files", "startup_rows",
                     "embed_files", "warmup_steps", "warmup_epochs", "teacher_temp_epochs",
                     "min_lr", "weight_decay", "wd_start", "wd_end", "clip_grad", "crop_sec2",
                     "chunk_seconds"], "[0, inf)"),
    **dict.fromkeys(["epochs", "lr", "base_lr", "adam_eps", "grad_clip", "seconds",
                     "batch_seconds", "crop_sec", "train_seconds", "max_seconds", "mixup_alpha",
                     "teacher_temp0", "teacher_temp"], "(0, inf)"),
    **dict.fromkeys(["ema_m0", "mixup_ratio", "kd_weight", "zeros_min", "zeros_max",
                     "roll_prob", "replace_share", "replace_prob", "mask_prob"], "[0, 1]"),
    **dict.fromkeys(["threshold", "weak_valid", "strong_valid"], "(0, 1)"),
    **dict.fromkeys(["beta1", "beta2", "drop_path"], "[0, 1)"), "layer_decay": "(0, 1]",
    "n_thresholds": "[2, inf)", "aug_views": "[0, 2]"}


def in_range(value, spec):
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return math.isfinite(value) and (lo < value if spec[0] == "(" else lo <= value) and \
        (value < hi if spec[-1] == ")" else value <= hi)


def check_ranges(g, keys):
    """Every numeric config value inside its RANGES entry; else one line naming the flag."""
    for k in keys:
        if k in RANGES and type(g[k]) in (int, float) and not in_range(g[k], RANGES[k]):
            lo, hi = RANGES[k][1:-1].split(", ")
            want = f"{'>' if RANGES[k][0] == '(' else '>='} {lo}" if hi == "inf" else \
                f"in {RANGES[k]}"
            raise SystemExit(f"error: --{k} {g[k]}: must be {want}")


def describe(cfg):
    """The config lines every stage prints at start: every value, then where the values that
    are not the config block's came from."""
    line = " ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("set_by_user", "from_rows"))
    rows = [f"\nfrom {t}: " + ", ".join(f"{k} {v}" for k, v in took.items())
            for t, took in cfg.get("from_rows", {}).items()]
    return f"config: {line}" + "".join(rows) + (
        f"\nset by you (edit or flag): {', '.join(cfg['set_by_user'])}"
        if cfg.get("set_by_user") else "")
