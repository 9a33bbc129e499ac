"""model.py: the front-ends, the Encoder and its tokens, the table of kinds, the ATST
teacher-student pair and its EMA, parameter groups, the dtypes of the bf16 path."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchaudio

import heads as H
import model as M
import plumbing as P
import runtime as R
from augment import group_mask
from conftest import asit_inputs, asit_pair, mel_batch


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
    """Token n holds frames 4n..4n+3 of every mel bin at index mel*4 + offset (R2)."""
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


@pytest.mark.parametrize("kind", ["frame", "clip", "asit"])
def test_a_whole_batch_without_the_padding_mask_is_the_masked_batch_bit_for_bit(kind):
    """A batch of whole clips goes without the key-padding mask (n_valid None; pre-training
    decides so on the host): outputs and gradients equal those under the all-true mask bit
    for bit on the CPU, in fp32 and fp64, so dropping it changes the speed only."""
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        enc = M.Encoder(dim=32, depth=2, heads=4, drop_path=0.0,
                        **M.KINDS[kind].encoder_args()).to(dtype)
        mel = torch.randn(3, 128 if kind == "asit" else 64, 400, dtype=dtype)
        n = enc.tokenize(mel).shape[1]
        runs = []
        for n_valid in (torch.full((3,), n), None):
            x = mel.clone().requires_grad_()
            y = enc(x, n_valid)
            (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
            runs.append([y, x.grad, *(p.grad for p in enc.parameters() if p.grad is not None)])
            enc.zero_grad(set_to_none=True)
        assert all(torch.equal(a, b) for a, b in zip(*runs)), (kind, dtype)


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


def test_weight_decay_groups():
    """One rule (R3): decay on matrices, none on biases and norms, in pre-training and in
    fine-tuning (layer_decay_groups keeps it per lr scale)."""
    enc = M.Encoder(dim=32, depth=2, heads=2)
    groups = M.param_groups(enc, 0.05)
    assert [(g["decay"], g["weight_decay"]) for g in groups] == [(True, 0.05), (False, 0.0)]
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"])
    model = H.Classifier(R.AudioEncoder(enc, "frame"), 5)
    wd = {id(p): g["weight_decay"] for g in H.layer_decay_groups(model, 0.75, 0.05)
          for p in g["params"]}
    for n, p in model.named_parameters():
        assert wd[id(p)] == (0.05 if p.ndim >= 2 else 0.0), n


def _atst(method, **kw):
    torch.manual_seed(0)
    return M.ATST(method, dim=32, depth=2, heads=2, proj_hidden=64, proj_dim=16, **kw).train()


def _frame_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    v1, v2 = mel_batch(B=3, T=400, seed=seed), mel_batch(B=3, T=400, seed=seed + 1)
    n_valid = torch.tensor([100, 80, 60])
    mask = group_mask(n_valid, 100, generator=g)
    return v1, v2, mask, n_valid


def _byol(q, z):  # R3 on L2-normalised rows: 2 - 2 cos
    return (2 - 2 * (q * z).sum(-1)).mean()


def test_frame_loss_rows_are_the_masked_tokens_teacher_unmasked():
    """ATST-Frame (R3): the loss is symmetric BYOL over the masked tokens of both views
    only; the student sees them replaced by the mask token, the teacher sees the view unmasked
    and is read at the same positions. So changing the input inside masked tokens changes the
    teacher's rows but not the student's; with mask_teacher (config C) neither."""
    v1, v2, mask, n_valid = _frame_inputs()
    m = mask.sum().item()
    for mask_teacher in (False, True):
        model = _atst("frame", drop_path=0.0, mask_teacher=mask_teacher)
        loss, st = model(v1, v2, mask, n_valid)
        assert st["s"].shape == st["t"].shape == (2 * m, 16)           # masked rows, 2 views
        q1, q2, z1, z2 = *st["s"].chunk(2), *st["t"].chunk(2)
        assert torch.allclose(loss, (_byol(q1, z2) + _byol(q2, z1)) / 2, atol=1e-6)
        inside = mask.repeat_interleave(4, 1)[:, None, :].expand_as(v1[..., :400])
        noisy = [v.clone().masked_fill_(inside, 0.7) for v in (v1, v2)]  # masked frames only
        _, st2 = model(*noisy, mask, n_valid)
        assert torch.allclose(st2["s"], st["s"], atol=1e-5)           # student: mask token
        assert torch.allclose(st2["t"], st["t"], atol=1e-5) == mask_teacher
        past = [v.clone() for v in (v1, v2)]                           # padding: ignored
        for v in past:
            v[2, :, 4 * 60:] = 5.0
        assert torch.allclose(model(*past, mask, n_valid)[1]["t"], st["t"], atol=1e-5)


@pytest.mark.parametrize("method", ["frame", "clip"])
def test_projector_batchnorm_sees_both_views_as_one_batch(method):
    """As the reference concatenates the views: every BatchNorm of the projectors and the
    predictor normalises the rows of both views together, in one call."""
    model = _atst(method)
    calls = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.register_forward_hook(
                lambda m, i, o, name=name: calls.append((name, i[0].shape[0])))
    if method == "frame":
        v1, v2, mask, n_valid = _frame_inputs()
        model(v1, v2, mask, n_valid)
        rows = 2 * mask.sum().item()
    else:
        model(mel_batch(B=3, T=601), mel_batch(B=3, T=601, seed=1))
        rows = 2 * 3
    assert sorted(n for n, _ in calls) == ["predictor.1", "student.projector.1",
                                           "teacher.projector.1"]
    assert all(b == rows for _, b in calls)


def test_teacher_has_the_student_drop_path_unless_switched_off():
    """The reference's teacher runs in train mode with the student's stochastic depth (0 ->
    0.1 over blocks); teacher_drop_path=False gives it none."""
    v1, v2, mask, n_valid = _frame_inputs()
    for on in (True, False):
        model = _atst("frame", drop_path=0.1, teacher_drop_path=on)
        rates = [b.drop_path.p for b in model.teacher.encoder.blocks]
        assert rates == ([b.drop_path.p for b in model.student.encoder.blocks] if on else
                         [0.0, 0.0]) and (rates[-1] == pytest.approx(0.1)) == on
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(model(v1, v2, mask, n_valid)[1]["t"])
        assert torch.equal(outs[0], outs[1]) != on                    # stochastic when on


def test_kaldi_front_end_equals_torchaudio_per_clip():
    """R11: 6 s at 16 kHz -> 598 Kaldi frames -> 592; the batched front-end equals
    torchaudio's per-clip kaldi.fbank (mean removed, normalised) for every clip of a batch;
    digital silence normalises to about -1.278."""
    torch.manual_seed(0)
    wav = torch.randn(3, 6 * 16000) * 0.1 + 0.05               # a DC offset to remove
    wav[1] *= 0.01
    wav[2, :48000] = 0
    out = M.KaldiFrontEnd()(wav)
    assert out.shape == (3, 128, 592)
    for i in range(3):
        ref = torchaudio.compliance.kaldi.fbank(
            wav[i:i + 1] - wav[i].mean(), htk_compat=True, sample_frequency=16000,
            use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0,
            frame_shift=10)
        assert ref.shape == (598, 128)
        ref = (ref[:592] + 4.2677393) / (2 * 4.5689974)
        assert torch.allclose(out[i].T, ref, atol=1e-4), (out[i].T - ref).abs().max()
    silence = M.KaldiFrontEnd()(torch.zeros(1, 16000))
    assert silence.shape == (1, 128, 96) and torch.allclose(silence, torch.tensor(-1.2776),
                                                            atol=1e-3)


def _asit_encoder():
    torch.manual_seed(0)
    return M.Encoder(dim=32, depth=1, heads=2, cls_token=True, tokens="patch16", qkv_bias=True,
                     max_tokens=M.KINDS["asit"].max_tokens, drop_path=0.0)


def test_patch16_tokens_are_the_conv_patch_embedding_time_major():
    """R12: Conv2d(1, D, 16, 16) weights reshaped to (D, 256) give our tokens; token
    k sits at time block k // 8, mel block k % 8; an input of n time columns uses the first
    n rows of the 37 x 8 positional grid."""
    enc = _asit_encoder()
    conv = torch.nn.Conv2d(1, 32, 16, stride=16)
    with torch.no_grad():
        enc.patch_embed.weight.copy_(conv.weight.reshape(32, 256))
        enc.patch_embed.bias.copy_(conv.bias)
    mel = torch.randn(2, 128, 592)                                # (B, F, T)
    ref = conv(mel.transpose(1, 2)[:, None]).flatten(2).transpose(1, 2)  # on (B, 1, T, M)
    assert torch.allclose(enc.patch_embed(enc.tokenize(mel)), ref, atol=1e-5)
    marker = torch.zeros(1, 128, 592)
    marker[0, 16 * 5 + 3, 16 * 11 + 7] = 1.0                      # mel block 5, time block 11
    toks = enc.tokenize(marker)[0]
    k = toks.abs().sum(1).nonzero().item()
    assert k == 11 * 8 + 5 and toks[k, 7 * 16 + 3] == 1            # (time, mel) offsets
    seen = {}
    enc.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        enc.patch_embed.weight.zero_()
        enc.patch_embed.bias.zero_()
    grid = enc.pos_embed[0, 1:].view(37, 8, 32)
    for n in (1, 12, 37):
        enc(torch.randn(1, 128, 16 * n))
        assert torch.equal(seen["x"][0, 1:], grid[:n].reshape(n * 8, 32))


def _dtypes_seen(model, run):
    """{module class: output dtypes} of every submodule while run() runs."""
    seen, hooks = {}, []
    for m in model.modules():
        hooks.append(m.register_forward_hook(lambda mod, i, o: seen.setdefault(
            type(mod).__name__, set()).add((o[0] if isinstance(o, (tuple, list)) else o).dtype)
            if torch.is_tensor(o[0] if isinstance(o, (tuple, list)) else o) else None))
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("method", ["frame", "clip", "asit"])
def test_bf16_autocast_on_cpu_takes_the_gpu_dtype_path(method):
    """--dtype bf16 on the CPU runs the matmuls in bf16 (the path a GPU run takes) while the
    front-ends, norms, DINO prototype cosines (divided by a 0.04 temperature) and losses stay
    fp32; gradients reach fp32 weights; the loss is the fp32 loss within bf16 precision."""
    cpu = torch.device("cpu")
    assert P.precision(cpu) == "fp32" and P.precision(cpu, "bf16") == "bf16"
    with pytest.raises(P.UserError, match="--dtype 'fp16'"):
        P.precision(cpu, "fp16")
    if method == "asit":
        model, inputs, kw = asit_pair(drop_path=0.0), asit_inputs(), dict(teacher_temp=0.04)
        front = M.KaldiFrontEnd()
    else:
        torch.manual_seed(0)
        model = M.ATST(method, dim=32, depth=2, heads=2, proj_hidden=64, proj_dim=16,
                       drop_path=0.0)
        front, kw = M.MelFrontEnd(), {}
        v = mel_batch(4, 201)
        mask = group_mask(torch.full((4,), 50), 50, 5, 0.65, torch.Generator().manual_seed(0))
        inputs = (v, v.flip(-1), mask, torch.full((4,), 50)) if method == "frame" else (v, v)
    losses = {}
    for prec in ("fp32", "bf16"):
        model.zero_grad()
        with P.autocast(cpu, prec):
            seen, (loss, stats) = _dtypes_seen(model, lambda: model(*inputs, **kw))
            wav_in = front(torch.randn(2, 16000) * 0.1)
        loss.backward()
        losses[prec] = loss.item()
        assert loss.dtype == torch.float32 and wav_in.dtype == torch.float32
        assert seen["Linear"] == {torch.bfloat16 if prec == "bf16" else torch.float32}
        assert seen["LayerNorm"] == {torch.float32}
        if method == "asit":
            assert seen["DinoHead"] == {torch.float32}          # the cosine logits
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert math.isclose(losses["bf16"], losses["fp32"], rel_tol=0.05), losses
