"""export.py and xares_encoder.py: the portable folder (safetensors + config.json + card) read
back exactly for every checkpoint layout, a Hub id without network, and X-ARES's own checker
on the encoder of every kind."""
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

import heads as H
import model as M
import plumbing as P
import runtime as R
from conftest import asit_release, released_layouts, run_together, tiny_asit, tiny_encoder


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
    with pytest.raises(P.UserError, match="nobody-here/no-such-encoder: neither a file or folder "
                       "here .*nor a Hugging Face Hub model .*LocalEntryNotFoundError"):
        R.load_encoder("nobody-here/no-such-encoder")
    monkeypatch.chdir(tmp_path)     # a mistyped run folder looks like a Hub id: both are named
    with pytest.raises(P.UserError, match=r"runs/frame_tiny: neither a file or folder here \(no "
                       r"such path\) nor a Hugging Face Hub model we could fetch \(.*"):
        R.load_encoder("runs/frame_tiny")


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


def _released(path, seed):
    """A tiny ATST-Frame in the released Lightning layout at path."""
    torch.manual_seed(seed)
    enc = M.Encoder(dim=64, depth=2, heads=2, drop_path=0.0, **M.KINDS["frame"].encoder_args())
    torch.save(next(released_layouts(enc, "frame"))[1], path)


def test_a_broken_or_edited_export_folder_is_one_line_naming_it(tmp_path):
    """A truncated model.safetensors, a config.json without a key or with an unknown encoder
    argument, and one that disagrees with the weights (heads, which the weights do not fix;
    kind; dim in an export from before the weights file recorded its arguments) are each a
    UserError naming the file, not a raw SafetensorError / KeyError / TypeError or a silent
    load of another model."""
    import export
    _released(tmp_path / "a.ckpt", 0)
    good = export.export(str(tmp_path / "a.ckpt"), str(tmp_path / "good"))

    def variant(name, edit=None, weights=None):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        cfg = json.load(open(folder / "config.json"))
        if edit:
            edit(cfg)
            (folder / "config.json").write_text(json.dumps(cfg))
        if weights:
            (folder / "model.safetensors").write_bytes(weights)
        return str(folder)
    blob = (tmp_path / "good" / "model.safetensors").read_bytes()
    cases = {
        variant("truncated", weights=blob[:len(blob) // 2]):
            r"truncated/model.safetensors: not a readable safetensors file \(a truncated",
        variant("nokey", lambda c: c.pop("finetuned")):
            r"nokey/config.json: no \['finetuned'\]",
        variant("extra", lambda c: c["encoder_args"].update(drop_path=0.1)):
            r"extra/config.json: encoder_args missing \[\], unknown \['drop_path'\]",
        variant("noheads", lambda c: c["encoder_args"].pop("heads")):
            r"noheads/config.json: encoder_args missing \['heads'\]",
        variant("heads", lambda c: c["encoder_args"].update(heads=4)):
            "heads/config.json disagrees with the weights it was exported with: encoder_args",
        variant("kind", lambda c: c.update(kind="clip")):
            "kind/config.json disagrees with the weights .*kind 'clip' .*'frame'"}
    state = safetensors.torch.load_file(os.path.join(good, "model.safetensors"))
    old = safetensors.torch.save(state, metadata=dict(format=export.PORTABLE, kind="frame"))
    assert R.load_encoder(variant("old", weights=old)).encoder.args == \
        R.load_encoder(good).encoder.args                                 # still read
    cases[variant("olddim", lambda c: c["encoder_args"].update(dim=32), weights=old)] = \
        r"olddim \(exported .*\): its stated encoder arguments disagree with its weights: dim " \
        r"32 \(the weights: 64\)"
    for folder, message in cases.items():
        with pytest.raises(P.UserError, match=message):
            R.load_encoder(folder)


def test_an_export_of_another_model_is_not_overwritten_unless_asked(tmp_path, data_root):
    """export.py into a folder holding another model's export (or a README.md of the user's)
    is refused, naming --overwrite, and leaves it as it was; exporting the same model again
    is fine; --overwrite replaces the three files and nothing else."""
    import export
    _released(tmp_path / "a.ckpt", 0)
    _released(tmp_path / "b.ckpt", 1)
    folder = tmp_path / "exp"
    export.export(str(tmp_path / "a.ckpt"), str(folder))
    (folder / "notes.txt").write_text("mine")
    export.export(str(tmp_path / "a.ckpt"), str(folder))                  # the same model
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    with pytest.raises(P.UserError, match="exp: already holds model.safetensors, config.json, "
                       "README.md of another model .*pass --overwrite"):
        export.export(str(tmp_path / "b.ckpt"), str(folder))
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "README.md").write_text("my notes")
    with pytest.raises(P.UserError, match="user: already holds README.md of another model"):
        export.export(str(tmp_path / "b.ckpt"), str(tmp_path / "user"))
    assert os.listdir(tmp_path / "user") == ["README.md"]
    shutil.copytree(folder, tmp_path / "exp2")
    refused, replaced = run_together([("export.py", str(tmp_path / "b.ckpt"), str(folder)),
                                      ("export.py", str(tmp_path / "b.ckpt"),
                                       str(tmp_path / "exp2"), "--overwrite")],
                                     data_root, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--overwrite" in refused.stderr.strip().splitlines()[-1]
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    audio = torch.randn(1, 16000) * 0.1
    assert torch.equal(R.load_encoder(str(tmp_path / "exp2"))(audio, 16000).frames,
                       R.load_encoder(str(tmp_path / "b.ckpt"))(audio, 16000).frames)
    assert (tmp_path / "exp2" / "notes.txt").read_text() == "mine"
