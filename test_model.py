"""model.py: the mel front-end, the Encoder, the ATST teacher-student pair and its EMA,
parameter groups, the embedding API and checkpoint loading, downstream heads."""
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio

import data as D
import finetune
import model as M
import plumbing as P
from augment import group_mask
from conftest import mel_batch

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
    """One rule (SPEC 3): decay on matrices, none on biases and norms, in pre-training and in
    fine-tuning (layer_decay_groups keeps it per lr scale)."""
    enc = M.Encoder(dim=32, depth=2, heads=2)
    groups = M.param_groups(enc, 0.05)
    assert [(g["decay"], g["weight_decay"]) for g in groups] == [(True, 0.05), (False, 0.0)]
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"])
    model = M.Classifier(M.AudioEncoder(enc, "frame"), 5)
    wd = {id(p): g["weight_decay"] for g in M.layer_decay_groups(model, 0.75, 0.05)
          for p in g["params"]}
    for n, p in model.named_parameters():
        assert wd[id(p)] == (0.05 if p.ndim >= 2 else 0.0), n


def test_classifier_checkpoints_load_strictly(tmp_path):
    """Our fine-tuned layout (encoder.* + head.*) round-trips through export / load_export and
    load_classifier; an unexpected or missing key is an error naming it."""
    torch.manual_seed(0)
    a = M.Classifier(M.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, cls_token=True),
                                    "clip"), 3).eval()
    P.save_atomic(dict(kind="atst-finetune", model=a.export(), classes=["x", "y", "z"],
                       encoder_args=a.ae.encoder.args), str(tmp_path / "ft.pt"))
    b = M.load_classifier(str(tmp_path / "ft.pt"))
    mel, n = mel_batch(B=2, T=601), torch.tensor([150, 100])
    assert torch.equal(a(mel, n), b(mel, n)) and b.classes == ["x", "y", "z"]
    state = a.export()
    with pytest.raises(KeyError, match="missing \\[\\], unexpected \\['extra.w'\\]"):
        b.load_export({**state, "extra.w": torch.zeros(1)})
    del state["head.fc.bias"]
    with pytest.raises(KeyError, match="missing \\['head.fc.bias'\\]"):
        b.load_export(state)
    torch.save({"kind": "atst-pretrain", "model": {}}, tmp_path / "pre.pt")
    with pytest.raises(P.UserError, match="pre.pt: a pre-training checkpoint .*; this needs a "
                       "fine-tuned classifier .* or an SED model"):
        M.load_classifier(str(tmp_path / "pre.pt"))


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
    want = ref(audio, 16000, layers="all")
    for name, ck in _layouts(enc, kind):
        path = str(tmp_path / f"{name}.ckpt")
        torch.save(ck, path)
        got = M.load_encoder(path)
        assert got.kind == kind and got.encoder.depth == 2 and got.encoder.dim == 128, name
        e = got(audio, 16000, layers="all")
        assert torch.equal(e.frames, want.frames) and torch.equal(e.clip, want.clip), name
    # ours: a pre-training checkpoint (teacher encoder), heads taken from model_args
    torch.manual_seed(0)
    atst = M.ATST(kind, **M.PRESETS["tiny"])
    path = str(tmp_path / "ours.pt")
    P.save_atomic(dict(model=atst.state_dict(), model_args=dict(method=kind, **M.PRESETS["tiny"]),
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
    with pytest.raises(P.UserError, match=r"missing: \['blocks.1.mlp.fc2.bias'\]"):
        M.load_encoder(str(tmp_path / "missing.ckpt"))
    _, ck = next(_layouts(enc, "frame"))
    ck["state_dict"]["model.teacher.encoder.blocks.0.attn.qkv.bias"] = torch.zeros(384)
    torch.save(ck, tmp_path / "extra.ckpt")
    with pytest.raises(P.UserError, match=r"unexpected: \['blocks.0.attn.qkv.bias'\]"):
        M.load_encoder(str(tmp_path / "extra.ckpt"))
    torch.save({"weights": 1}, tmp_path / "odd.ckpt")
    with pytest.raises(P.UserError, match="odd.ckpt: not a checkpoint layout"):
        M.load_encoder(str(tmp_path / "odd.ckpt"))


def _tiny_encoder(kind, seed=0):
    torch.manual_seed(seed)
    enc = M.Encoder(dim=64, depth=3, heads=4, drop_path=0.0, cls_token=kind == "clip",
                    mask_token=kind == "frame")
    return M.AudioEncoder(enc, kind).eval()


def _tiny_asit(seed=0):
    torch.manual_seed(seed)
    enc = M.Encoder(dim=32, depth=2, heads=2, drop_path=0.0, cls_token=True, tokens="patch16",
                    qkv_bias=True, max_tokens=M.ASIT_TOKENS)
    return M.AudioEncoder(enc, "asit").eval()


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


@pytest.mark.parametrize("kind", ["frame", "clip", "asit"])
def test_padded_batch_gives_the_embeddings_of_the_clip_alone(kind):
    """A 3 s clip padded to 10 s in a batch gets what it gets alone: ATST 75 tokens of 40 ms
    (of 250); ASiT (its clip mean taken over its own samples) 18 columns of 160 ms, as
    ((3 s - 25 ms) / 10 ms + 1) // 16 (of 62)."""
    ae = _tiny_asit() if kind == "asit" else _tiny_encoder(kind)
    n, full = (18, 62) if kind == "asit" else (75, 250)
    torch.manual_seed(2)
    short, long = torch.randn(3 * 16000) * 0.1 + 0.02, torch.randn(10 * 16000) * 0.1
    batch = torch.stack([F.pad(short, (0, 7 * 16000)), long])
    both = ae(batch, 16000, lengths=[3 * 16000, 10 * 16000], layers="all")
    alone = ae(short, 16000, layers="all")
    assert both.lengths.tolist() == [n, full] and alone.frames.shape[1] == n
    assert torch.allclose(both.frames[0, :n], alone.frames[0], atol=1e-5)
    assert both.frames[0, n:].abs().max() == 0
    assert torch.allclose(both.clip[0], alone.clip[0], atol=1e-5)
    if kind != "asit":  # the alone path is the plain encoder on the clip's mel
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
    e = ae(wav[None], 16000, layers="all")
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
    scale = {id(p): g["lr_scale"] for g in M.layer_decay_groups(model, 0.75)
             for p in g["params"]}
    assert scale[id(model.head.fc.weight)] == 1.0
    assert math.isclose(scale[id(enc.norm.weight)], 0.75)
    for i in range(12):
        assert math.isclose(scale[id(enc.blocks[i].mlp.fc1.weight)], 0.75 ** (12 - i))
    for p in (enc.patch_embed.weight, enc.pos_embed):
        assert math.isclose(scale[id(p)], 0.75 ** 12)
    assert len(scale) == len(list(model.parameters()))


def test_distillation_teacher_is_frozen_in_eval_mode():
    torch.manual_seed(0)
    teacher = M.Classifier(M.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, cls_token=True),
                                          "clip"), 4).train()
    student = M.Classifier(M.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, mask_token=True),
                                          "frame"), 4).train()
    M.freeze(teacher)
    assert not any(m.training for m in teacher.modules())
    before = [p.clone() for p in teacher.parameters()]
    mel, n_tok = mel_batch(B=4, T=400), torch.full((4,), 100)
    with torch.no_grad():
        t1, t2 = teacher(mel, n_tok), teacher(mel, n_tok)
    assert torch.equal(t1, t2)  # no drop-path, BN running statistics
    loss = 0.5 * finetune.task_loss(student(mel, n_tok), torch.tensor([0, 1, 2, 3]), False) + \
        0.5 * finetune.kd_loss(student(mel, n_tok), t1, False)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert student.head.fc.weight.grad is not None


def test_teacher_of_another_front_end_sees_the_same_mixup():
    """Distillation across front-ends (finetune.teacher_inputs): an ATST-Frame student's input
    is passed through to an ATST-Clip teacher; an ASiT teacher gets its Kaldi view of the same
    waveforms, mixed with the lambdas and partners that the step's rng gives the student
    (drawn here by hand: permutation, then Beta), and no RRC."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    wav, valid = torch.randn(4, 3 * 16000) * 0.1, torch.full((4,), 3 * 16000)
    frame, asit = _tiny_encoder("frame"), _tiny_asit()
    x, n = frame.features(wav, valid)
    c, seed = SimpleNamespace(mixup=True, mixup_alpha=0.5), 1234
    same = finetune.teacher_inputs(SimpleNamespace(ae=_tiny_encoder("clip")), frame, x, n, wav,
                                   valid, c, seed)
    assert same[0] is x and same[1] is n
    tx, tn = finetune.teacher_inputs(SimpleNamespace(ae=asit), frame, x, n, wav, valid, c, seed)
    rng = np.random.default_rng(seed)
    perm, lam = rng.permutation(4), torch.from_numpy(rng.beta(0.5, 0.5, 4)).float()
    k, _ = asit.features(wav, valid)                                # (4, 128, 288)
    want = lam.view(4, 1, 1) * k + (1 - lam.view(4, 1, 1)) * k[perm]
    assert tx.shape == (4, 128, 288) and torch.allclose(tx, want, atol=1e-6)
    assert tn.tolist() == [18] * 4
    plain = finetune.teacher_inputs(SimpleNamespace(ae=asit), frame, x, n, wav, valid,
                                    SimpleNamespace(mixup=False), seed)
    assert torch.equal(plain[0], k)


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


# ---------------------------------------------------------------------------------- ATST


def _atst(method, **kw):
    torch.manual_seed(0)
    return M.ATST(method, dim=32, depth=2, heads=2, proj_hidden=64, proj_dim=16, **kw).train()


def _frame_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    v1, v2 = mel_batch(B=3, T=400, seed=seed), mel_batch(B=3, T=400, seed=seed + 1)
    n_valid = torch.tensor([100, 80, 60])
    mask = group_mask(n_valid, 100, generator=g)
    return v1, v2, mask, n_valid


def _byol(q, z):  # SPEC 3 on L2-normalised rows: 2 - 2 cos
    return (2 - 2 * (q * z).sum(-1)).mean()


def test_frame_loss_rows_are_the_masked_tokens_teacher_unmasked():
    """ATST-Frame (SPEC 3): the loss is symmetric BYOL over the masked tokens of both views
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


# ---------------------------------------------------------------------------------- ASiT


def test_kaldi_front_end_equals_torchaudio_per_clip():
    """SPEC_ASIT 1: 6 s at 16 kHz -> 598 Kaldi frames -> 592; the batched front-end equals
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
                     max_tokens=M.ASIT_TOKENS, drop_path=0.0)


def test_patch16_tokens_are_the_conv_patch_embedding_time_major():
    """SPEC_ASIT 2: Conv2d(1, D, 16, 16) weights reshaped to (D, 256) give our tokens; token
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


def _asit(**kw):
    torch.manual_seed(0)
    return M.ASiT(dim=32, depth=2, heads=2, head_hidden=64, bottleneck=16, global_k=40,
                  local_k=24, recon_hidden=32, **kw)


def _asit_inputs(B=3, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(2 * B, 128, T, generator=g)
    mask = (torch.rand(2 * B, 128, T, generator=g) < 0.5).float()
    return clean, clean * (1 - mask), mask


def test_asit_losses():
    """Constant student logits give exactly log K; swapping the two crops leaves the global
    loss unchanged (symmetric); one centre update from zero is 0.1 x the batch mean; the
    reconstruction loss ignores uncorrupted pixels."""
    K = 40
    t = torch.randn(5, K)
    assert math.isclose(M.dino_ce(torch.zeros(5, K), t, torch.zeros(1, K), 0.04).item(),
                        math.log(K), rel_tol=1e-6)
    clean, corrupt, mask = _asit_inputs()
    swap = lambda x: torch.cat(x.chunk(2)[::-1])
    a = _asit(drop_path=0.0)(clean, corrupt, mask)[1]
    b = _asit(drop_path=0.0)(swap(clean), swap(corrupt), swap(mask))[1]
    for k in ("loss_g", "loss_l", "loss_r"):
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    model = _asit()
    tg, tl = torch.randn(6, 40), torch.randn(30, 24)
    model.update_centers(tg, tl)
    assert torch.allclose(model.center_global, 0.1 * tg.mean(0, keepdim=True), atol=1e-7)
    assert torch.allclose(model.center_local, 0.1 * tl.mean(0, keepdim=True), atol=1e-7)
    pred = torch.randn_like(clean)
    other = torch.where(mask.bool(), pred, pred + 5.0)            # differs off the mask only
    assert M.masked_l1(pred, clean, mask) == M.masked_l1(other, clean, mask)
    assert torch.isclose(M.masked_l1(pred, clean, mask), (pred - clean).abs()[mask.bool()].mean())


def test_asit_step_prototypes_teacher_and_clipping():
    """After an optimizer step the prototype rows are still unit vectors (logits are cosines)
    and no parameter holds their norm; the teacher gets no gradient and one EMA update is
    exact; per-tensor clipping leaves every gradient norm <= 3."""
    import pretrain
    model = _asit()
    names = {n for n, _ in model.student.head.named_parameters() if not n.startswith("mlp.")}
    assert names == {"global_protos", "local_protos"}             # no trained norm (weight_g)
    opt = torch.optim.AdamW(M.param_groups(model), lr=0.5)
    loss, _ = model(*_asit_inputs(), teacher_temp=0.04)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for p in grads:
        p.mul_(100)
    pretrain.clip_per_tensor(grads, 3.0)
    assert max(g.norm().item() for g in grads) <= 3.0 + 1e-4
    opt.step()
    head = model.student.head
    with torch.no_grad():
        head.global_protos.mul_(7.0)                              # the norm does not matter
        g_logits, l_logits, _ = head(torch.randn(2, 5, 32))
    assert g_logits.abs().max() <= 1 + 1e-5 and l_logits.abs().max() <= 1 + 1e-5
    protos = F.normalize(head.global_protos, dim=-1)
    assert torch.allclose(protos.norm(dim=-1), torch.ones(40), atol=1e-6)
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(0.9)
    for t0, t, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


# ---------------------------------------------------------------------------------- user input


def test_embedding_api_takes_what_users_pass(tmp_path):
    """soundfile's (samples, channels) array is one multi-channel clip (it once became a batch
    of two-sample clips: 17.9 GB, or rows of NaN); the rate must be given; int16 is scaled;
    NaN, a batch wider than its clips and unknown layers are errors saying so."""
    ae = _tiny_encoder("frame")
    t = np.arange(int(20 * 44100)) / 44100
    sf.write(tmp_path / "s.wav", np.stack([np.sin(2 * np.pi * 440 * t),
                                           0.5 * np.sin(2 * np.pi * 660 * t)], 1) * 0.3, 44100)
    x, sr = sf.read(tmp_path / "s.wav", dtype="float32")
    assert x.shape == (882000, 2)
    e = ae(torch.from_numpy(x), sample_rate=sr)
    assert e.frames.shape == (1, 500, 64) and torch.isfinite(e.frames).all()
    assert torch.allclose(e.frames, ae(torch.from_numpy(x.T)[None], sample_rate=sr).frames)
    short = ae(torch.from_numpy(x[:2646]), sample_rate=sr)      # 0.06 s of stereo
    assert short.frames.shape[:2] == (1, 1) and torch.isfinite(short.frames).all()
    with pytest.raises(ValueError, match="sample_rate is required"):
        ae(torch.from_numpy(x))
    pcm = (torch.from_numpy(x[:16000, 0]) * 32767).round().to(torch.int16)
    assert torch.allclose(ae(pcm, sample_rate=sr).frames,
                          ae(pcm.float() / 32768, sample_rate=sr).frames, atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        ae(torch.full((16000,), float("nan")), sample_rate=16000)
    with pytest.raises(ValueError, match="transpose it"):
        ae(torch.zeros(100, 50), sample_rate=16000)
    with pytest.raises(ValueError, match=r"layers \[7\]: this encoder has blocks 0 to 2"):
        ae(torch.zeros(16000), sample_rate=16000, layers=[7])


@pytest.mark.parametrize("kind", ["frame", "asit"])
def test_embedding_api_checks_lengths_and_sample_rate(kind):
    """lengths: one per clip, none longer than the audio; sample_rate: any positive number
    (44100.0 is 44100 for every kind), anything else said plainly."""
    ae = _tiny_asit() if kind == "asit" else _tiny_encoder(kind)
    x = torch.randn(2, 44100, generator=torch.Generator().manual_seed(0)) * 0.1
    assert torch.equal(ae(x, 44100.0).frames, ae(x, 44100).frames)
    assert torch.equal(ae(x, np.float64(44100)).frames, ae(x, 44100).frames)
    for bad in ("16000", 0, -8000, float("nan"), None, True):
        with pytest.raises(ValueError, match="sample_rate"):
            ae(x, bad)
    with pytest.raises(ValueError, match="lengths has 3 values for 2 clips"):
        ae(x, 44100, lengths=[100, 200, 300])
    with pytest.raises(ValueError, match=r"lengths \[44100, 50000\]: a clip cannot be longer "
                       "than the audio's 44100 samples"):
        ae(x, 44100, lengths=[44100, 50000])


def test_unreadable_checkpoints_are_named(tmp_path):
    """A truncated file, random bytes, a text file, a pickle of something else: each is an error
    naming the file, not a raw torch / pickle message; a classifier given where an SED model
    is needed is called a classifier."""
    ck = tmp_path / "good.pt"
    P.save_atomic(dict(kind="atst-finetune", model=M.Classifier(_tiny_encoder("clip"), 3)
                       .export(), classes=list("abc"), encoder_args=_tiny_encoder("clip")
                       .encoder.args), str(ck))
    data = ck.read_bytes()
    import pickle
    bad = {"truncated.pt": data[:len(data) // 2], "random.pt": bytes(range(256)) * 40,
           "text.pt": b"this is not a checkpoint\n", "plain.pkl": pickle.dumps([1, 2, 3])}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(P.UserError, match=f"{name}: not a readable checkpoint"):
            M.load_encoder(str(tmp_path / name))
    torch.save([1, 2, 3], tmp_path / "list.pt")                   # readable, but not ours
    with pytest.raises(P.UserError, match="list.pt: not a checkpoint layout"):
        M.load_encoder(str(tmp_path / "list.pt"))
    with pytest.raises(P.UserError, match="good.pt: a fine-tuned classifier .*; this needs an "
                       "SED model"):
        M.load_classifier(str(ck), expect=["atst-sed"])
    state = torch.load(ck, weights_only=False)
    del state["model"]["encoder.pos_embed"]
    torch.save(state, tmp_path / "nopos.pt")
    with pytest.raises(P.UserError, match=r"missing encoder keys \['pos_embed'\]"):
        M.load_encoder(str(tmp_path / "nopos.pt"))


# ------------------------------------------------------------------------ ASiT downstream


def _release_keys(depth=12):
    """The released ASIT_ssl.pt's keys and shapes, written out from SPEC_ASIT 8 (ViT-B)."""
    keys = {"model.cls_token": (1, 1, 768), "model.pos_embed": (1, 297, 768),
            "model.patch_embed.proj.weight": (768, 1, 16, 16),
            "model.patch_embed.proj.bias": (768,),
            "model.norm.weight": (768,), "model.norm.bias": (768,)}
    for i in range(depth):
        b = f"model.blocks.{i}."
        keys.update({b + "norm1.weight": (768,), b + "norm1.bias": (768,),
                     b + "attn.qkv.weight": (2304, 768), b + "attn.qkv.bias": (2304,),
                     b + "attn.proj.weight": (768, 768), b + "attn.proj.bias": (768,),
                     b + "norm2.weight": (768,), b + "norm2.bias": (768,),
                     b + "mlp.fc1.weight": (3072, 768), b + "mlp.fc1.bias": (3072,),
                     b + "mlp.fc2.weight": (768, 3072), b + "mlp.fc2.bias": (768,)})
    return keys


def test_released_asit_checkpoint_loads_strictly_and_matches_our_encoder(tmp_path):
    """SPEC_ASIT 8: a flat dict with exactly the release's names and shapes (random weights)
    loads as ASiT base (12 heads, qkv bias, 296 + 1 positions); with the same weights put into
    our Encoder by hand (conv weight (768, 1, 16, 16) -> (768, 256)) the embeddings are
    identical; the authors' training-script layout and a fine-tuned release load the same
    weights; a renamed or missing key is an error naming it."""
    g = torch.Generator().manual_seed(0)
    ck = {k: torch.randn(s, generator=g) * 0.02 for k, s in _release_keys().items()}
    torch.save(ck, tmp_path / "ASIT_ssl.pt")
    got = M.load_encoder(str(tmp_path / "ASIT_ssl.pt"))
    assert got.kind == "asit" and got.name == "ASiT" and got.encoder.depth == 12
    assert got.encoder.blocks[0].attn.heads == 12 and got.encoder.max_tokens == 296
    ours = M.Encoder(dim=768, depth=12, heads=12, drop_path=0.0, cls_token=True,
                     tokens="patch16", qkv_bias=True, max_tokens=296)
    by_hand = {k[len("model."):]: v for k, v in ck.items()}
    by_hand["patch_embed.weight"] = by_hand.pop("patch_embed.proj.weight").reshape(768, 256)
    by_hand["patch_embed.bias"] = by_hand.pop("patch_embed.proj.bias")
    ours.load_state_dict(by_hand, strict=True)
    ref = M.AudioEncoder(ours, "asit").eval()
    audio = torch.randn(1, 7 * 16000, generator=g) * 0.1
    want, e = ref(audio, 16000, layers=[5, 11]), got(audio, 16000, layers=[5, 11])
    assert torch.equal(e.frames, want.frames) and torch.equal(e.clip, want.clip)
    assert e.clip.shape == (1, 4 * 768) and e.frames.shape == (1, 43, 2 * 768)
    # the other layouts, on a 1-block release (same names and widths; quicker to write)
    ck = {k: v for k, v in ck.items() if not k.startswith("model.blocks.") or
          k.startswith("model.blocks.0.")}
    torch.save(ck, tmp_path / "ASIT_ssl.pt")
    got = M.load_encoder(str(tmp_path / "ASIT_ssl.pt"))
    assert got.encoder.depth == 1
    # the authors' training script: teacher backbone, heads and the student beside it
    train = {"teacher": {**{f"backbone.{k[6:]}": v for k, v in ck.items()},
                         "head_cls.mlp.0.weight": torch.zeros(3, 3),
                         "head_recons.0.weight": torch.zeros(3, 3)},
             "student": {"module.backbone.cls_token": torch.zeros(1, 1, 768)}, "epoch": 99}
    torch.save(train, tmp_path / "checkpoint.pth")
    fine = dict(ck, **{"weak_head.weight": torch.zeros(10, 768)})   # PretrainedSED fine-tuned
    torch.save(fine, tmp_path / "ASIT_weak.pt")
    for name in ("checkpoint.pth", "ASIT_weak.pt"):
        other = M.load_encoder(str(tmp_path / name))
        assert torch.equal(other(audio, 16000).frames, got(audio, 16000).frames), name
    assert M.load_encoder(str(tmp_path / "ASIT_weak.pt")).finetuned and not got.finetuned
    renamed = dict(ck)
    renamed["model.blocks.0.mlp.fc3.weight"] = renamed.pop("model.blocks.0.mlp.fc2.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(P.UserError, match=r"missing: \['blocks.0.mlp.fc2.weight'\]; "
                                          r"unexpected: \['blocks.0.mlp.fc3.weight'\]"):
        M.load_encoder(str(tmp_path / "renamed.pt"))
    del renamed["model.blocks.0.mlp.fc3.weight"], renamed["model.norm.bias"]
    torch.save(renamed, tmp_path / "missing.pt")
    with pytest.raises(P.UserError, match=r"missing: \['blocks.0.mlp.fc2.weight', 'norm.bias'\]"):
        M.load_encoder(str(tmp_path / "missing.pt"))


def test_asit_embeddings_of_long_stereo_44k_audio(tmp_path):
    """SPEC_ASIT 7: a 25 s 44.1 kHz stereo file read with soundfile -> one frame per 160 ms up
    to its end: 25 s -> (400000 - 400) // 160 + 1 = 2498 Kaldi frames -> 156 time columns,
    centred at 80, 240, ... 24880 ms; each frame is the mean of its column's 8 patch tokens
    from the 592-frame chunk it falls in; the clip is [CLS, mean] per chunk, averaged over
    the chunks that count (4 x 37 columns, and the trailing 8 < 37 / 2 does not)."""
    ae = _tiny_asit()
    t = np.arange(25 * 44100) / 44100
    sig = 0.1 * np.sin(2 * np.pi * (300 + 30 * t) * t)
    sf.write(tmp_path / "long.wav", np.stack([sig, 0.5 * sig], 1).astype(np.float32), 44100)
    x, sr = sf.read(tmp_path / "long.wav", dtype="float32")
    e = ae(torch.from_numpy(x), sample_rate=sr)
    assert e.frames.shape == (1, 156, 32) and e.lengths.tolist() == [156]
    assert e.timestamps[:3].tolist() == [80.0, 240.0, 400.0] and e.timestamps[-1] == 24880.0
    mono = torchaudio.functional.resample(torch.from_numpy(x).T.mean(0, keepdim=True), sr,
                                          16000)
    fb = ae.front(mono)                                           # (1, 128, 2496)
    assert fb.shape == (1, 128, 2496)
    cls, means = [], []
    for k in range(5):                                            # chunks of 37 columns
        out = ae.encoder(fb[..., 592 * k: 592 * (k + 1)])             # the last: 8 columns
        cols = out[:, 1:].unflatten(1, (-1, 8)).mean(2)          # (1, n, 32)
        assert torch.allclose(e.frames[:, 37 * k: 37 * k + cols.shape[1]], cols, atol=1e-5)
        cls.append(out[0, 0]), means.append(cols[0].mean(0))
    want = torch.stack([torch.cat([c, m]) for c, m in zip(cls[:4], means[:4])]).mean(0)
    assert torch.allclose(e.clip[0], want, atol=1e-5)


@pytest.mark.parametrize("kind,seconds", [("asit", 0.1), ("frame", 0.02), ("clip", 0.02)])
def test_clip_shorter_than_one_frame_is_padded_to_one(kind, seconds):
    """Under one output frame (ASiT: 175 ms of samples for a 160 ms column; ATST: 30 ms for a
    40 ms token): zero-padded to one, one finite frame (it used to be 0 frames and a NaN clip
    embedding)."""
    ae = _tiny_asit() if kind == "asit" else _tiny_encoder(kind)
    e = ae(torch.randn(int(seconds * 16000)) * 0.1, 16000)
    assert e.frames.shape[:2] == (1, 1) and e.lengths.tolist() == [1]
    assert torch.isfinite(e.clip).all() and torch.isfinite(e.frames).all()


def test_asit_sed_model_repeats_each_frame_over_four_label_frames():
    """SPEC_ASIT 7: strong outputs on the 40 ms grid: each 160 ms frame's probabilities four
    times; weak pooling over the valid 160 ms frames only."""
    ae = _tiny_asit()
    model = M.SedModel(ae, 5).eval()
    x, n = ae.features(torch.randn(2, 10 * 16000) * 0.1, torch.tensor([10 * 16000, 4 * 16000]))
    assert n.tolist() == [62, 24]
    with torch.no_grad():
        s, w = model(x, n)
        frames = ae.encode(x, n).frames
        s_ref, w_ref = model.head(frames, torch.arange(62) < n[:, None])
    assert s.shape == (2, 248, 5) and torch.equal(s[:, ::4], s_ref)
    assert all(torch.equal(s[:, i::4], s_ref) for i in range(4)) and torch.equal(w, w_ref)


def test_hear_api_on_asit(tmp_path):
    """hear.py serves ASiT like ATST: 160 ms timestamps from 80 ms, [CLS, mean] scenes."""
    import hear
    torch.manual_seed(0)     # a release holds no head count: load_encoder takes dim // 64
    ae = M.AudioEncoder(M.Encoder(dim=128, depth=2, heads=2, drop_path=0.0, cls_token=True,
                                  tokens="patch16", qkv_bias=True, max_tokens=296), "asit").eval()
    sd = {f"model.{k}": v for k, v in ae.encoder.state_dict().items()}
    sd["model.patch_embed.proj.weight"] = sd.pop("model.patch_embed.weight").view(128, 1, 16, 16)
    sd["model.patch_embed.proj.bias"] = sd.pop("model.patch_embed.bias")
    torch.save(sd, tmp_path / "asit.pt")
    model = hear.load_model(str(tmp_path / "asit.pt"), device="cpu")
    assert model.timestamp_embedding_size == 2 * 128 and model.scene_embedding_size == 4 * 128
    audio = torch.rand(3, 2 * 16000) * 0.2 - 0.1
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.shape == (3, 12, 256) and (ts.diff(dim=1) == 160).all() and (ts[:, 0] == 80).all()
    torch.testing.assert_close(emb[0], ae(audio[:1], 16000, layers="all").frames[0])
    assert hear.get_scene_embeddings(audio, model).shape == (3, 512)


# ---------------------------------------------------------------------------------- bf16 paths


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
        model, inputs, kw = _asit(drop_path=0.0), _asit_inputs(), dict(teacher_temp=0.04)
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


@pytest.mark.parametrize("kind", ["frame", "clip", "asit"])
def test_embedding_api_in_bf16_matches_fp32(kind):
    """enc(..., dtype="bf16") on the CPU: fp32 outputs, within bf16 precision of fp32."""
    ae = _tiny_asit() if kind == "asit" else _tiny_encoder(kind)
    x = torch.randn(2, 3 * 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    a, b = ae(x, 16000, dtype="fp32"), ae(x, 16000, dtype="bf16")
    assert not torch.equal(a.frames, b.frames)                   # bf16 did run
    for u, v in ((a.frames, b.frames), (a.clip, b.clip)):
        assert v.dtype == torch.float32
        assert F.cosine_similarity(u.flatten(1), v.flatten(1)).min() > 0.99
