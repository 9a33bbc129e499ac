"""pretrain.py (the loop) and the views of pretrain_frame.py / pretrain_clip.py: the Table II
and III switches, then real pre-training runs on the demo data (loss, collapse, DDP on gloo,
kill and resume, non-finite loss, a missing file, corrupt clips replaced or stopping the
run)."""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import data as D
import loaders as L
import model as M
import pretrain
import pretrain_asit as A
import pretrain_clip
import pretrain_frame
from config import script_config
from conftest import HERE, TINY, asit_inputs, asit_pair, read_log, run, run_together
from plumbing import load_checkpoint


def _config(module, **over):
    """The script's config for --preset tiny, resolved as the script resolves it, then `over`."""
    return SimpleNamespace(**dict(script_config(module, "--preset", "tiny"), **over))


def _waves(B=4, seconds=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(seconds * 16000) / 16000
    f = 200 + 3000 * torch.rand(B, 1, generator=g)          # a different chirp per clip
    wav = 0.3 * torch.sin(2 * torch.pi * f * t * (1 + t / 4)) * torch.rand(B, 1, generator=g)
    return wav, torch.full((B,), seconds * 16000)


@pytest.mark.parametrize("aug_views", [0, 1, 2])
def test_frame_views_follow_table_three(aug_views):
    """aug_views 0 (A): both views clean; 1 (D): view 1 clean, view 2 Mixup + warp; 2 (E):
    both augmented, differently. One mask per clip over its valid tokens."""
    views = pretrain_frame.FrameViews(_config(pretrain_frame, aug_views=aug_views))
    wav, valid = _waves()
    g = torch.Generator().manual_seed(0)
    views(*_waves(seed=1), g)                                 # fill the Mixup bank
    v1, v2, mask, n_valid = views(wav, valid, g)
    mel = views.front(wav)
    changed = lambda v: (v - mel).abs().amax((1, 2)).min() > 1e-3  # every clip altered
    assert (torch.equal(v1, mel), torch.equal(v2, mel)) == (aug_views < 2, aug_views == 0)
    assert changed(v2) == (aug_views >= 1) and changed(v1) == (aug_views == 2)
    assert mask.shape == (4, 250) and n_valid.tolist() == [250] * 4
    assert 0.35 < mask.float().mean() < 0.65


def test_frame_views_mask_modes():
    """group: spans of 5 tokens; random (config B): single tokens at the same 50% share, and
    --mask_prob is honoured in random mode (it is the share of masked tokens)."""
    wav, valid = _waves(B=64)
    for mode, prob, frac in (("group", 0.65, 0.50), ("random", 0.5, 0.50), ("random", 0.3, 0.30)):
        span = 5 if mode == "group" else 1
        views = pretrain_frame.FrameViews(_config(pretrain_frame, mask_mode=mode, mask_span=span,
                                                  mask_prob=prob))
        mask = views(wav, valid, torch.Generator().manual_seed(0))[2]
        assert abs(mask.float().mean().item() - frac) < 0.03, (mode, prob)
        starts = mask[:, 1:] & ~mask[:, :-1]
        ends = ~mask[:, 1:] & mask[:, :-1]
        isolated = (starts[:, :-1] & ends[:, 1:]).sum().item()  # masked runs of one token
        assert (isolated > 100) == (mode == "random")


@pytest.mark.parametrize("segments,sec,sec2", [("two", 6.0, 0.0), ("single", 6.0, 0.0),
                                               ("two", 1.0, 0.0), ("two", 9.0, 6.0)])
def test_clip_views_follow_table_two(segments, sec, sec2):
    """single: both views from one crop; two: independent crops; crop_sec sets the segment
    length (1 s -> 101 frames, 6 s -> 601), crop_sec2 a second length (9 + 6 s)."""
    views = pretrain_clip.ClipViews(_config(pretrain_clip, segments=segments, crop_sec=sec,
                                            crop_sec2=sec2))
    views.rrc.forward = lambda x, g=None: x                   # look at the crops themselves
    v1, v2, mask, n_valid = views(*_waves(), torch.Generator().manual_seed(0))  # empty bank
    assert mask is None and n_valid is None
    assert v1.shape == (4, 64, M.frames_for(int(sec * 16000)))
    assert v2.shape[-1] == M.frames_for(int((sec2 or sec) * 16000))
    assert torch.equal(v1, v2) == (segments == "single")


def test_whole_batches_go_without_valid_lengths_and_draw_the_same_views():
    """run_step tells the views, on the host, that every clip of a batch is whole (valid
    None); they then draw what they draw from the full lengths, and ATST-Frame's views give
    no valid-token count (no padding mask). A padded batch keeps its lengths."""
    wav, full = _waves()
    padded = full.clone()
    padded[1] = 99840                                              # 6.24 s: 156 tokens
    seen = []
    model = torch.nn.Linear(1, 1)                                  # its loss: its bias
    model.forward = lambda: (model.bias.sum(), {})
    d = SimpleNamespace(device=torch.device("cpu"), world=1, ctx=contextlib.nullcontext())
    pretrain.run_step(model, model, torch.optim.SGD(model.parameters()), lambda w, v, g:
                      seen.append(v) or (), iter([(wav, full), (wav, padded)]), 2, d, None)
    assert seen[0] is None and torch.equal(seen[1], padded)
    for mod, name in ((pretrain_frame, "FrameViews"), (pretrain_clip, "ClipViews"),
                      (A, "AsitViews")):
        given, whole = (getattr(mod, name)(_config(mod))(wav, v, torch.Generator().manual_seed(0))
                        for v in (full, None))
        if mod is pretrain_frame:
            assert given[3].tolist() == [250] * 4 and whole[3] is None
            given, whole = given[:3], whole[:3]
        assert all(b is None if a is None else torch.equal(a, b) for a, b in zip(given, whole))
    _, _, mask, n_valid = pretrain_frame.FrameViews(_config(pretrain_frame))(
        wav, padded, torch.Generator())
    assert n_valid.tolist() == [250, 156, 250, 250] and not mask[1, 156:].any()


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_pretrain_demo_loss_falls_and_no_collapse(kind, pretrained):
    log = read_log(pretrained[kind])
    assert [r["step"] for r in log] == [4, 8, 12, 16, 20, 24]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert min(r["std_t"] for r in log) > 0.03 and min(r["std_s"] for r in log) > 0.01
    ck = load_checkpoint(os.path.join(pretrained[kind], "ckpt.pt"))
    assert ck["step"] == 24 and ck["model_args"]["method"] == kind
    model = M.ATST(**ck["model_args"])
    model.load_state_dict(ck["model"])  # strict


def test_asit_demo_run_logs_its_losses_and_monitors(pretrained):
    """A real tiny ASiT run: the total is global + local + 2 x reconstruction, the teacher's
    entropies lie between 0 and log K, the teacher temperature follows its per-epoch ramp
    (tiny: 0.04 -> 0.07 over 12 epochs of 8 steps), the centres moved, the checkpoint loads
    strictly. (Over 24 steps the distillation terms first rise while the centres form; a
    longer demo run, e.g. run_all.sh's, is where the losses fall.)"""
    log = read_log(pretrained["asit"])
    ck = load_checkpoint(os.path.join(pretrained["asit"], "ckpt.pt"))
    kg, kl = ck["model_args"]["global_k"], ck["model_args"]["local_k"]
    assert [r["step"] for r in log] == [4, 8, 12, 16, 20, 24]
    for r in log:
        assert abs(r["loss"] - r["loss_g"] - r["loss_l"] - 2 * r["loss_r"]) < 1e-3
        assert 1.0 < r["ent_g"] <= math.log(kg) + 1e-4 and 0.5 < r["ent_l"] <= math.log(kl)
        epoch = (r["step"] - 1) // 8
        assert r["teacher_temp"] == pytest.approx(0.04 + 0.03 * min(epoch / 11, 1))
        assert 0 < r["std_t"] < 1 and 0 < r["loss_r"] < 2
    assert ck["kind"] == "asit-pretrain" and ck["model"]["center_global"].abs().sum() > 0
    A.ASiT(**ck["model_args"]).load_state_dict(ck["model"])  # strict


@pytest.mark.parametrize("script", ["pretrain_frame.py", "pretrain_asit.py"])
def test_torchrun_two_ranks_gloo_identical_weights(data_root, tmp_path, script):
    out = str(tmp_path / "ddp")
    p = run(script, *TINY, "--max_steps", "4", "--log_every", "2", "--out_dir",
            out, data_root=data_root, nproc=2)
    assert "weights identical on 2 ranks" in p.stdout
    # the tiny preset's 4 warmup epochs (32 steps) would outlast 4 steps: cut, and said
    assert "reaches the last step (4); warming up over 0 steps" in p.stdout
    assert "= 16 x 2 ranks x 1 accum" in p.stdout
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 4


@pytest.mark.parametrize("script", ["pretrain_frame.py", "pretrain_asit.py"])
def test_killed_run_resumes_to_the_same_weights(data_root, tmp_path, script):
    """Killed at step 5 (after logging it), with the debris of a save a kill interrupted, the
    rerun removes the debris, drops the log past its checkpoint, and ends bit-identical to an
    uninterrupted run; rerunning that finished folder with fewer steps says what to do."""
    args = [*TINY, "--max_steps", "6", "--warmup_epochs", "0.25", "--ckpt_every", "2",
            "--log_every", "1", "--micro_batch", "16"]  # 2 accumulation steps per step
    run(script, *args, "--out_dir", str(tmp_path / "a"), data_root=data_root)
    killed = run(script, *args, "--out_dir", str(tmp_path / "b"), data_root=data_root,
                 check=False, env=dict(ATST_DIE_AT_STEP="5"))
    assert killed.returncode == -9
    assert load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 4
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3, 4, 5]
    for debris in (".ckpt.pt.atst-partial-4242", ".views_rank0_step6.pt.atst-partial-4243"):
        (tmp_path / "b" / debris).write_bytes(b"half a checkpoint")
    p = run(script, *args, "--out_dir", str(tmp_path / "b"), data_root=data_root)
    assert "resumed from" in p.stdout and "at step 4" in p.stdout
    assert not list((tmp_path / "b").glob(".*partial*")) and "removed" in p.stdout
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    a = load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    b = load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(
        a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))
    banks = [torch.load(tmp_path / r / "views_rank0_step6.pt") for r in "ab"]  # Mixup FIFO
    assert banks[0]["step"] == banks[1]["step"] == 6
    assert all(torch.equal(banks[0]["views"][k], banks[1]["views"][k]) for k in banks[0]["views"])
    assert sorted(x.name for x in (tmp_path / "a").glob("views_*")) == [
        "views_rank0_step4.pt", "views_rank0_step6.pt"]                 # the last two saves
    p = run(script, *args, "--max_steps", "5", "--out_dir", str(tmp_path / "a"),
            data_root=data_root, check=False)
    assert p.returncode == 1 and "is at step 6, past this run's last step 5" in p.stderr
    assert "Traceback" not in p.stderr


def test_non_finite_loss_stops_with_a_message(data_root, tmp_path):
    p = run("pretrain_frame.py", *TINY, "--max_steps", "4", "--warmup_epochs", "0",
            "--base_lr", "1e30", "--out_dir", str(tmp_path / "nan"), data_root=data_root,
            check=False)
    assert p.returncode == 1 and "non-finite loss" in p.stderr


def test_a_missing_file_is_reported_before_training(data_root, tmp_path):
    """A missing file in the last row of a manifest stops the run before training (a short
    run never reads that row), with its one line."""
    rows = D.read_manifest(D.resolve_manifest("demo", "train", data_root))
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path\n" + "".join(r["path"] + "\n" for r in rows[:100]) +
                        str(tmp_path / "gone.wav") + "\n")
    p = run("pretrain_clip.py", *TINY, "--data", str(csv_path), "--max_steps", "1",
            "--out_dir", str(tmp_path / "o"), data_root=data_root, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "1 of 101 audio files listed in" in p.stderr and "m.csv line 102" in p.stderr
    assert "gone.wav" in p.stderr and "step 1/1" not in p.stdout


def _manifest(path, rows, bad):
    """A manifest of `rows` whose indices in `bad` ({index: file}) list that file instead."""
    path.write_text("path\n" + "".join(bad.get(i, r["path"]) + "\n" for i, r in enumerate(rows)))
    return str(path)


def test_corrupt_clips_are_replaced_named_and_replaced_alike_on_resume(data_root, tmp_path):
    """The demo manifest with a truncated FLAC read in step 2 and an empty file read in step
    5: the run finishes and names both (a line each, and unreadable.txt). Killed at step 5
    and resumed from step 4, it meets the second again, replaces it the same way, ends
    bit-identical to the uninterrupted run and holds the same list."""
    rows = D.read_manifest(D.resolve_manifest("demo", "train", data_root))
    stream = iter(L.StreamSampler(len(rows), 16, seed=0))  # 2 micro-batches of 16 a step
    order = [next(stream) for _ in range(10)]
    cut, empty = order[2][0][0], order[9][5][0]                      # in steps 2 and 5
    sf.write(tmp_path / "full.flac", np.random.default_rng(0).uniform(-.5, .5, 160000), 16000)
    flac = (tmp_path / "full.flac").read_bytes()  # its header says 10 s
    (tmp_path / "cut.flac").write_bytes(flac[:len(flac) // 3])
    (tmp_path / "empty.wav").write_bytes(b"")
    csv_path = _manifest(tmp_path / "m.csv", rows, {cut: str(tmp_path / "cut.flac"),
                                                     empty: str(tmp_path / "empty.wav")})
    args = ["pretrain_frame.py", *TINY, "--data", csv_path, "--max_steps", "6",
            "--warmup_epochs", "0.25", "--ckpt_every", "2", "--log_every", "1",
            "--micro_batch", "16"]
    a = run(*args, "--out_dir", str(tmp_path / "a"), data_root=data_root)
    named = [line for line in a.stdout.splitlines() if line.startswith("replaced an unreadable")]
    assert len(named) == 2 and f"step 2: {csv_path} line {cut + 2}: " in named[0]
    assert "cut.flac" in named[0] and f"step 5: {csv_path} line {empty + 2}: " in named[1]
    assert "empty.wav" in named[1] and "done:" in a.stdout
    listed = (tmp_path / "a" / "unreadable.txt").read_text().splitlines()
    assert listed == [line.split(", ", 1)[1] for line in named]
    killed = run(*args, "--out_dir", str(tmp_path / "b"), data_root=data_root, check=False,
                 env=dict(ATST_DIE_AT_STEP="5"))
    assert killed.returncode == -9 and named[1] in killed.stdout
    resumed = run(*args, "--out_dir", str(tmp_path / "b"), data_root=data_root)
    assert "at step 4" in resumed.stdout and named[1] in resumed.stdout
    assert named[0] not in resumed.stdout
    assert (tmp_path / "b" / "unreadable.txt").read_text().splitlines() == listed
    a, b = (load_checkpoint(str(tmp_path / r / "ckpt.pt"))["model"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_corrupt_clips_stop_every_rank_with_the_list(data_root, tmp_path):
    """24 of 64 clips are not audio: on 2 processes (gloo) the failures pass 10 (and 0.1% of
    the clips read) in the first steps; each rank stops by itself with the same one line,
    naming the list, which holds every failure said. The ranks are two SLURM tasks, not
    torchrun's, which would end the second as soon as the first exits."""
    rows = D.read_manifest(D.resolve_manifest("demo", "train", data_root))[:64]
    bad = {}
    for i in range(0, 64, 8):
        for k in range(3):
            bad[i + k] = str(tmp_path / f"bad{i + k}.wav")
            (tmp_path / f"bad{i + k}.wav").write_text("not audio")
    out = tmp_path / "o"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in (
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(ATST_DATA=data_root, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               SLURM_JOB_ID="4243", SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="localhost",
               MASTER_PORT=str(_free_port()))
    tasks = [subprocess.Popen(
        [sys.executable, "pretrain_clip.py", *TINY, "--data",
         _manifest(tmp_path / "m.csv", rows, bad), "--max_steps", "4", "--out_dir", str(out)],
        cwd=HERE, env=dict(env, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    said = [t.communicate(timeout=600) for t in tasks]
    assert [t.returncode for t in tasks] == [1, 1] and "step 4/4" not in said[0][0]
    errors = [[x for x in err.splitlines() if x.startswith("error: ")] for _, err in said]
    assert errors[0] == errors[1] and len(errors[0]) == 1, said[1][1][-3000:]
    errors = errors[0]
    assert "clips read so far failed to decode (more than 10 and 0.1%)" in errors[0]
    assert f"listed in {out / 'unreadable.txt'}" in errors[0]
    listed = (out / "unreadable.txt").read_text().splitlines()
    named = [x for x in said[0][0].splitlines() if x.startswith("replaced an unreadable")]
    assert len(listed) == len(named) == int(errors[0].split()[1]) > 10
    assert all("cannot read audio file" in x and "bad" in x for x in listed)


def test_asit_losses():
    """Constant student logits give exactly log K; swapping the two crops leaves the global
    loss unchanged (symmetric); one centre update from zero is 0.1 x the batch mean; the
    reconstruction loss ignores uncorrupted pixels."""
    K = 40
    t = torch.randn(5, K)
    assert math.isclose(A.dino_ce(torch.zeros(5, K), t, torch.zeros(1, K), 0.04).item(),
                        math.log(K), rel_tol=1e-6)
    clean, corrupt, mask = asit_inputs()
    swap = lambda x: torch.cat(x.chunk(2)[::-1])
    a = asit_pair(drop_path=0.0)(clean, corrupt, mask)[1]
    b = asit_pair(drop_path=0.0)(swap(clean), swap(corrupt), swap(mask))[1]
    for k in ("loss_g", "loss_l", "loss_r"):
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    model = asit_pair()
    tg, tl = torch.randn(6, 40), torch.randn(30, 24)
    model.update_centers(tg, tl)
    assert torch.allclose(model.center_global, 0.1 * tg.mean(0, keepdim=True), atol=1e-7)
    assert torch.allclose(model.center_local, 0.1 * tl.mean(0, keepdim=True), atol=1e-7)
    pred = torch.randn_like(clean)
    other = torch.where(mask.bool(), pred, pred + 5.0)            # differs off the mask only
    assert A.masked_l1(pred, clean, mask) == A.masked_l1(other, clean, mask)
    assert torch.isclose(A.masked_l1(pred, clean, mask), (pred - clean).abs()[mask.bool()].mean())


def test_asit_step_prototypes_teacher_and_clipping():
    """After an optimizer step the prototype rows are still unit vectors (logits are cosines)
    and no parameter holds their norm; the teacher gets no gradient and one EMA update is
    exact; per-tensor clipping leaves every gradient norm <= 3."""
    model = asit_pair()
    names = {n for n, _ in model.student.head.named_parameters() if not n.startswith("mlp.")}
    assert names == {"global_protos", "local_protos"}             # no trained norm (weight_g)
    opt = torch.optim.AdamW(M.param_groups(model), lr=0.5)
    loss, _ = model(*asit_inputs(), teacher_temp=0.04)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for p in grads:
        p.mul_(100)
    pretrain.clip_per_tensor(grads, 3.0)
    assert max(g.norm().item() for g in grads) <= 3.0 + 1e-4
    opt.step()
    head, h = model.student.head, torch.randn(2, 5, 32)
    with torch.no_grad():
        g0, l0, _ = head(h)
        head.global_protos.mul_(7.0)                              # the norm does not matter
        g_logits, l_logits, _ = head(h)
    assert torch.allclose(g_logits, g0, atol=1e-5) and torch.equal(l_logits, l0)
    assert g_logits.abs().max() <= 1 + 1e-5 and l_logits.abs().max() <= 1 + 1e-5
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for t0, t, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_clip_per_tensor_scales_as_the_rule_tensor_by_tensor():
    """The scales are computed for all tensors at once; each gradient comes out bit for bit as
    the rule applied tensor by tensor (the code before, kept here) leaves it: a tensor over
    the clip scaled to it, one under it untouched."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) * k
             for shape, k in (((64, 32), 5.0), ((32,), 0.01), ((3, 4, 5), 1.0), ((), 10.0))]
    ref, small = [t.clone() for t in grads], grads[1].clone()
    norms = torch._foreach_norm(ref)
    torch._foreach_mul_(ref, [(3.0 / (n + 1e-6)).clamp(max=1.0) for n in norms])
    pretrain.clip_per_tensor(grads, 3.0)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref))
    assert torch.equal(grads[1], small) and grads[0].norm() == pytest.approx(3.0)


def test_compiled_encoders_train_as_uncompiled_ones(data_root, tmp_path):
    """--compile (torch.compile of the encoders; inductor's C++ on the CPU) trains as the
    uncompiled run: the loss of each of 2 steps within 1e-4 (compiled kernels round
    otherwise; drop-path draws what eager draws), and the checkpoint has the same keys and
    loads strictly into an uncompiled model."""
    outs = [str(tmp_path / k) for k in ("eager", "compiled")]
    procs = run_together([("pretrain_frame.py", *TINY, "--max_steps", "2", "--log_every", "1",
                           "--out_dir", out, "--compile", str(k == 1)) for k, out in
                          enumerate(outs)], data_root=data_root, env=dict(TORCH_LOGS="dynamo"))
    assert ["torchdynamo start tracing" in p.stderr for p in procs] == [False, True]
    (eager, ck_eager), (compiled, ck) = ((read_log(o), load_checkpoint(
        os.path.join(o, "ckpt.pt"))) for o in outs)
    assert [r["step"] for r in compiled] == [1, 2] and ck["config"]["compile"]
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(eager, compiled))
    assert list(ck["model"]) == list(ck_eager["model"])
    M.ATST(**ck["model_args"]).load_state_dict(ck["model"])       # strict


def test_the_recipe_betas_lr_rule_and_ema_ramp_reach_the_loop(data_root, tmp_path):
    """A method's config block sets AdamW's betas, the lr scaling rule and the EMA ramp."""
    out = tmp_path / "r"
    run("pretrain_frame.py", *TINY, "--max_steps", "4", "--warmup_epochs", "0", "--log_every",
        "1", "--beta2", "0.95", "--lr_rule", "none", "--ema_ramp", "linear", "--ema_m0", "0.9",
        "--min_lr", "0.004", "--out_dir", str(out), data_root=data_root)
    ck = load_checkpoint(str(out / "ckpt.pt"))
    assert all(g["betas"] == (0.9, 0.95) for g in ck["optimizer"]["param_groups"])
    log = read_log(out)
    assert [round(r["ema"], 6) for r in log] == [0.9, 0.925, 0.95, 0.975]  # linear to 1
    assert all(math.isclose(r["lr"], 4e-3) for r in log)  # base_lr as is: no batch / 256


FAKE_SRUN = """#!{python}
# stands in for SLURM's srun: the command once per node (SLURM_NNODES), with srun's variables
import os, subprocess, sys
args = sys.argv[1:]
cmd = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
n = int(os.environ["SLURM_NNODES"])
procs = [subprocess.Popen(cmd, env=dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i),
                                        SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS=str(n),
                                        SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"]))
         for i in range(n)]
codes = [p.wait() for p in procs]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_launched_as_clusters_launch_it_gives_the_same_weights(data_root, tmp_path):
    """ATST-Clip pre-training on 2 processes accumulating 2 micro-batches a step, launched
    three ways, ends bit-identical: torchrun
    on one node; two SLURM tasks without torchrun (they form one job from SLURM's variables);
    and slurm.sh on two nodes (simulated on this machine: a stand-in srun starts one torchrun
    agent per node, meeting by c10d at the first node), killed at step 3 and restarted as a
    requeue would, its rank 0 now on another host than the lock names (the lock knows the
    job and is taken over). Tasks whose --out_dir is not one folder stop at once."""
    args = ["pretrain_clip.py", *TINY, "--max_steps", "4", "--warmup_epochs", "0",
            "--ckpt_every", "2", "--num_workers", "0", "--micro_batch", "8"]  # 2 accum steps
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in (
                "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    base.update(ATST_DATA=data_root, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = {k: str(tmp_path / k) for k in ("torchrun", "srun", "sbatch")}
    run(*args, "--out_dir", out["torchrun"], data_root=data_root, nproc=2)
    # two SLURM tasks (srun -n 2 python ...), no torchrun
    slurm = dict(base, SLURM_JOB_ID="4241", SLURM_STEP_NUM_TASKS="2",
                 SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(_free_port()))
    tasks = [subprocess.Popen([sys.executable, *args, "--out_dir", out["srun"]], cwd=HERE,
                              env=dict(slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    said = [t.communicate(timeout=600) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], said[0][1][-2000:]
    assert "2 ranks (srun)" in said[0][0] and "weights identical on 2 ranks" in said[0][0]
    # the same tasks, each in a folder of its own (node-local working directories), with a
    # relative --out_dir: not one folder; every rank stops at once, saying so
    slurm["MASTER_PORT"] = str(_free_port())
    for i in range(2):
        (tmp_path / f"node{i}").mkdir()
    tasks = [subprocess.Popen([sys.executable, os.path.join(HERE, args[0]), *args[1:],
                               "--out_dir", "out"], cwd=str(tmp_path / f"node{i}"),
                              env=dict(slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    said = [t.communicate(timeout=600) for t in tasks]
    assert [t.returncode for t in tasks] == [1, 1]
    for _, err in said:
        assert err.strip().splitlines()[-1].startswith("error: rank 1 on ") and \
            "does not see the lock rank 0 took in out: with several nodes, --out_dir must " \
            "be a folder every node sees" in err and "Traceback" not in err
    assert not (tmp_path / "node0" / "out" / "run.lock").exists()          # released
    # sbatch --nodes=2 slurm.sh ...: stand-ins for srun, scontrol (the node list) and torchrun
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)),
                       ("scontrol", "#!/bin/sh\necho localhost\n"),
                       ("torchrun", f"#!/bin/sh\nexec {sys.executable} -m torch.distributed.run "
                                    "\"$@\"\n")):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    job = dict(base, PATH=f"{fake}:{base['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=HERE, GPUS_PER_NODE="1",
               RDZV_PORT=str(_free_port()))
    sbatch = lambda **env: subprocess.run(  # from elsewhere, as sbatch runs its spooled copy
        ["bash", os.path.join(HERE, "slurm.sh"), *args, "--out_dir", out["sbatch"]],
        cwd=str(tmp_path), env=dict(job, **env), capture_output=True, text=True, timeout=600)
    killed = sbatch(ATST_DIE_AT_STEP="3")
    assert killed.returncode != 0 and "2 nodes x 1 processes" in killed.stdout
    assert load_checkpoint(os.path.join(out["sbatch"], "ckpt.pt"))["step"] == 2
    lock = os.path.join(out["sbatch"], "run.lock")
    held = json.load(open(lock))
    assert held["job"] == "slurm 4242"
    json.dump(dict(held, host="node-gone"), open(lock, "w"))  # rank 0 ran on another node
    p = sbatch(SLURM_RESTART_COUNT="1")                        # as SLURM requeues
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert "an earlier start of this job" in p.stdout and "resumed from" in p.stdout
    assert "at step 2" in p.stdout and "weights identical on 2 ranks" in p.stdout
    ref = load_checkpoint(os.path.join(out["torchrun"], "ckpt.pt"))
    for how in ("srun", "sbatch"):
        ck = load_checkpoint(os.path.join(out[how], "ckpt.pt"))
        assert ck["step"] == 4
        assert all(torch.equal(ref["model"][k], ck["model"][k]) for k in ref["model"]), how
