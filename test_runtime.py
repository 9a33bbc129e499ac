"""runtime.py: the embedding API of every kind (audio of any length, rate and channels;
padded batches; layers; bf16) and every checkpoint layout the loader reads."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio

import heads as H
import model as M
import plumbing as P
import runtime as R
from conftest import released_layouts, run_together, tiny_asit, tiny_encoder


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_load_encoder_reads_every_layout_identically(kind, tmp_path):
    torch.manual_seed(0)
    enc = M.Encoder(dim=128, depth=2, heads=2, drop_path=0.0, cls_token=kind == "clip",
                    mask_token=kind == "frame")
    ref = R.AudioEncoder(enc, kind).eval()
    audio = torch.randn(2, 3 * 16000) * 0.1
    want = ref(audio, 16000, layers="all")
    for name, ck in released_layouts(enc, kind):
        path = str(tmp_path / f"{name}.ckpt")
        torch.save(ck, path)
        got = R.load_encoder(path)
        assert got.kind == kind and got.encoder.depth == 2 and got.encoder.dim == 128, name
        e = got(audio, 16000, layers="all")
        assert torch.equal(e.frames, want.frames) and torch.equal(e.clip, want.clip), name
    # ours: a pre-training checkpoint (teacher encoder), heads taken from model_args
    torch.manual_seed(0)
    atst = M.ATST(kind, **M.PRESETS["tiny"])
    path = str(tmp_path / "ours.pt")
    P.save_atomic(dict(model=atst.state_dict(), model_args=dict(method=kind, **M.PRESETS["tiny"]),
                       kind="atst-pretrain"), path)
    got = R.load_encoder(path)
    assert got.encoder.blocks[0].attn.heads == 4
    x = M.MelFrontEnd()(audio)[..., :600]
    assert torch.equal(got.encoder(x), atst.teacher.encoder.eval()(x))


def test_load_encoder_names_missing_and_unexpected_keys(tmp_path):
    enc = M.Encoder(dim=128, depth=2, heads=2, mask_token=True)
    _, ck = next(released_layouts(enc, "frame"))
    sd = ck["state_dict"]
    del sd["model.teacher.encoder.blocks.1.mlp.fc2.bias"]
    torch.save(ck, tmp_path / "missing.ckpt")
    with pytest.raises(P.UserError, match=r"missing: \['blocks.1.mlp.fc2.bias'\]"):
        R.load_encoder(str(tmp_path / "missing.ckpt"))
    _, ck = next(released_layouts(enc, "frame"))
    ck["state_dict"]["model.teacher.encoder.blocks.0.attn.qkv.bias"] = torch.zeros(384)
    torch.save(ck, tmp_path / "extra.ckpt")
    with pytest.raises(P.UserError, match=r"unexpected: \['blocks.0.attn.qkv.bias'\]"):
        R.load_encoder(str(tmp_path / "extra.ckpt"))
    torch.save({"weights": 1}, tmp_path / "odd.ckpt")
    with pytest.raises(P.UserError, match="odd.ckpt: not a checkpoint layout"):
        R.load_encoder(str(tmp_path / "odd.ckpt"))


@pytest.mark.parametrize("kind", ["frame", "clip"])
def test_long_stereo_44k_audio_is_chunked_without_losing_frames(kind):
    ae = tiny_encoder(kind)
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
    ae = tiny_asit() if kind == "asit" else tiny_encoder(kind)
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


def test_embedding_api_takes_what_users_pass(tmp_path):
    """soundfile's (samples, channels) array is one multi-channel clip (it once became a batch
    of two-sample clips: 17.9 GB, or rows of NaN); the rate must be given; int16 is scaled;
    NaN, a batch wider than its clips and unknown layers are errors saying so."""
    ae = tiny_encoder("frame")
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
    for empty in (torch.zeros(0), np.zeros((0, 2), np.float32), torch.zeros(3, 0)):
        with pytest.raises(ValueError, match=r"empty audio \(0 samples, shape"):  # not "transpose"
            ae(empty, sample_rate=16000)
    with pytest.raises(ValueError, match=r"layers \[7\]: this encoder has blocks 0 to 2"):
        ae(torch.zeros(16000), sample_rate=16000, layers=[7])
    once = ae(torch.zeros(16000), sample_rate=16000, layers=[1])
    twice = ae(torch.zeros(16000), sample_rate=16000, layers=[1, 1])   # a block named twice
    assert torch.equal(once.frames, twice.frames) and torch.equal(once.clip, twice.clip)


@pytest.mark.parametrize("kind", ["frame", "asit"])
def test_embedding_api_checks_lengths_and_sample_rate(kind):
    """lengths: one per clip, none longer than the audio; sample_rate: any positive number
    (44100.0 is 44100 for every kind), anything else said plainly."""
    ae = tiny_asit() if kind == "asit" else tiny_encoder(kind)
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
    with pytest.raises(ValueError, match=r"lengths \[0, 44100\]: every clip needs at least one"):
        ae(x, 44100, lengths=[0, 44100])


def test_unreadable_checkpoints_are_named(tmp_path):
    """A truncated file, random bytes, a text file, a pickle of something else: each is an error
    naming the file, not a raw torch / pickle message; a classifier given where an SED model
    is needed is called a classifier."""
    ck = tmp_path / "good.pt"
    P.save_atomic(dict(kind="atst-finetune", model=H.Classifier(tiny_encoder("clip"), 3)
                       .export(), classes=list("abc"), encoder_args=tiny_encoder("clip")
                       .encoder.args), str(ck))
    data = ck.read_bytes()
    import pickle
    bad = {"truncated.pt": data[:len(data) // 2], "random.pt": bytes(range(256)) * 40,
           "text.pt": b"this is not a checkpoint\n", "plain.pkl": pickle.dumps([1, 2, 3])}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(P.UserError, match=f"{name}: not a readable checkpoint"):
            R.load_encoder(str(tmp_path / name))
    torch.save([1, 2, 3], tmp_path / "list.pt")                   # readable, but not ours
    with pytest.raises(P.UserError, match="list.pt: not a checkpoint layout"):
        R.load_encoder(str(tmp_path / "list.pt"))
    with pytest.raises(P.UserError, match="good.pt: a fine-tuned classifier .*; this needs an "
                       "SED model"):
        H.load_classifier(str(ck), expect=["atst-sed"])
    state = P.load_checkpoint(str(ck))
    del state["model"]["encoder.pos_embed"]
    torch.save(state, tmp_path / "nopos.pt")
    with pytest.raises(P.UserError, match=r"missing encoder keys \['pos_embed'\]"):
        R.load_encoder(str(tmp_path / "nopos.pt"))


def _release_keys(depth=12):
    """The released ASIT_ssl.pt's keys and shapes, written out from R18 (ViT-B)."""
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
    """R18: a flat dict with exactly the release's names and shapes (random weights)
    loads as ASiT base (12 heads, qkv bias, 296 + 1 positions); with the same weights put into
    our Encoder by hand (conv weight (768, 1, 16, 16) -> (768, 256)) the embeddings are
    identical; the authors' training-script layout and a fine-tuned release load the same
    weights; a renamed or missing key is an error naming it."""
    g = torch.Generator().manual_seed(0)
    ck = {k: torch.randn(s, generator=g) * 0.02 for k, s in _release_keys().items()}
    torch.save(ck, tmp_path / "ASIT_ssl.pt")
    got = R.load_encoder(str(tmp_path / "ASIT_ssl.pt"))
    assert got.kind == "asit" and got.name == "ASiT" and got.encoder.depth == 12
    assert got.encoder.blocks[0].attn.heads == 12 and got.encoder.max_tokens == 296
    ours = M.Encoder(dim=768, depth=12, heads=12, drop_path=0.0, cls_token=True,
                     tokens="patch16", qkv_bias=True, max_tokens=296)
    by_hand = {k[len("model."):]: v for k, v in ck.items()}
    by_hand["patch_embed.weight"] = by_hand.pop("patch_embed.proj.weight").reshape(768, 256)
    by_hand["patch_embed.bias"] = by_hand.pop("patch_embed.proj.bias")
    ours.load_state_dict(by_hand, strict=True)
    ref = R.AudioEncoder(ours, "asit").eval()
    audio = torch.randn(1, 7 * 16000, generator=g) * 0.1
    want, e = ref(audio, 16000, layers=[5, 11]), got(audio, 16000, layers=[5, 11])
    assert torch.equal(e.frames, want.frames) and torch.equal(e.clip, want.clip)
    assert e.clip.shape == (1, 4 * 768) and e.frames.shape == (1, 43, 2 * 768)
    # the other layouts, on a 1-block release (same names and widths; quicker to write)
    ck = {k: v for k, v in ck.items() if not k.startswith("model.blocks.") or
          k.startswith("model.blocks.0.")}
    torch.save(ck, tmp_path / "ASIT_ssl.pt")
    got = R.load_encoder(str(tmp_path / "ASIT_ssl.pt"))
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
        other = R.load_encoder(str(tmp_path / name))
        assert torch.equal(other(audio, 16000).frames, got(audio, 16000).frames), name
    assert R.load_encoder(str(tmp_path / "ASIT_weak.pt")).finetuned and not got.finetuned
    renamed = dict(ck)
    renamed["model.blocks.0.mlp.fc3.weight"] = renamed.pop("model.blocks.0.mlp.fc2.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(P.UserError, match=r"missing: \['blocks.0.mlp.fc2.weight'\]; "
                                          r"unexpected: \['blocks.0.mlp.fc3.weight'\]"):
        R.load_encoder(str(tmp_path / "renamed.pt"))
    del renamed["model.blocks.0.mlp.fc3.weight"], renamed["model.norm.bias"]
    torch.save(renamed, tmp_path / "missing.pt")
    with pytest.raises(P.UserError, match=r"missing: \['blocks.0.mlp.fc2.weight', 'norm.bias'\]"):
        R.load_encoder(str(tmp_path / "missing.pt"))


def test_asit_embeddings_of_long_stereo_44k_audio(tmp_path):
    """R17: a 25 s 44.1 kHz stereo file read with soundfile -> one frame per 160 ms up
    to its end: 25 s -> (400000 - 400) // 160 + 1 = 2498 Kaldi frames -> 156 time columns,
    centred at 80, 240, ... 24880 ms; each frame is the mean of its column's 8 patch tokens
    from the 592-frame chunk it falls in; the clip is [CLS, mean] per chunk, averaged over
    the chunks that count (4 x 37 columns, and the trailing 8 < 37 / 2 does not)."""
    ae = tiny_asit()
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
    ae = tiny_asit() if kind == "asit" else tiny_encoder(kind)
    e = ae(torch.randn(int(seconds * 16000)) * 0.1, 16000)
    assert e.frames.shape[:2] == (1, 1) and e.lengths.tolist() == [1]
    assert torch.isfinite(e.clip).all() and torch.isfinite(e.frames).all()


@pytest.mark.parametrize("kind", ["frame", "clip", "asit"])
def test_embedding_api_in_bf16_matches_fp32(kind):
    """enc(..., dtype="bf16") on the CPU: fp32 outputs, within bf16 precision of fp32."""
    ae = tiny_asit() if kind == "asit" else tiny_encoder(kind)
    x = torch.randn(2, 3 * 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    a, b = ae(x, 16000, dtype="fp32"), ae(x, 16000, dtype="bf16")
    assert not torch.equal(a.frames, b.frames)                   # bf16 did run
    for u, v in ((a.frames, b.frames), (a.clip, b.clip)):
        assert v.dtype == torch.float32
        assert F.cosine_similarity(u.flatten(1), v.flatten(1)).min() > 0.99


def test_a_new_kind_is_a_row_of_the_table(monkeypatch):
    """A patch model over the 64-mel front-end (16 x 16 patches: 4 per 160 ms time column,
    CLS) added as a KINDS row only: the runtime chunks, pools and times it from the row, and
    its structure, the same as ASiT's, is no longer enough to name a file's kind."""
    row = M.Kind("Patch-Mel", M.MelFrontEnd, "patch16", cls_token=True, mask_token=False,
                 qkv_bias=True, max_tokens=40, unit=16, per_frame=4, chunk=8,
                 clip_pool="cls+mean", frame_pool="mean")
    monkeypatch.setitem(M.KINDS, "patchmel", row)
    torch.manual_seed(0)
    ae = R.AudioEncoder(M.Encoder(dim=32, depth=2, heads=2, **row.encoder_args()), "patchmel")
    e = ae.eval()(torch.randn(16000 * 4), sample_rate=16000)    # 4 s: 401 frames -> 25 x 160 ms
    assert e.frames.shape == (1, 25, 32) and e.clip.shape == (1, 64)
    assert torch.allclose(e.timestamps[:2], torch.tensor([80.0, 240.0]))
    assert ae.chunk == 8 and ae.same_front(tiny_encoder("clip"))  # the row's, below 40 // 4
    assert not ae.same_front(tiny_asit())
    with pytest.raises(ValueError, match="more than one of the known kinds"):
        R.kind_of(row.encoder_args())
    with pytest.raises(ValueError, match="none of the known kinds"):
        R.kind_of(dict(tokens="atst", cls_token=True, mask_token=True, qkv_bias=False))


def test_our_files_name_their_kind_and_the_loader_reads_it(tmp_path):
    """Every checkpoint we write names its encoder's kind; the loader takes it from there
    (a file from before the field: the stored arguments' row, or an error when none fits)."""
    ae = tiny_encoder("clip")
    ck = dict(kind="atst-finetune", model=H.Classifier(ae, 3).export(), classes=list("abc"),
              encoder_args=ae.encoder.args, encoder_kind="clip")
    P.save_atomic(ck, str(tmp_path / "ft.pt"))
    assert R.load_encoder(str(tmp_path / "ft.pt")).kind == "clip"
    del ck["encoder_kind"]
    P.save_atomic(ck, str(tmp_path / "old.pt"))
    assert R.load_encoder(str(tmp_path / "old.pt")).kind == "clip"
    ck["encoder_args"] = dict(ae.encoder.args, tokens="patch16", qkv_bias=False)
    P.save_atomic(ck, str(tmp_path / "odd.pt"))
    with pytest.raises(P.UserError, match="odd.pt: an encoder with .* is none of the known"):
        R.load_encoder(str(tmp_path / "odd.pt"))


def test_concat_frames_keep_asits_band_tokens_apart():
    """frame_pool concat: per layer, the 8 band tokens of a 160 ms time column side by side
    (time-major token order), 8 x wider; their mean is the default frame; the padded batch
    still equals each clip alone; a kind of one token a frame is unchanged."""
    ae, audio = tiny_asit(), torch.randn(2, 3 * 16000) * 0.1
    mean = ae(audio, 16000, layers="all")
    ae.pool_frames("concat")
    cat = ae(audio, 16000, layers="all")
    L, nb, dim = 2, 8, 32
    assert cat.frames.shape[-1] == L * nb * dim == ae.dims("all")[0]
    assert cat.clip.shape[-1] == L * dim + L * nb * dim == ae.dims("all")[1]
    bands = cat.frames.unflatten(-1, (L, nb, dim))                    # (B, N, L, P, dim)
    torch.testing.assert_close(bands.mean(3).flatten(2), mean.frames, atol=1e-6, rtol=1e-5)
    x, n = ae.features(*ae.prepare(audio, 16000))                  # 3 s: one chunk
    N = x.shape[-1] // 16
    tokens = ae.encoder(x[..., :16 * N], layers=[1])[0][:, 1:]      # N columns of 8 tokens
    torch.testing.assert_close(bands[:, :, 1], tokens.unflatten(1, (N, nb)), atol=1e-5, rtol=0)
    alone = ae(audio[1, :16000], 16000)
    batch = ae(torch.stack([audio[0], F.pad(audio[1, :16000], (0, 2 * 16000))]), 16000,
               lengths=[3 * 16000, 16000])
    torch.testing.assert_close(batch.frames[1, :alone.frames.shape[1]], alone.frames[0],
                               atol=1e-5, rtol=0)
    frame = tiny_encoder("frame")
    a = frame(audio, 16000).frames
    assert torch.equal(frame.pool_frames("concat")(audio, 16000).frames, a)
    with pytest.raises(P.UserError, match="--frame_pool 'sum'"):
        frame.pool_frames("sum")


def test_a_planted_checkpoint_runs_nothing_through_any_entry_point(tmp_path, data_root):
    """A checkpoint whose unpickling would run a command (people fetch checkpoints from drives
    and hubs) is refused wherever a checkpoint comes in, and the command never runs: the
    Python API (load_encoder, hear.load_model, X-ARES's AtstEncoder, export, load_classifier)
    with an error naming the file; every command (export.py, hear.py's --model, embed.py and
    the stages' --ckpt, distill.py's and sed.py's --teacher, a resume from a crafted ckpt.pt in
    a run folder) with that one line and exit status 1."""
    import export
    import hear
    from test_plumbing import _Planted
    from xares_encoder import AtstEncoder
    marker, bad, good = tmp_path / "ran", str(tmp_path / "planted.ckpt"), str(tmp_path / "ok.ckpt")
    enc = M.Encoder(dim=64, depth=2, heads=2, drop_path=0.0, **M.KINDS["frame"].encoder_args())
    _, ck = next(released_layouts(enc, "frame"))
    torch.save(ck, good)                       # a valid --ckpt where another file is planted
    torch.save(dict(ck, hyper=_Planted(marker)), bad)
    run_dir = tmp_path / "resume"
    run_dir.mkdir()
    torch.save(dict(model={}, optimizer={}, epoch=1, best=None, config={},
                    hyper=_Planted(marker)), run_dir / "ckpt.pt")
    for load in (R.load_encoder, hear.load_model, lambda p: AtstEncoder(p, device="cpu"),
                 lambda p: export.export(p, str(tmp_path / "exported")), H.load_classifier):
        with pytest.raises(P.UserError, match="planted.ckpt: holds a Python object"):
            load(bad)
    (tmp_path / "tasks").mkdir()
    demo = ["--data", "demo_events", "--num_workers", "1", "--epochs", "1"]
    sed = ["--data", "demo_sed", "--num_workers", "1", "--epochs", "1"]
    jobs = [("export.py", bad, str(tmp_path / "x")),
            ("hear.py", "embeddings", "--model", bad, "--tasks-dir", str(tmp_path / "tasks"),
             "--embeddings-dir", str(tmp_path / "emb")),
            ("embed.py", os.path.join(data_root, "demo", "events", "audio"), "--ckpt", bad,
             "--out", str(tmp_path / "npz"), "--num_workers", "1"),
            ("linear_eval.py", "--ckpt", bad, *demo[:4], "--out", str(tmp_path / "lin.json"),
             "--cache_dir", str(tmp_path / "cache")),
            ("finetune.py", "--ckpt", bad, *demo, "--out_dir", str(tmp_path / "ft")),
            ("sed.py", "--ckpt", bad, *sed, "--out_dir", str(tmp_path / "sed")),
            ("distill.py", "--ckpt", good, "--teacher", bad, *demo, "--out_dir",
             str(tmp_path / "kd")),
            ("sed.py", "--ckpt", good, "--teacher", bad, *sed, "--out_dir",
             str(tmp_path / "sed_kd")),
            ("finetune.py", "--ckpt", good, *demo, "--out_dir", str(run_dir))]
    for job, p in zip(jobs, run_together(jobs, data_root, check=False)):
        assert p.returncode == 1 and "Traceback" not in p.stderr, (job, p.stderr[-2000:])
        line = p.stderr.strip().splitlines()[-1]
        name = "resume/ckpt.pt" if job[-1] == str(run_dir) else "planted.ckpt"
        assert f"{name}: holds a Python object that a weights-only load refuses" in line, job
    assert not marker.exists()
