"""heads.py and the downstream pieces around it: classifier checkpoints, linear features,
layer-wise lr decay, distillation teachers, SED attention pooling and ASiT's label grid."""
import math

import numpy as np
import pytest
import soundfile as sf
import torch

import data as D
import finetune
import heads as H
import loaders as L
import model as M
import plumbing as P
import runtime as R
from conftest import mel_batch, tiny_asit, tiny_encoder


def test_classifier_checkpoints_load_strictly(tmp_path):
    """Our fine-tuned layout (encoder.* + head.*) round-trips through export / load_export and
    load_classifier; an unexpected or missing key is an error naming it."""
    torch.manual_seed(0)
    a = H.Classifier(R.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, cls_token=True),
                                    "clip"), 3).eval()
    P.save_atomic(dict(kind="atst-finetune", model=a.export(), classes=["x", "y", "z"],
                       encoder_args=a.ae.encoder.args), str(tmp_path / "ft.pt"))
    b = H.load_classifier(str(tmp_path / "ft.pt"))
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
        H.load_classifier(str(tmp_path / "pre.pt"))


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_linear_features_are_every_block_and_12s_centre_in_chunks(kind, tmp_path):
    """12 blocks: features are 12*D (Frame mean) / 2*12*D (Clip [CLS, mean]); a 25 s clip is
    centre-cropped to 12 s and split into chunks; Clip: two 6 s chunks, both counted; Frame:
    10 s + 2 s, the 2 s trailing chunk (under half a chunk) is not counted."""
    torch.manual_seed(0)
    enc = M.Encoder(dim=16, depth=12, heads=2, drop_path=0.0, cls_token=kind == "clip",
                    mask_token=kind == "frame")
    ae = R.AudioEncoder(enc, kind).eval()
    assert ae.dims("all")[1] == (2 * 12 * 16 if kind == "clip" else 12 * 16)
    t = np.arange(25 * 16000) / 16000
    sig = (0.1 * np.sin(2 * np.pi * (200 + 40 * t) * t)).astype(np.float32)  # a slow chirp
    sf.write(tmp_path / "long.wav", sig, 16000)
    ds = L.LabelledClips([dict(path=str(tmp_path / "long.wav"), _where="x")], torch.zeros(1),
                         12.0)
    wav, valid, _ = ds[0]
    wav = D.on_device(wav, "cpu")                         # the file's int16 samples, / 32768
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
    model = H.Classifier(R.AudioEncoder(enc, "frame"), 5)
    scale = {id(p): g["lr_scale"] for g in H.layer_decay_groups(model, 0.75)
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
    teacher = H.Classifier(R.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, cls_token=True),
                                          "clip"), 4).train()
    student = H.Classifier(R.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, mask_token=True),
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



@pytest.mark.parametrize("kind", ["frame", "clip", "asit"])
def test_every_trained_parameter_gets_a_gradient(kind):
    """What DDP needs of the downstream models: one forward and backward gives a gradient to
    every parameter that trains (fine-tuning: all but ATST-Frame's mask token, which only
    pre-training uses; SED linear: the head; SED fine-tune: also the last block and the final
    norm), random weights included; the frozen ones get none."""
    ae = tiny_asit() if kind == "asit" else tiny_encoder(kind)
    ae.source = "tiny"
    mel = ae.features(torch.randn(3, 48000), torch.tensor([48000, 40000, 30000]))
    for fresh in (False, True):  # pre-trained weights, then --random_init's
        model = H.Classifier(R.random_weights(ae, 1) if fresh else ae, 5).train()
        model(*mel).sum().backward()
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trained
        names = dict(model.named_parameters())
        assert ("ae.encoder.mask_token" in names) == (kind == "frame")
        assert "ae.encoder.mask_token" not in trained and len(trained) == len(names) - (
            kind == "frame")
    last = f"ae.encoder.blocks.{ae.encoder.depth - 1}."
    for mode, want in (("linear", ("head.",)), ("finetune", ("head.", "ae.encoder.norm.", last))):
        model = H.SedModel(ae, 4)
        model.zero_grad(set_to_none=True)
        model.trainable(mode)
        model.train_mode(mode)
        sum(x.sum() for x in model(*mel)).backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        assert got == {n for n, p in model.named_parameters() if p.requires_grad}
        assert got and all(n.startswith(want) for n in got), (mode, sorted(got))

def test_teacher_of_another_front_end_sees_the_same_mixup():
    """Distillation across front-ends (finetune.teacher_inputs): an ATST-Frame student's input
    is passed through to an ATST-Clip teacher; an ASiT teacher gets its Kaldi view of the same
    waveforms, mixed with the lambdas and partners that the step's rng gives the student
    (drawn here by hand: permutation, then Beta), and no RRC."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    wav, valid = torch.randn(4, 3 * 16000) * 0.1, torch.full((4,), 3 * 16000)
    frame, asit = tiny_encoder("frame"), tiny_asit()
    x, n = frame.features(wav, valid)
    c, seed = SimpleNamespace(mixup=True, mixup_alpha=0.5), 1234
    same = finetune.teacher_inputs(SimpleNamespace(ae=tiny_encoder("clip")), frame, x, n, wav,
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
    head = H.SedHead(2, 3)
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


def test_asit_sed_model_repeats_each_frame_over_four_label_frames():
    """R17: strong outputs on the 40 ms grid: each 160 ms frame's probabilities four
    times; weak pooling over the valid 160 ms frames only."""
    ae = tiny_asit()
    model = H.SedModel(ae, 5).eval()
    x, n = ae.features(torch.randn(2, 10 * 16000) * 0.1, torch.tensor([10 * 16000, 4 * 16000]))
    assert n.tolist() == [62, 24]
    with torch.no_grad():
        s, w = model(x, n)
        s_ref = model.head(ae.encode(x, n).frames)[0]
        x2 = x.clone()
        x2[1, :, 24 * 16:] = 5.0                          # clip 2's padding, changed
        s2, w2 = model(x2, n)
    assert s.shape == (2, 248, 5)
    assert all(torch.equal(s[:, i::4], s_ref) for i in range(4))
    assert torch.allclose(w2[1], w[1]) and torch.allclose(s2[1, :96], s[1, :96])
    assert torch.equal(w2[0], w[0])
