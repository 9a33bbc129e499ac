"""
Tests: the pure pieces (front-end, tokens, masking, schedules, EMA, augmentations, checkpoints,
bad input) and the real scripts end to end on the demo data with the tiny preset, on CPU,
including a 2-process torchrun on gloo and a kill-and-resume run.

    python -m pytest -q test_smoke.py
"""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio

import data as D
import model as M
from augment import FreqWarp, Mixup, RandomResizedCrop, random_crops, resample_boxes

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The demo data, generated once per test session (the real generator, real WAV files)."""
    root = os.environ.get("ATST_TEST_DATA") or str(tmp_path_factory.mktemp("data"))
    D.make_demo(root)
    return root


def run(script, *args, data_root, nproc=0, check=True):
    """Run a stage script as a user would; returns the completed process."""
    env = dict(os.environ, ATST_DATA=data_root, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
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

# ---------------------------------------------------------------------------------- front-end


def test_front_end_matches_spec_parameters():
    """Same as an independent STFT -> HTK mel (60-7800 Hz) -> dB -> fixed min-max pipeline."""
    torch.manual_seed(0)
    wav = torch.randn(2, 16000) * 0.1
    spec = torch.stft(wav, 1024, 160, 1024, torch.hann_window(1024), center=True,
                      pad_mode="reflect", return_complex=True).abs() ** 2      # (B, 513, T)
    fb = torchaudio.functional.melscale_fbanks(513, 60.0, 7800.0, 64, 16000, mel_scale="htk")
    db = 10 * torch.log10((fb.T @ spec).clamp(min=1e-10))
    db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - 80)             # per clip
    ref = (db + 79.6482) / (50.6842 + 79.6482) * 2 - 1
    out = M.MelFrontEnd()(wav)
    assert out.shape == (2, 64, 101)
    assert torch.allclose(out, ref, atol=1e-4)


def test_front_end_gain_and_per_clip_cutoff():
    """x10 in amplitude is +20 dB everywhere (the top_db floor moves with the clip's maximum),
    i.e. +40/130.3324 in the normalised domain; a quiet clip batched with a loud one gets the
    same output as alone (one cut-off per clip, not per batch)."""
    torch.manual_seed(0)
    w = torch.randn(1, 32000) * 0.01
    fe = M.MelFrontEnd()
    shift = fe(w * 10) - fe(w)
    assert torch.allclose(shift, torch.full_like(shift, 40 / (50.6842 + 79.6482)), atol=1e-4)
    batch = fe(torch.cat([w * 100, w]))
    assert torch.allclose(batch[1], fe(w)[0], atol=1e-5)


def test_ten_seconds_is_1001_frames_and_250_tokens():
    wav = torch.zeros(1, 10 * M.SAMPLE_RATE).uniform_(-0.1, 0.1)
    mel = M.MelFrontEnd()(wav)
    assert mel.shape == (1, 64, 1001) and M.frames_for(160000) == 1001
    assert M.tokens_for(160000) == 250 and M.tokens_for(6 * 16000) == 150
    enc = M.Encoder(dim=32, depth=2, heads=2, mask_token=True)
    assert enc(mel).shape == (1, 250, 32)
    clip = M.Encoder(dim=32, depth=2, heads=2, cls_token=True)
    assert clip(mel[..., :601]).shape == (1, 151, 32)
    with pytest.raises(ValueError, match="positional table"):
        enc(torch.zeros(1, 64, 1005))


def test_tokens_are_mel_major_four_frame_stacks():
    """Token n holds frames 4n..4n+3 of every mel bin at index mel*4 + offset (SPEC 2)."""
    enc = M.Encoder(dim=8, depth=1, heads=1)
    seen = {}
    enc.patch_embed.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    mel = torch.arange(64 * 9, dtype=torch.float32).view(1, 64, 9)  # value = mel * 9 + frame
    enc(mel)
    x = seen["x"]
    assert x.shape == (1, 2, 256)  # trailing 9 mod 4 = 1 frame dropped
    assert x[0, 1, 5 * 4 + 2] == 5 * 9 + (4 + 2)


def test_padding_mask_gives_same_tokens_as_unpadded():
    torch.manual_seed(0)
    enc = M.Encoder(dim=32, depth=2, heads=4, cls_token=True).eval()
    mel = torch.randn(1, 64, 400)
    padded = F.pad(mel, (0, 600), value=0.3)
    alone = enc(mel)
    both = enc(torch.cat([padded, torch.randn(1, 64, 1000)]), n_valid=torch.tensor([100, 250]))
    assert torch.allclose(both[0, :101], alone[0], atol=1e-5)

# ---------------------------------------------------------------------------------- masking


def _runs(row):
    runs, r = [], 0
    for v in row.tolist() + [False]:
        if v:
            r += 1
        elif r:
            runs.append(r)
            r = 0
    return runs


def test_group_mask_statistics():
    """Over many draws at N=250: masked fraction 0.50 +- 0.02 (SPEC: mean 50.3%), every
    masked run at least 5 tokens, and per-clip fractions in the expected ~38-61% band."""
    g = torch.Generator().manual_seed(0)
    m = M.group_mask(torch.full((4000,), 250), 250, span=5, prob=0.65, generator=g)
    frac = m.float().mean(1)
    assert abs(frac.mean().item() - 0.50) < 0.02
    assert 0.30 < frac.min().item() and frac.max().item() < 0.70
    assert min(r for row in m[:300] for r in _runs(row)) >= 5
    assert not m[:, -1].any()  # starts are drawn from [0, N - 5): the last token never masks


def test_group_mask_respects_valid_lengths_and_random_mode():
    g = torch.Generator().manual_seed(1)
    n_valid = torch.tensor([250, 100, 30])
    m = M.group_mask(n_valid, 250, generator=g)
    for i, n in enumerate(n_valid.tolist()):
        assert not m[i, n:].any() and m[i, :n].any()
    r = M.group_mask(torch.full((2000,), 250), 250, span=1, prob=0.5, generator=g)
    assert abs(r.float().mean().item() - 0.5) < 0.02
    assert sum(x == 1 for row in r[:50] for x in _runs(row)) > 100  # isolated tokens occur

# ---------------------------------------------------------------------------------- schedules, EMA


def test_schedules_hit_end_points():
    lr = M.cosine_schedule(1e-3, 1e-6, 1000, warmup_steps=100)
    assert len(lr) == 1001 and lr[0] == 0 and math.isclose(lr[100].item(), 1e-3)
    assert math.isclose(lr[-1].item(), 1e-6) and (lr[:101].diff() > 0).all()
    assert (lr[100:].diff() <= 0).all()
    wd = M.cosine_schedule(0.04, 0.4, 500)
    assert math.isclose(wd[0].item(), 0.04) and math.isclose(wd[-1].item(), 0.4)
    m = M.ema_schedule(0.996, 500)
    assert math.isclose(m[0].item(), 0.996) and m[-1].item() == 1.0 and (m.diff() >= 0).all()
    assert math.isclose(m[250].item(), 1 - 0.004 / 2, rel_tol=1e-9)  # half way: cos = 0


def test_ema_update():
    torch.manual_seed(0)
    model = M.ATST("frame", **M.PRESETS["tiny"])
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    model.update_teacher(0.5)
    mid = [(a + s) / 2 for a, s in zip(before, model.student.parameters())]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(mid, model.teacher.parameters()))
    model.update_teacher(0.0)
    assert all(torch.equal(t, s) for t, s in
               zip(model.teacher.parameters(), model.student.parameters()))


def test_weight_decay_groups_and_collapse_std():
    groups = M.param_groups(M.Encoder(dim=32, depth=2, heads=2))
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0
    torch.manual_seed(0)
    spread = F.normalize(torch.randn(20000, 256), dim=-1)
    assert abs(M.collapse_std(spread) - 1 / 16) < 0.002
    assert M.collapse_std(spread[:1].expand(100, -1)) < 1e-6

# ---------------------------------------------------------------------------------- augmentations


def _mel(B=4, T=301, seed=0):
    return torch.rand(B, 64, T, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_augmentations_keep_shape_and_change_content():
    x = _mel()
    g = torch.Generator().manual_seed(0)
    mix = Mixup(bank_size=8)
    assert torch.equal(mix(x, g), x)  # empty bank: nothing to mix yet
    mix.push(_mel(seed=1))
    for aug in (mix, RandomResizedCrop(), FreqWarp("paper")):
        y = aug(x, g)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert (y - x).abs().mean() > 1e-3, aug
    # the 'code' rule leaves about 56% of clips unchanged (h >= F), the rest are warped
    y = FreqWarp("code")(_mel(B=400), torch.Generator().manual_seed(0))
    same = ((y - _mel(B=400)).abs().amax((1, 2)) < 1e-4).float().mean().item()
    assert 0.45 < same < 0.67


def test_augmentations_are_reproducible_from_the_generator():
    x = _mel()
    for aug in (RandomResizedCrop(), FreqWarp()):
        a = aug(x, torch.Generator().manual_seed(5))
        b = aug(x, torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


def test_resample_box_identity_and_interpolate_equivalence():
    """The identity box returns the input; an interior box equals BYOL-A's crop followed by
    F.interpolate(bicubic, align_corners=True) away from the crop border."""
    x = _mel(B=2, T=101)
    B = x.shape[0]
    full = lambda v: torch.full((B,), float(v))
    assert torch.allclose(resample_boxes(x, full(0), full(64), full(0), full(101)), x, atol=1e-4)
    ref = F.interpolate(x[:, None, 5:45, 10:70], size=(64, 101), mode="bicubic",
                        align_corners=True)[:, 0]
    y = resample_boxes(x, full(5), full(40), full(10), full(60))
    assert torch.allclose(y[:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-4)


def test_freq_warp_leaves_time_alone_and_mixup_stays_between():
    t = torch.linspace(-1, 1, 200)
    x = t.view(1, 1, -1).expand(16, 64, -1).contiguous()  # depends on time only
    assert torch.allclose(FreqWarp("paper")(x, torch.Generator().manual_seed(0)), x, atol=1e-4)
    a, z = _mel(B=64), _mel(B=1, seed=3).bfloat16().float()  # the bank holds bf16
    mix = Mixup(bank_size=4)
    mix.push(z)
    y = mix(a, torch.Generator().manual_seed(0))  # log-mean-exp lies between its inputs
    assert (y >= torch.minimum(a, z) - 1e-5).all() and (y <= torch.maximum(a, z) + 1e-5).all()
    assert (y - a).abs().amax((1, 2)).max() > 0.05


def test_mixup_bank_is_a_fifo_and_round_trips():
    mix = Mixup(bank_size=3)
    for v in range(5):
        mix.push(torch.full((1, 2, 4), float(v) / 10))
    assert sorted(round(x, 2) for x in mix.bank[:, 0, 0].float().tolist()) == [0.2, 0.3, 0.4]
    other = Mixup(bank_size=3)
    other.load_state_dict(mix.state_dict())
    assert torch.equal(other.bank, mix.bank) and int(other.count) == other.seen == 5
    x = torch.zeros(2, 2, 4)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(other(x, g()), mix(x, g())) and not torch.equal(other(x, g()), x)


def test_random_crops():
    x = torch.arange(20.0).view(1, 1, 20).expand(3, 2, 20)
    y = random_crops(x, 6, torch.Generator().manual_seed(0))
    assert y.shape == (3, 2, 6)
    assert (y.diff(dim=-1) == 1).all()  # contiguous segments

# ---------------------------------------------------------------------------------- I/O


def test_checkpoint_round_trip_is_strict(tmp_path):
    torch.manual_seed(0)
    a = M.ATST("clip", **M.PRESETS["tiny"])
    path = str(tmp_path / "ck.pt")
    D.save_atomic(dict(model=a.state_dict(), model_args=dict(method="clip")), path,
                  summary=dict(step=0))
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "ck.pt.json"]  # no temporary left
    ck = D.load_checkpoint(path)
    torch.manual_seed(1)
    b = M.ATST("clip", **M.PRESETS["tiny"])
    b.load_state_dict(ck["model"])
    x = _mel(B=2, T=601)
    a.eval(), b.eval()
    assert torch.equal(a.teacher.encoder(x), b.teacher.encoder(x))
    del ck["model"]["predictor.0.weight"]
    with pytest.raises(RuntimeError, match="predictor.0.weight"):
        b.load_state_dict(ck["model"])


def test_stream_sampler_resumes_and_splits_ranks():
    full = iter(D.StreamSampler(50, 4, rank=0, world=2, seed=3))
    batches = [next(full) for _ in range(20)]
    resumed = iter(D.StreamSampler(50, 4, rank=0, world=2, seed=3, start=13))
    assert next(resumed) == batches[13]
    other = next(iter(D.StreamSampler(50, 4, rank=1, world=2, seed=3)))
    assert not {i for i, _ in batches[0]} & {i for i, _ in other}
    epoch0 = [i for b in batches[:6] for i, _ in b]  # 6 batches per epoch of 50 // 8
    assert len(set(epoch0)) == len(epoch0)


def test_config_flags(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("")
    g = {"__file__": str(script), "__doc__": "x", "lr": 0.1, "flag": False, "name": "a",
         "preset": "big"}
    presets = {"big": dict(lr=1.0), "small": dict(lr=0.5, name="s")}
    cfg = D.configure(g, presets, ["--preset", "small", "--flag", "false", "--name", "b"])
    assert cfg == {"lr": 0.5, "flag": False, "name": "b", "preset": "small"}
    assert D.configure(dict(g, flag=False), None, ["--flag", "true"])["flag"] is True


def test_bad_input_errors_name_the_file(tmp_path):
    good = tmp_path / "a.wav"
    sf.write(good, np.zeros(1600, np.float32), 16000)
    (tmp_path / "bad.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    for name, msg in (("missing.wav", "not found"), ("bad.wav", "cannot read"),
                      ("empty.wav", "zero length"), ("nan.wav", "NaN")):
        with pytest.raises(D.AudioError, match=msg) as e:
            D.load_audio(str(tmp_path / name), 1.0, np.random.default_rng(0), "m.csv line 3")
        assert name in str(e.value) and "m.csv line 3" in str(e.value)
    (tmp_path / "empty.csv").write_text("path\n")
    with pytest.raises(ValueError, match="empty.csv: manifest is empty"):
        D.read_manifest(str(tmp_path / "empty.csv"))
    (tmp_path / "nopath.csv").write_text("file\na.wav\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        D.read_manifest(str(tmp_path / "nopath.csv"))
    with pytest.raises(FileNotFoundError, match="expected .*as20k"):
        D.resolve_manifest("as20k", "train", str(tmp_path))


def test_load_audio_crops_pads_resamples(tmp_path):
    sr = 44100
    t = np.arange(int(2.5 * sr)) / sr
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], 1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo, sr)
    wav, valid = D.load_audio(str(tmp_path / "s.wav"), 4.0)
    assert wav.shape == (64000,) and abs(valid - 40000) <= 2 and wav[valid:].abs().max() == 0
    assert abs(wav[:valid].abs().max().item() - 0.5) < 0.02  # mono = mean of the channels
    wav, valid = D.load_audio(str(tmp_path / "s.wav"), 1.0, np.random.default_rng(0))
    assert wav.shape == (16000,) and valid == 16000
    assert D.write_manifest(str(tmp_path), str(tmp_path / "m" / "all.csv")) == 1
    assert D.read_manifest(str(tmp_path / "m" / "all.csv"))[0]["path"] == str(tmp_path / "s.wav")


def test_demo_data_is_real_audio_with_labels(data_root):
    rows = D.read_manifest(D.resolve_manifest("demo_events", "test", data_root), "label")
    assert len({r["label"] for r in rows}) == 8
    info = sf.info(rows[0]["path"])
    assert info.samplerate == 22050 and info.channels == 2
    tags = D.read_manifest(D.resolve_manifest("demo_tags", "train", data_root), "labels")
    assert any(";" in r["labels"] for r in tags)
    wav, valid = D.load_audio(D.read_manifest(D.resolve_manifest("demo", "train", data_root))[0]
                              ["path"], 10.0)
    assert valid == 160000 and wav.abs().max() > 0.05

# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def pretrained(data_root, tmp_path_factory):
    """Tiny ATST-Frame and ATST-Clip pre-trained on the demo data for 24 steps (real runs)."""
    out = {}
    for kind in ("frame", "clip"):
        out[kind] = str(tmp_path_factory.mktemp(f"pre_{kind}"))
        run(f"pretrain_{kind}.py", *TINY, "--max_steps", "24", "--warmup_epochs", "1",
            "--log_every", "4", "--out_dir", out[kind], data_root=data_root)
    return out


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_pretrain_demo_loss_falls_and_no_collapse(kind, pretrained):
    log = read_log(pretrained[kind])
    assert [r["step"] for r in log] == [4, 8, 12, 16, 20, 24]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert min(r["std_t"] for r in log) > 0.03 and min(r["std_s"] for r in log) > 0.01
    ck = D.load_checkpoint(os.path.join(pretrained[kind], "ckpt.pt"))
    assert ck["step"] == 24 and ck["model_args"]["method"] == kind
    model = M.ATST(**ck["model_args"])
    model.load_state_dict(ck["model"])  # strict


def test_torchrun_two_ranks_gloo_identical_weights(data_root, tmp_path):
    out = str(tmp_path / "ddp")
    p = run("pretrain_frame.py", *TINY, "--max_steps", "4", "--log_every", "2", "--out_dir",
            out, data_root=data_root, nproc=2)
    assert "weights identical on 2 ranks" in p.stdout
    assert "= 16 x 2 ranks x 1 accum" in p.stdout
    assert D.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 4


def test_killed_run_resumes_to_the_same_weights(data_root, tmp_path):
    args = [*TINY, "--max_steps", "6", "--warmup_epochs", "0.25", "--ckpt_every", "2",
            "--log_every", "2", "--micro_batch", "16"]  # 2 accumulation steps per step
    run("pretrain_frame.py", *args, "--out_dir", str(tmp_path / "a"), data_root=data_root)
    killed = run("pretrain_frame.py", *args, "--out_dir", str(tmp_path / "b"), "--die_at_step",
                 "5", data_root=data_root, check=False)
    assert killed.returncode == -9
    assert D.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["step"] == 4
    p = run("pretrain_frame.py", *args, "--out_dir", str(tmp_path / "b"), data_root=data_root)
    assert "resumed from" in p.stdout and "at step 4" in p.stdout
    a = D.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    b = D.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(
        a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))


def test_non_finite_loss_stops_with_a_message(data_root, tmp_path):
    p = run("pretrain_frame.py", *TINY, "--max_steps", "4", "--warmup_epochs", "0",
            "--base_lr", "1e30", "--out_dir", str(tmp_path / "nan"), data_root=data_root,
            check=False)
    assert p.returncode == 1 and "non-finite loss" in p.stderr


def test_bad_manifest_row_is_reported(data_root, tmp_path):
    rows = D.read_manifest(D.resolve_manifest("demo", "train", data_root))
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path\n" + "".join(r["path"] + "\n" for r in rows[:40]) +
                        str(tmp_path / "gone.wav") + "\n")
    p = run("pretrain_clip.py", *TINY, "--data", str(csv_path), "--max_steps", "3",
            "--batch_size", "41", "--out_dir", str(tmp_path / "o"), data_root=data_root,
            check=False)
    assert p.returncode != 0
    assert "m.csv line 42" in p.stderr and "gone.wav" in p.stderr and "not found" in p.stderr

# ---------------------------------------------------------------------------------- inference API


def _official(enc, kind):
    """Our encoder's weights renamed to the released layout (SPEC 9)."""
    inverse = {v: k for k, v in M.OFFICIAL_NAMES.items()}
    if kind == "clip":  # ATST-Clip keeps `norm`
        inverse = {k: v for k, v in inverse.items() if not k.startswith("norm")}
    return {inverse.get(k, k): v.clone() for k, v in enc.state_dict().items()}


def _layouts(enc, kind):
    sd = _official(enc, kind)
    noise = {"weight": torch.zeros(3, 3)}
    if kind == "frame":
        yield "lightning", {"state_dict": {
            **{f"model.teacher.encoder.{k}": v for k, v in sd.items()},
            **{f"model.student.encoder.{k}": v * 0 for k, v in sd.items()},
            "model.teacher.projector.0.weight": noise["weight"]}}
        yield "finetuned", {"state_dict": {**{f"encoder.encoder.{k}": v for k, v in sd.items()},
                                           "head.weight": noise["weight"]}}
    else:
        yield "dino", {"teacher": {**{f"module.backbone.{k}": v for k, v in sd.items()},
                                   "module.head.mlp.0.weight": noise["weight"]}, "epoch": 3}
        yield "dino_nomodule", {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                                            "head.last_layer.weight": noise["weight"]}}


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_load_encoder_reads_every_layout_identically(kind, tmp_path):
    torch.manual_seed(0)
    enc = M.Encoder(dim=128, depth=2, heads=2, drop_path=0.0, cls_token=kind == "clip",
                    mask_token=kind == "frame")
    ref = M.AudioEncoder(enc, kind).eval()
    audio = torch.randn(2, 3 * 16000) * 0.1
    want = ref(audio, layers="all")
    for name, ck in _layouts(enc, kind):
        path = str(tmp_path / f"{name}.ckpt")
        torch.save(ck, path)
        got = M.load_encoder(path)
        assert got.kind == kind and got.encoder.depth == 2 and got.encoder.dim == 128, name
        e = got(audio, layers="all")
        assert torch.equal(e.frames, want.frames) and torch.equal(e.clip, want.clip), name
    # ours: a pre-training checkpoint (teacher encoder), heads taken from model_args
    torch.manual_seed(0)
    atst = M.ATST(kind, **M.PRESETS["tiny"])
    path = str(tmp_path / "ours.pt")
    D.save_atomic(dict(model=atst.state_dict(), model_args=dict(method=kind, **M.PRESETS["tiny"]),
                       kind="atst-pretrain"), path)
    got = M.load_encoder(path)
    assert got.encoder.blocks[0].attn.heads == 4
    x = M.MelFrontEnd()(audio)[..., :600]
    assert torch.equal(got.encoder(x), atst.teacher.encoder.eval()(x))


def test_load_encoder_names_missing_and_unexpected_keys(tmp_path):
    enc = M.Encoder(dim=128, depth=2, heads=2, mask_token=True)
    _, ck = next(_layouts(enc, "frame"))
    sd = ck["state_dict"]
    del sd["model.teacher.encoder.blocks.1.mlp.fc2.bias"]
    torch.save(ck, tmp_path / "missing.ckpt")
    with pytest.raises(KeyError, match=r"missing: \['blocks.1.mlp.fc2.bias'\]"):
        M.load_encoder(str(tmp_path / "missing.ckpt"))
    _, ck = next(_layouts(enc, "frame"))
    ck["state_dict"]["model.teacher.encoder.blocks.0.attn.qkv.bias"] = torch.zeros(384)
    torch.save(ck, tmp_path / "extra.ckpt")
    with pytest.raises(KeyError, match=r"unexpected: \['blocks.0.attn.qkv.bias'\]"):
        M.load_encoder(str(tmp_path / "extra.ckpt"))
    torch.save({"weights": 1}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="odd.ckpt: not a checkpoint layout"):
        M.load_encoder(str(tmp_path / "odd.ckpt"))


def _tiny_encoder(kind, seed=0):
    torch.manual_seed(seed)
    enc = M.Encoder(dim=64, depth=3, heads=4, drop_path=0.0, cls_token=kind == "clip",
                    mask_token=kind == "frame")
    return M.AudioEncoder(enc, kind).eval()


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_long_stereo_44k_audio_is_chunked_without_losing_frames(kind):
    ae = _tiny_encoder(kind)
    torch.manual_seed(1)
    stereo = torch.randn(1, 2, int(25 * 44100)) * 0.1
    e = ae(stereo, sample_rate=44100)
    # 25 s -> 2501 frames -> 625 tokens of 40 ms, centred at 20, 60, 100, ... 24980 ms
    assert e.frames.shape == (1, 625, 64) and e.lengths.tolist() == [625]
    assert e.timestamps[:3].tolist() == [20.0, 60.0, 100.0] and e.timestamps[-1] == 24980.0
    mono = torchaudio.functional.resample(stereo.mean(1), 44100, 16000)
    mel = ae.front(mono)
    C = 250 if kind == "frame" else 150           # chunk tokens (10 s / 6 s)
    skip = 1 if kind == "clip" else 0
    for k in range(625 // C + 1):                 # every chunk equals the encoder on its slice
        part = mel[..., 4 * C * k: 4 * min(C * (k + 1), 625)]
        assert torch.allclose(e.frames[:, C * k: C * (k + 1)], ae.encoder(part)[:, skip:],
                              atol=1e-5)
    assert e.clip.shape == (1, 64 * (2 if kind == "clip" else 1))


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_padded_batch_gives_the_embeddings_of_the_clip_alone(kind):
    ae = _tiny_encoder(kind)
    torch.manual_seed(2)
    short, long = torch.randn(3 * 16000) * 0.1, torch.randn(10 * 16000) * 0.1
    batch = torch.stack([F.pad(short, (0, 7 * 16000)), long])
    both = ae(batch, lengths=[3 * 16000, 10 * 16000], layers="all")
    alone = ae(short, layers="all")
    assert both.lengths.tolist() == [75, 250] and alone.frames.shape[1] == 75
    assert torch.allclose(both.frames[0, :75], alone.frames[0], atol=1e-5)
    assert both.frames[0, 75:].abs().max() == 0
    assert torch.allclose(both.clip[0], alone.clip[0], atol=1e-5)
    # and the alone path is the plain encoder on the clip's mel (no mask, no chunk padding)
    direct = torch.cat(ae.encoder(ae.front(short[None]), layers=[0, 1, 2]), -1)
    assert torch.allclose(alone.frames, direct[:, 1 if kind == "clip" else 0:], atol=1e-5)


def test_hear_api_as_the_runner_calls_it(tmp_path):
    import hear
    enc = M.Encoder(dim=128, depth=2, heads=2, mask_token=True)
    _, ck = next(_layouts(enc, "frame"))
    torch.save(ck, tmp_path / "frame.ckpt")
    model = hear.load_model(str(tmp_path / "frame.ckpt"))
    assert isinstance(model, torch.nn.Module) and model.sample_rate == 16000
    assert model.timestamp_embedding_size == model.scene_embedding_size == 2 * 128
    for seconds in (0.5, 2.0, 12.3):
        audio = torch.rand(3, int(seconds * 16000)) * 2 - 1  # (n_sounds, n_samples)
        emb, ts = hear.get_timestamp_embeddings(audio, model)
        n = int(seconds * 100 + 1) // 4
        assert emb.shape == (3, n, model.timestamp_embedding_size) and emb.dtype == torch.float32
        assert ts.shape == (3, n) and (ts.diff(dim=1) == 40).all() and (ts[:, 0] == 20).all()
        assert ts[0, -1] <= seconds * 1000
        scene = hear.get_scene_embeddings(audio, model)
        assert scene.shape == (3, model.scene_embedding_size) and torch.isfinite(scene).all()

# ---------------------------------------------------------------------------------- downstream


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_linear_features_are_every_block_and_12s_centre_in_chunks(kind, tmp_path):
    """12 blocks: features are 12*D (Frame mean) / 2*12*D (Clip [CLS, mean]); a 25 s clip is
    centre-cropped to 12 s and split into chunks; Clip: two 6 s chunks, both counted; Frame:
    10 s + 2 s, the 2 s trailing chunk (under half a chunk) is not counted."""
    torch.manual_seed(0)
    enc = M.Encoder(dim=16, depth=12, heads=2, drop_path=0.0, cls_token=kind == "clip",
                    mask_token=kind == "frame")
    ae = M.AudioEncoder(enc, kind).eval()
    assert ae.dims("all")[1] == (2 * 12 * 16 if kind == "clip" else 12 * 16)
    t = np.arange(25 * 16000) / 16000
    sig = (0.1 * np.sin(2 * np.pi * (200 + 40 * t) * t)).astype(np.float32)  # a slow chirp
    sf.write(tmp_path / "long.wav", sig, 16000)
    ds = D.LabelledClips([dict(path=str(tmp_path / "long.wav"), _where="x")], torch.zeros(1),
                         12.0)
    wav, valid, _ = ds[0]
    centre = torch.from_numpy(sig[int(6.5 * 16000):int(18.5 * 16000)])
    assert valid == 12 * 16000 and torch.allclose(wav, centre, atol=1e-4)  # 16-bit file
    e = ae(wav[None], layers="all")
    assert e.clip.shape == (1, ae.dims("all")[1]) and e.frames.shape[1] == 300  # 12 s
    f = e.frames[0]                                                         # (300, 12 * 16)
    if kind == "clip":  # per block [CLS, mean]: the means average two 150-token chunks
        means = e.clip.view(12, 2, 16)[:, 1].flatten()
        assert torch.allclose(means, (f[:150].mean(0) + f[150:].mean(0)) / 2, atol=1e-5)
        assert not torch.allclose(means, f[:150].mean(0), atol=1e-3)
    else:  # 250 + 50 tokens: the 50-token trailing chunk is not counted
        assert torch.allclose(e.clip[0], f[:250].mean(0), atol=1e-5)
        assert not torch.allclose(e.clip[0], f.mean(0), atol=1e-3)


def test_layer_wise_lr_scales_follow_spec():
    enc = M.Encoder(dim=16, depth=12, heads=2)
    model = M.Classifier(M.AudioEncoder(enc, "frame"), 5)
    scale = {id(p): g["lr_scale"] for g in M.layer_decay_groups(model, 0.75) for p in g["params"]}
    assert scale[id(model.head.fc.weight)] == 1.0
    assert math.isclose(scale[id(enc.norm.weight)], 0.75)
    for i in range(12):
        assert math.isclose(scale[id(enc.blocks[i].mlp.fc1.weight)], 0.75 ** (12 - i))
    for p in (enc.patch_embed.weight, enc.pos_embed):
        assert math.isclose(scale[id(p)], 0.75 ** 12)
    assert len(scale) == len(list(model.parameters()))


def test_distillation_teacher_is_frozen_in_eval_mode():
    import finetune
    torch.manual_seed(0)
    teacher = M.Classifier(M.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, cls_token=True),
                                          "clip"), 4).train()
    student = M.Classifier(M.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, mask_token=True),
                                          "frame"), 4).train()
    finetune.freeze_teacher(teacher)
    assert not any(m.training for m in teacher.modules())
    before = [p.clone() for p in teacher.parameters()]
    mel, n_tok = _mel(B=4, T=400), torch.full((4,), 100)
    with torch.no_grad():
        t1, t2 = teacher(mel, n_tok), teacher(mel, n_tok)
    assert torch.equal(t1, t2)  # no drop-path, BN running statistics
    loss = 0.5 * finetune.task_loss(student(mel, n_tok), torch.tensor([0, 1, 2, 3]), False) + \
        0.5 * finetune.kd_loss(student(mel, n_tok), t1, False)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert student.head.fc.weight.grad is not None


def test_labels_and_bad_downstream_input(tmp_path):
    rows = [dict(label=c, _where=f"t.csv line {i + 2}") for i, c in enumerate("bab")]
    lab = D.Labels(rows)
    assert lab.classes == ["a", "b"] and lab.encode(rows).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"u.csv line 7: label 'c' is not one of the 2"):
        lab.encode([dict(label="c", _where="u.csv line 7")])
    multi = D.Labels([dict(labels="x;y", _where="m"), dict(labels="y", _where="m")])
    assert multi.multi and multi.encode([dict(labels="y;x", _where="m")]).tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="no 'label' or 'labels' column"):
        D.Labels([dict(path="a.wav", _where="v.csv line 2")])
    torch.save({"kind": "atst-pretrain", "model": {}}, tmp_path / "pre.pt")
    with pytest.raises(ValueError, match="pre.pt: not a fine-tuned checkpoint"):
        M.load_classifier(str(tmp_path / "pre.pt"))


def test_downstream_scripts_end_to_end(pretrained, data_root, tmp_path):
    """linear_eval, finetune, and distill both ways, on the demo tasks from tiny checkpoints;
    results written; the lr is chosen without looking at test."""
    ck = {k: os.path.join(v, "ckpt.pt") for k, v in pretrained.items()}
    cache = str(tmp_path / "cache")
    res = str(tmp_path / "lin.json")
    run("linear_eval.py", "--ckpt", ck["frame"], "--data", "demo_events", "--num_workers", "1",
        "--cache_dir", cache, "--out", res, "--epochs", "50", data_root=data_root)
    lin = json.load(open(res))
    assert lin["metric"] == "accuracy" and lin["test"] > 0.3 and lin["feature_dim"] == 4 * 64
    # the same run with the test labels flipped: same lr, same validation scores
    ev = os.path.join(data_root, "demo", "events")
    rows = open(os.path.join(ev, "test.csv")).read().splitlines()
    classes = sorted({r.split(",")[1] for r in rows[1:]})
    flip = [rows[0]] + [f"{os.path.join(ev, r.split(',')[0])},"
                        f"{classes[::-1][classes.index(r.split(',')[1])]}" for r in rows[1:]]
    (tmp_path / "flipped.csv").write_text("\n".join(flip) + "\n")
    res2 = str(tmp_path / "lin2.json")
    run("linear_eval.py", "--ckpt", ck["frame"], "--data", os.path.join(ev, "train.csv"),
        "--valid_csv", os.path.join(ev, "valid.csv"), "--test_csv",
        str(tmp_path / "flipped.csv"), "--num_workers", "1",
        "--cache_dir", cache, "--out", res2, "--epochs", "50", data_root=data_root)
    lin2 = json.load(open(res2))
    assert lin2["lr"] == lin["lr"] and lin2["valid_by_lr"] == lin["valid_by_lr"]
    assert lin2["test"] < lin["test"]
    # fine-tune both kinds, then distill both ways (C2F, F2C)
    ft = {}
    for kind in ("frame", "clip"):
        ft[kind] = str(tmp_path / f"ft_{kind}")
        run("finetune.py", "--ckpt", ck[kind], "--data", "demo_events", "--epochs", "1",
            "--num_workers", "1", "--out_dir", ft[kind], data_root=data_root)
        r = json.load(open(os.path.join(ft[kind], "result.json")))
        assert r["stage"] == "finetune" and r["kind"] == kind and 0 <= r["test"] <= 1
        assert M.load_encoder(os.path.join(ft[kind], "best.pt")).finetuned
    for student, teacher in (("frame", "clip"), ("clip", "frame")):
        out = str(tmp_path / f"kd_{student}")
        run("distill.py", "--ckpt", ck[student], "--teacher",
            os.path.join(ft[teacher], "best.pt"), "--data", "demo_events", "--epochs", "1",
            "--num_workers", "1", "--out_dir", out, data_root=data_root)
        r = json.load(open(os.path.join(out, "result.json")))
        assert r["stage"] == "distill" and r["kind"] == student and r["teacher_kind"] == teacher
    # a fine-tuned checkpoint where a pre-trained one is needed, and the other way round
    p = run("finetune.py", "--ckpt", os.path.join(ft["frame"], "best.pt"), "--data",
            "demo_events", "--out_dir", str(tmp_path / "bad"), data_root=data_root, check=False)
    assert p.returncode != 0 and "is a fine-tuned checkpoint" in p.stderr
    p = run("distill.py", "--ckpt", ck["frame"], "--teacher", ck["clip"], "--data",
            "demo_events", "--out_dir", str(tmp_path / "bad2"), data_root=data_root, check=False)
    assert p.returncode != 0 and "not a fine-tuned checkpoint" in p.stderr

# ---------------------------------------------------------------------------------- SED


def test_strong_labels_round_trip_within_one_frame():
    classes = ["a", "b"]
    events = [(0.013, 1.5, "a"), (2.0, 2.05, "b"), (2.5, 4.0, "a"), (9.97, 10.0, "b")]
    y = D.encode_strong(events, classes, 250)
    assert y.shape == (250, 2) and y[0, 0] == 1 and y[37, 0] == 1 and y[38, 0] == 0
    back = D.decode_strong(y.numpy() > 0, classes)
    assert len(back) == len(events)
    for (a, b, l), (a2, b2, l2) in zip(sorted(events), sorted(back)):
        assert l == l2 and abs(a - a2) <= 0.04 and abs(b - b2) <= 0.04


def test_median_filter_on_a_known_sequence():
    import sed
    x = np.array([0, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=np.float32)
    y = sed.median_filter(x[None, :, None], [3])[0, :, 0]
    # window 3, edges repeated: isolated spikes vanish, a one-frame gap closes
    assert y.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    z = sed.median_filter(np.stack([x, x], -1)[None], [1, 5])[0]
    assert z[:, 0].tolist() == x.tolist() and z[:, 1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]


def test_attention_pooling_equals_the_formula():
    head = M.SedHead(2, 3)
    with torch.no_grad():
        head.strong.weight.copy_(torch.tensor([[1., 0], [0, 1], [1, 1]]))
        head.strong.bias.zero_()
        head.attn.weight.copy_(torch.tensor([[2., 0], [0, 0], [0, -1]]))
        head.attn.bias.zero_()
    h = torch.tensor([[[1., 0], [0, 2], [3, 1]]])                   # (1, T=3, D=2)
    s, w = head(h)
    want_s = torch.sigmoid(h @ torch.tensor([[1., 0, 1], [0, 1, 1]]))
    a = torch.softmax(h @ torch.tensor([[2., 0, 0], [0, 0, -1]]), -1).clamp(1e-7, 1)
    assert torch.allclose(s, want_s)
    assert torch.allclose(w, (want_s * a).sum(1) / a.sum(1))
    s2, w2 = head(torch.cat([h, torch.full((1, 2, 2), 9.0)], 1),
                  torch.tensor([[True] * 3 + [False] * 2]))           # padding is ignored
    assert torch.allclose(w2, w)


def _gt_files(tmp_path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    classes = ["alarm", "dog", "speech"]
    files = [f"c{i:03d}.wav" for i in range(n)]
    gt, scores = [], np.zeros((n, 250, 3), np.float32)
    for i, f in enumerate(files):
        for k in rng.choice(3, 2, replace=False):
            a = float(rng.uniform(0, 7))
            b = a + float(rng.uniform(0.5, 2.5))
            gt.append((f, round(a, 3), round(b, 3), classes[k]))
            scores[i, int(a / 0.04):int(np.ceil(b / 0.04)), k] = 1
    with open(tmp_path / "gt.tsv", "w") as g:
        g.write("filename\tonset\toffset\tevent_label\n")
        g.writelines(f"{f}\t{a}\t{b}\t{l}\n" for f, a, b, l in gt)
    with open(tmp_path / "dur.tsv", "w") as g:
        g.write("filename\tduration\n")
        g.writelines(f"{f}\t10.0\n" for f in files)
    return files, classes, scores


def test_psds_perfect_zero_and_realistic_agree(tmp_path):
    """Perfect scores give PSDS1 = PSDS2 = 1 and all-zero scores 0, with psds_eval and with
    sed_scores_eval; on a realistic prediction (shifted boundaries, false alarms, misses)
    the two libraries agree within 0.02."""
    import sed
    files, classes, perfect = _gt_files(tmp_path)
    c = SimpleNamespace(n_thresholds=50, threshold=0.5)
    args = (files, classes, str(tmp_path / "gt.tsv"), str(tmp_path / "dur.tsv"), [7] * 3, c)
    r = sed.evaluate(perfect, *args)
    for k in ("psds1", "psds2", "psds1_exact", "psds2_exact", "f1_intersection"):
        assert r[k] > 0.999, (k, r)
    r = sed.evaluate(np.zeros_like(perfect), *args)
    assert max(r[k] for k in ("psds1", "psds2", "psds1_exact", "psds2_exact")) == 0
    assert r["f1_intersection"] == 0  # no detection at all: 0, not nan
    one = perfect.copy()
    one[..., 1:] = 0  # only class 0 detected: F1 1 for it, 0 for the other two (not dropped)
    assert abs(sed.evaluate(one, *args)["f1_intersection"] - 1 / 3) < 1e-6
    rng = np.random.default_rng(1)
    real = np.zeros_like(perfect)
    for i in range(len(files)):  # shifted boundaries, weaker or missed events, false alarms
        real[i] = np.roll(perfect[i], int(rng.integers(-12, 13)), axis=0) * \
            rng.uniform(0.1, 1.0, (1, 3))
        for _ in range(int(rng.integers(0, 3))):
            a = int(rng.integers(0, 230))
            real[i, a:a + int(rng.integers(8, 20)), rng.integers(3)] += rng.uniform(0.3, 0.9)
    real = np.clip(real + rng.normal(0, 0.05, real.shape), 0, 1).astype(np.float32)
    r = sed.evaluate(real, *args)
    assert 0.05 < r["psds1"] < 0.98 and 0.05 < r["psds2"] < 0.999
    assert abs(r["psds1"] - r["psds1_exact"]) < 0.02 and abs(r["psds2"] - r["psds2_exact"]) < 0.02


def test_sed_tsv_errors_name_the_row(tmp_path):
    def tsv(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)
    head = "filename\tonset\toffset\tevent_label\n"
    durs = {"a.wav": 10.0}
    cases = [(head + "a.wav\t1\t2\tcat\n", "line 2: event label 'cat' is not in the class"),
             (head + "a.wav\t1\t2\tdog\na.wav\t3\t2\tdog\n", "line 3: onset 3.0 is not before"),
             (head + "a.wav\t1\t12\tdog\n", "line 2: event ends at 12.0 s, after"),
             (head + "b.wav\t1\t2\tdog\n", "line 2: clip b.wav is missing from the durations"),
             (head + "a.wav\t1\t3\tdog\na.wav\t2\t4\tdog\n", "line 3: overlaps")]
    for i, (text, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            D.read_strong(tsv(f"s{i}.tsv", text), ["dog"], durs)
    with pytest.raises(ValueError, match=r"w.tsv line 2: event label\(s\) \['cat'\]"):
        D.read_weak(tsv("w.tsv", "filename\tevent_labels\na.wav\tdog,cat\n"), ["dog"])


def test_sed_demo_end_to_end_and_prediction_on_long_stereo_audio(pretrained, data_root,
                                                                  tmp_path):
    """linear and fine-tune modes, and C2F (a Clip SED model teaches Frame), on the demo SED
    task; PSDS reported with plots and TSVs; then events for a 25 s 44.1 kHz stereo file."""
    ck = {k: os.path.join(v, "ckpt.pt") for k, v in pretrained.items()}
    outs = {}
    for name, kind, extra in (("lin", "frame", ["--mode", "linear"]),
                              ("lin_nc", "frame", ["--mode", "linear", "--cache", "false"]),
                              ("clip", "clip", ["--mode", "finetune"]),
                              ("c2f", "frame", ["--mode", "finetune", "--cache", "false"])):
        outs[name] = str(tmp_path / name)
        if name == "c2f":
            extra = extra + ["--teacher", os.path.join(outs["clip"], "best.pt")]
        p = run("sed.py", "--ckpt", ck[kind], "--data", "demo_sed", "--epochs", "1",
                "--num_workers", "1", "--out_dir", outs[name], *extra, data_root=data_root)
        assert "PSDS1" in p.stdout
        r = json.load(open(os.path.join(outs[name], "result.json")))
        assert all(0 <= r[k] <= 1 for k in ("psds1", "psds2", "psds1_exact", "psds2_exact"))
        for f in ("psd_roc_psds1.png", "psd_roc_psds2.png", "detections_0.50.tsv", "best.pt"):
            assert os.path.getsize(os.path.join(outs[name], f)) > 0
    assert json.load(open(os.path.join(outs["c2f"], "result.json")))["teacher"]
    # cached frozen frames train the same head as encoding every batch (the cache is exact)
    heads = [D.load_checkpoint(os.path.join(outs[n], "best.pt"))["model"] for n in ("lin",
                                                                                    "lin_nc")]
    for k in ("head.strong.weight", "head.attn.weight"):
        torch.testing.assert_close(heads[0][k], heads[1][k], rtol=1e-4, atol=1e-5)
    sr, t = 44100, np.arange(25 * 44100) / 44100
    noise = 0.01 * np.random.default_rng(0).standard_normal(len(t))
    tone = np.where((t > 3) & (t < 6), np.sin(2 * np.pi * 440 * t), 0) + noise
    sf.write(tmp_path / "long.wav", np.stack([tone, tone * 0.5], 1).astype(np.float32), sr)
    p = run("sed.py", "--predict", str(tmp_path / "long.wav"), "--ckpt",
            os.path.join(outs["lin"], "best.pt"), "--threshold", "0.05", "--out",
            str(tmp_path / "events.tsv"), data_root=data_root)
    rows = [r.split("\t") for r in open(tmp_path / "events.tsv").read().splitlines()[1:]]
    assert rows, "a threshold of 0.05 detects something"
    for f, a, b, label in rows:
        assert f == "long.wav" and 0 <= float(a) < float(b) <= 25.0
        assert label in json.load(open(os.path.join(outs["lin"], "result.json")))["classes"]

# ---------------------------------------------------------------------------------- run_all


def test_every_script_prints_its_help():
    """--help renders every flag's comment (a '%' in a comment once broke argparse)."""
    for script in ("pretrain_frame.py", "pretrain_clip.py", "linear_eval.py", "finetune.py",
                   "distill.py", "sed.py"):
        p = subprocess.run([sys.executable, script, "--help"], cwd=HERE, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0 and "--seed" in p.stdout, (script, p.stderr[-500:])


PRETRAIN_RUNS = ["clip", "frame", "clip_single_1s", "clip_two_1s", "clip_single_6s", "frame_A",
                 "frame_B", "frame_C", "frame_E"]


def fake_results(out, linear, sed_psds1):
    """What run_all.sh leaves behind at demo scale, with chosen scores."""
    def put(path, obj):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj))
    for n in PRETRAIN_RUNS:
        put(os.path.join(out, "pretrain", n, "ckpt.pt.json"), dict(
            step=48, total=48, model_args=dict(proj_dim=128),
            config=dict(preset="tiny", data="demo", batch_size=32)))
        put(os.path.join(out, "pretrain", n, "log.jsonl"), "".join(
            json.dumps(dict(step=s, loss=1.0 / s, std_t=0.05)) + "\n" for s in (16, 32, 48)))
    for name, score in linear.items():
        put(os.path.join(out, "linear", f"{name}.json"), dict(test=score))
    for n in ("clip", "frame", "c2f", "f2c"):
        put(os.path.join(out, "finetune", f"{n}_demo_events", "result.json"), dict(test=0.5))
    for n in ("clip_linear", "frame_linear", "clip_finetune", "frame_finetune", "c2f", "f2c"):
        put(os.path.join(out, "sed", n, "result.json"), dict(
            psds1=sed_psds1.get(n, 0.1), psds2=0.2, psds1_exact=0.1, psds2_exact=0.2,
            f1_intersection=0.5))


def test_tables_cells_averages_and_checks(tmp_path):
    import tables
    out = str(tmp_path)
    linear = {"frame_demo_events": 0.8, "frame_random_demo_events": 0.6,
              "clip_demo_events": 0.5, "clip_random_demo_events": 0.7, "frame_us8k": 0.855}
    fake_results(out, linear, {"frame_finetune": 0.3, "clip_finetune": 0.2})
    md = open(tables.main(out)).read()
    row = next(line for line in md.splitlines() if line.startswith("| ATST-Frame |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Table IV: AS-20K, SPCV2, VOX1, NSYNTH, US8K, FSD50K, then the demo column
    assert cells[1] == "- (33.0)" and cells[5] == "85.5 (85.8)" and cells[7] == "80.0"
    # Table II averages the last four tasks: the paper's own 74.9 for single / 1 s
    row = next(line for line in md.splitlines() if line.startswith("| single | 1 |"))
    assert "- (74.9)" in row
    row = next(line for line in md.splitlines() if line.startswith("| A | 0 |"))
    assert "- (42.8)" in row  # Table III averages all five
    assert "ATST-Frame 80.0 beats the same encoder with random weights 60.0" in md
    assert "ATST-Clip 50.0 does NOT beat the same encoder with random weights 70.0" in md
    assert "SED (finetune): ATST-Frame PSDS1 0.300 beats ATST-Clip 0.200" in md
    assert os.path.getsize(os.path.join(out, "plots", "pretrain_main.png")) > 1000


def test_run_all_skips_finished_work(data_root, tmp_path):
    """A rerun over finished results runs nothing but the tables (issue 6: rerun < 1 min)."""
    out = str(tmp_path / "res")
    names = ["clip", "frame", "clip_random", "frame_random"]
    linear = {f"{n}_{t}": 0.5 for n in names for t in ("demo_events", "demo_tags")}
    linear.update({f"{n}_demo_events": 0.5 for n in PRETRAIN_RUNS[2:] + ["clip_two_6s",
                                                                          "frame_D"]})
    fake_results(out, linear, {})
    env = dict(os.environ, OUT=out, ATST_DATA=data_root)
    p = subprocess.run(["bash", "run_all.sh"], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pre-train" not in p.stdout and "tables ->" in p.stdout
    assert os.path.islink(os.path.join(out, "pretrain", "frame_D"))  # = the main Frame run
    assert "| D | 1 |" in open(os.path.join(out, "tables.md")).read()
