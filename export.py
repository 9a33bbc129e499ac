"""
The portable format: any checkpoint load_encoder reads (ours, the released ATST-Frame /
ATST-Clip / ASiT files) -> a folder that needs neither pickle nor this repository's classes:

    model.safetensors  the encoder's weights in our names (safetensors: tensors only, no code),
                       its metadata the kind and Encoder arguments (checked against config.json)
    config.json        format, kind and its model.KINDS row (front-end, token layout,
                       pooling, ...), the Encoder arguments, provenance (source, file hash,
                       method, steps, data and its copy, precision, commit)
    README.md          a short model card

Its reader is here too (read_portable, hub_folder): runtime.load_encoder(FOLDER) reads it back
exactly (the same embeddings), and so does load_encoder("org/name") after the folder is
uploaded to the Hugging Face Hub.

    python export.py out/frame_base/ckpt.pt exported/atst_frame_base
    python export.py ASIT_ssl.pt exported/asit_base
    python export.py other.ckpt exported/asit_base --overwrite  # replace another model's export
"""
import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess

import safetensors.torch
import torch

from model import KINDS
from plumbing import (UserError, check_writable, digest, load_checkpoint, save_text, user_errors,
                      write_atomic)
from runtime import load_encoder

FORMAT_VERSION = 1
PORTABLE = "atst-audio-encoder"  # config.json `format` of an exported folder
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name: a Hugging Face Hub repository
CONFIG_KEYS = ("format", "kind", "encoder_args", "finetuned")  # what read_portable reads
FILES = ("model.safetensors", "config.json", "README.md")  # all that export writes


def read_portable(folder):
    """(state, kind, Encoder args, description, fine-tuned) of a folder export.py wrote:
    model.safetensors (weights, our names) and config.json; no pickle is read. config.json
    must hold every key its reader uses, and agree with what the weights file was written
    with (kind; encoder arguments, heads included, which the weights alone do not fix)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: not an exported encoder folder (config.json: {e})") from None
    ours = isinstance(cfg, dict)
    if not ours or cfg.get("format") != PORTABLE or cfg.get("kind") not in KINDS:
        got = f"format {cfg.get('format')!r}, kind {cfg.get('kind')!r}" if ours else repr(cfg)
        raise UserError(f"{folder}/config.json: {got}: expected format {PORTABLE!r} and a kind "
                        f"of {sorted(KINDS)}")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    args = cfg.get("encoder_args")
    want = {"dim", "depth", "heads", *KINDS[cfg["kind"]].encoder_args()}  # Encoder's arguments
    if missing or not isinstance(args, dict) or set(args) != want:
        said = f"no {missing}" if missing else "encoder_args " + (
            f"missing {sorted(want - set(args))}, unknown {sorted(set(args) - want)}"
            if isinstance(args, dict) else f"{args!r}, not an object")
        raise UserError(f"{folder}/config.json: {said} (export.py writes {', '.join(CONFIG_KEYS)}"
                        f"; encoder_args: {', '.join(sorted(want))}): export the model again")
    weights = os.path.join(folder, "model.safetensors")
    try:
        with safetensors.safe_open(weights, "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, safetensors.SafetensorError) as e:
        raise UserError(f"{weights}: not a readable safetensors file (a truncated or partial "
                        f"download? {e})") from None
    written = dict(kind=meta.get("kind", cfg["kind"]),
                   encoder_args=json.loads(meta.get("encoder_args", json.dumps(args))))
    differ = [f"{k} {cfg[k]!r} (model.safetensors: {v!r})" for k, v in written.items()
              if cfg[k] != v]
    if differ:  # exports before the metadata held encoder_args are checked by shapes alone
        raise UserError(f"{folder}/config.json disagrees with the weights it was exported with: "
                        + ", ".join(differ))
    source = cfg.get("provenance", {}).get("source", "unknown source")
    return state, cfg["kind"], args, f"exported {source}", cfg["finetuned"]


def hub_folder(repo_id):
    """A Hub repository holding an exported folder -> its local snapshot (downloaded once,
    then read from the cache; HF_HUB_OFFLINE=1 reads the cache only)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id}: no such file or folder here; to fetch it as a model of the "
                        "Hugging Face Hub, pip install huggingface_hub") from None
    try:
        return snapshot_download(repo_id, allow_patterns=list(FILES))
    except Exception as e:  # offline, unknown repository, no access: one line says which
        raise UserError(f"{repo_id}: neither a file or folder here (no such path) nor a Hugging "
                        f"Face Hub model we could fetch ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); offline, a Hub model "
                        "fetched before is read with HF_HUB_OFFLINE=1") from None


def provenance(path, ae):
    """What is known of where the weights come from: the file, its hash, and for our own
    checkpoints the method, steps, data, its copy and precision (from the file and the
    summary written beside it). An exported folder (or its Hub id) keeps its own."""
    if not os.path.isfile(path):
        folder = path if os.path.isdir(path) else hub_folder(path)
        with open(os.path.join(folder, "config.json")) as f:
            return dict(json.load(f).get("provenance", {}), exported_again_from=path)
    out = dict(source=ae.source, file=os.path.basename(path), sha256=digest(path, 64),
               exported=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    ck = load_checkpoint(path)
    if isinstance(ck, dict) and "config" in ck:  # ours; pre-training writes a summary beside
        summary = json.load(open(path + ".json")) if os.path.exists(path + ".json") else {}
        out.update(checkpoint_kind=ck.get("kind"), step=ck.get("step"), epoch=ck.get("epoch"),
                   data=ck["config"].get("data"), dataset_copy=summary.get("dataset_copy"),
                   precision=summary.get("precision"), pretrained_from=ck.get("pretrained"))
    repo = os.path.dirname(os.path.abspath(__file__))
    git = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
    out["commit"] = git.stdout.strip() or None
    return {k: v for k, v in out.items() if v is not None}


def card(config):
    a, row = config["encoder_args"], config["kind_row"]
    per = "[CLS, mean of frames]" if row["clip_pool"] == "cls+mean" else "mean of frames"
    hop = row["unit"] * 10
    prov = "\n".join(f"| {k} | {v} |" for k, v in config["provenance"].items())
    return f"""# {row['name']} encoder (dim {a['dim']}, depth {a['depth']}, heads {a['heads']})

Exported by this project's `export.py`; weights in `model.safetensors` (the encoder only),
everything needed to build it in `config.json`.

- Input: audio of any length, rate and channels (resampled to 16 kHz mono); front-end
  `{row['front']}`; {hop} ms output frames; chunks of {row['chunk']} frames.
- Output: one embedding per {hop} ms frame of size dim x layers; clip embedding {per} per layer.
- {'Fine-tuned' if config['finetuned'] else 'Pre-trained (self-supervised)'} weights.

```python
from runtime import load_encoder          # this repository
enc = load_encoder("path/to/this/folder")
e = enc(wav, sample_rate=sr)              # e.frames, e.timestamps (ms), e.clip
```

| provenance | |
|---|---|
{prov}

The weights carry the licence of their source.
"""


def export(src, folder, overwrite=False):
    """src -> folder/{model.safetensors, config.json, README.md}. A folder already holding any
    of these is written only when they are an export of the same model (an identical
    model.safetensors: weights, kind and encoder arguments) or with overwrite; nothing else in
    it is touched."""
    check_writable(folder, "out", folder=True)
    ae = load_encoder(src)
    row = dataclasses.asdict(ae.row) | dict(front=ae.row.front.__name__)
    config = dict(format=PORTABLE, format_version=FORMAT_VERSION, kind=ae.kind, kind_row=row,
                  encoder_args=ae.encoder.args, finetuned=ae.finetuned,
                  provenance=provenance(src, ae))
    state = {k: v.contiguous() for k, v in ae.encoder.state_dict().items()}
    meta = dict(format=PORTABLE, kind=ae.kind,
                encoder_args=json.dumps(ae.encoder.args, sort_keys=True))
    held = [f for f in FILES if os.path.exists(os.path.join(folder, f))]
    if held and not overwrite and not _same(os.path.join(folder, FILES[0]), state, meta):
        raise UserError(f"{folder}: already holds {', '.join(held)} of another model (its "
                        "model.safetensors is not this export's: other weights, kind or encoder "
                        "arguments); pass --overwrite to replace these files (nothing else in "
                        "the folder is touched), or choose another folder")
    blob = safetensors.torch.save(state, metadata=meta)
    write_atomic(os.path.join(folder, "model.safetensors"), lambda f: f.write(blob))
    save_text(json.dumps(config, indent=1) + "\n", os.path.join(folder, "config.json"))
    save_text(card(config), os.path.join(folder, "README.md"))
    print(f"{src} ({ae.source}) -> {folder}: {ae.name}, dim {ae.encoder.dim}, depth "
          f"{ae.encoder.depth}, {sum(v.numel() for v in state.values()):,} weights")
    return folder


def _same(path, state, meta):
    """Whether path is this export's weights file: the same tensors and metadata (not the same
    bytes: safetensors writes the metadata in no fixed order)."""
    try:
        with safetensors.safe_open(path, "pt") as f:
            old = f.metadata() or {}  # an export older than encoder_args in it: fewer keys
            return all(old.get(k, v) == v for k, v in meta.items()) and set(old) <= set(meta) \
                and set(f.keys()) == set(state) and \
                all(torch.equal(f.get_tensor(k), v) for k, v in state.items())
    except (OSError, safetensors.SafetensorError):
        return False


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("ckpt", help="any checkpoint load_encoder reads")
    p.add_argument("folder", help="the folder to write (created); an export of another model "
                   "there is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the export of another model in folder (only its three files)")
    a = p.parse_args()
    with user_errors():
        export(a.ckpt, a.folder, a.overwrite)
