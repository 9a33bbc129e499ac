"""export.py and xares_encoder.py: the portable folder (safetensors + config.json + card) read
back exactly for every checkpoint layout, a Hub id without network, and X-ARES's own checker
on the encoder of every kind."""
import json
import os

import pytest
import torch

import heads as H
import model as M
import plumbing as P
import runtime as R
from conftest import asit_release, released_layouts, tiny_asit, tiny_encoder


def test_export_and_load_back_exactly_for_every_layout(tmp_path, monkeypatch):
    """export.py -> model.safetensors + config.json + README.md; load_encoder(folder) gives
    torch.equal embeddings for every layout the loader reads, and keeps kind and fine-tuning."""
    import export
    torch.manual_seed(0)
    audio = torch.randn(2, 3 * 16000) * 0.1
    files = []
    for kind in ("frame", "clip"):
        enc = M.Encoder(dim=64, depth=2, heads=2, drop_path=0.0, **M.KINDS[kind].encoder_args())
        for name, ck in released_layouts(enc, kind):
            torch.save(ck, tmp_path / f"{kind}_{name}.ckpt")
            files.append(tmp_path / f"{kind}_{name}.ckpt")
    files.append(tmp_path / "ASIT_ssl.pt")
    torch.save(asit_release(tiny_asit()), files[-1])
    ae = tiny_encoder("clip")
    P.save_atomic(dict(kind="atst-sed", model=H.SedModel(ae, 3).export(), classes=list("abc"),
                       encoder_args=ae.encoder.args, encoder_kind="clip", config={}),
                  str(tmp_path / "sed.pt"))
    files.append(tmp_path / "sed.pt")
    for f in files:
        folder = export.export(str(f), str(tmp_path / "x" / f.stem))
        assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
        cfg = json.load(open(os.path.join(folder, "config.json")))
        want, got = R.load_encoder(str(f)), R.load_encoder(folder)
        assert cfg["kind"] == want.kind == got.kind and got.finetuned == want.finetuned, f
        assert cfg["provenance"]["sha256"] and cfg["kind_row"]["name"] == want.name
        a, b = want(audio, 16000, layers="all"), got(audio, 16000, layers="all")
        assert torch.equal(a.frames, b.frames) and torch.equal(a.clip, b.clip), f
    again = json.load(open(os.path.join(export.export(folder, str(tmp_path / "again")),
                                         "config.json")))                # a folder exported
    assert again["provenance"]["sha256"] == cfg["provenance"]["sha256"]  # keeps its source
    import huggingface_hub  # (installed with xares's transformers) a Hub id, and no network:

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id} is not in the cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(P.UserError, match="nobody-here/no-such-encoder: could not fetch it from "
                       "the Hugging Face Hub .*HF_HUB_OFFLINE=1"):
        R.load_encoder("nobody-here/no-such-encoder")


def test_the_x_ares_checker_passes_for_every_kind(tmp_path):
    """X-ARES's own audio_encoder_checker on our encoder class, for the three kinds (and
    ASiT's concatenated band tokens); a minute of audio keeps every 40 / 160 ms frame."""
    from xares.audio_encoder_checker import check_audio_encoder
    from xares_encoder import AtstEncoder
    for kind, ae, pool in (("frame", tiny_encoder("frame"), ""),
                           ("clip", tiny_encoder("clip"), ""), ("asit", tiny_asit(), ""),
                           ("asit", tiny_asit(), "concat")):
        path = str(tmp_path / f"{kind}{pool}.pt")
        P.save_atomic(dict(kind="atst-finetune", model=H.Classifier(ae, 2).export(),
                           classes=["x", "y"], encoder_args=ae.encoder.args, encoder_kind=kind),
                      path)
        enc = AtstEncoder(path, frame_pool=pool, device="cpu")
        assert check_audio_encoder(enc), (kind, pool)
        out = enc(torch.randn(1, 60 * 16000) * 0.1)
        want = 1500 if kind != "asit" else ((60 * 16000 - 400) // 160 + 1) // 16  # 374
        assert out.shape == (1, want, enc.output_dim), (kind, pool)
