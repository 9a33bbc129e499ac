"""
Shared test fixtures and helpers. The tests are one file per module (test_model.py tests
model.py, ...); test_pretrain.py runs the pre-training scripts and test_smoke.py the downstream
stages end to end on the demo data, on CPU.

    python -m pytest -q       # everything; ATST_TEST_DATA=DIR keeps the demo data between runs
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from demo import make_demo

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The demo data, generated once per test session (the real generator, real WAV files)."""
    root = os.environ.get("ATST_TEST_DATA") or str(tmp_path_factory.mktemp("data"))
    make_demo(root)
    return root


def run(script, *args, data_root, nproc=0, check=True, env=None):
    """Run a stage script as a user would; returns the completed process."""
    env = dict(os.environ, ATST_DATA=data_root, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               **(env or {}))
    cmd = [sys.executable, script, *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--standalone", script, *args]
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


TINY = ["--data", "demo", "--preset", "tiny", "--num_workers", "1"]


def mel_batch(B=4, T=301, seed=0):
    return torch.rand(B, 64, T, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="session")
def pretrained(data_root, tmp_path_factory):
    """Tiny ATST-Frame, ATST-Clip and ASiT pre-trained on the demo data for 24 steps (real
    runs)."""
    out = {}
    for kind in ("frame", "clip", "asit"):
        out[kind] = str(tmp_path_factory.mktemp(f"pre_{kind}"))
        run(f"pretrain_{kind}.py", *TINY, "--max_steps", "24", "--warmup_epochs", "1",
            "--log_every", "4", "--out_dir", out[kind], data_root=data_root)
    return out
