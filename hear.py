"""
HEAR 2021 API (hearbenchmark.com) for any checkpoint load_encoder reads: ours or the released
ATST-Frame / ATST-Clip / ASiT files.

    import hear
    model = hear.load_model("atst_frame_base.ckpt")
    scene = hear.get_scene_embeddings(audio, model)            # (n_sounds, scene_embedding_size)
    emb, ts = hear.get_timestamp_embeddings(audio, model)      # (n, T, size), (n, T) in ms

audio: (n_sounds, n_samples) at 16 kHz, on the model's device. Embeddings concatenate the
outputs of every block (the linear-evaluation features of REFERENCE.md R6); load_model(path,
layers=None) takes the last block only. Timestamps are frame centres: ATST 40 ms apart from
20 ms, ASiT 160 ms apart from 80 ms.

The suite's own runners over this module (requirements-hear.txt; README, HEAR and X-ARES):
    python hear.py embeddings --model CKPT --tasks-dir tasks     # -> embeddings/hear/<task>/
    python hear.py predictions embeddings/hear/*                 # -> test.predicted-scores.json
"""
import importlib
import importlib.util
import inspect
import json
import os
import sys
import types

import torch

from model import SAMPLE_RATE
from plumbing import UserError, user_errors
from runtime import load_encoder


def load_model(model_file_path="", layers="all", device=None, frame_pool=""):
    if not model_file_path:
        raise ValueError("hear.load_model needs the path of an ATST or ASiT checkpoint")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_encoder(model_file_path, device).pool_frames(frame_pool)
    model.hear_layers = layers
    model.timestamp_embedding_size, model.scene_embedding_size = model.dims(layers)
    return model


def _embed(audio, model):
    if torch.is_tensor(audio):  # the runner may move the audio, not the model, to the GPU
        model.to(audio.device)
    return model(audio, sample_rate=SAMPLE_RATE, layers=model.hear_layers)


def get_timestamp_embeddings(audio, model):
    e = _embed(audio, model)
    return e.frames, e.timestamps.expand(e.frames.shape[0], -1)


def get_scene_embeddings(audio, model):
    return _embed(audio, model).clip


def check_model_options(args):
    """The embeddings runner's --model-options (a JSON object of load_model's keyword
    arguments), checked here: heareval's own json.loads of it ends in a traceback, and an
    unknown key in a TypeError deep inside its Embedding class."""
    known = list(inspect.signature(load_model).parameters)[1:]  # all but the model's path
    for i, a in enumerate(args):
        if a != "--model-options" and not a.startswith("--model-options="):
            continue
        text = a.split("=", 1)[1] if "=" in a else args[i + 1] if i + 1 < len(args) else ""
        try:
            options = json.loads(text)
        except ValueError as e:
            raise UserError(f"--model-options {text!r}: not JSON ({e}); e.g. --model-options "
                            "'{\"frame_pool\": \"concat\"}'") from None
        if not isinstance(options, dict) or set(options) - set(known):
            what = f"unknown {sorted(set(options) - set(known))}" if isinstance(options, dict) \
                else "not a JSON object"
            raise UserError(f"--model-options {text!r}: {what}; it takes hear.load_model's "
                            f"options ({', '.join(known)})")


def heareval_runner(stage):
    """heareval's own runner for `stage` ('embeddings' | 'predictions'). heareval 2021.1.3 pins
    numpy 1.19.2, numba 0.48 and TensorFlow, none of which can live beside torch 2.11; its code
    runs on today's stack (requirements-hear.txt) once TensorFlow, which it imports only to tell
    a TF model from a torch one, stands in as an empty module while heareval is imported (and
    only then: other libraries must still see that it is absent), and torch.load may read the
    prediction runner's own Lightning checkpoints (they hold classes; torch >= 2.6 refuses
    those by default)."""
    stand_in = importlib.util.find_spec("tensorflow") is None
    try:
        if stage == "predictions":
            os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
            importlib.import_module("pytorch_lightning")  # before the stand-in: it probes TF
        if stand_in:
            tf = sys.modules["tensorflow"] = types.ModuleType("tensorflow")
            tf.Module = type("Module", (), {})  # no torch model is an instance of it
            tf.test = types.SimpleNamespace(is_gpu_available=lambda **k: torch.cuda.is_available())
        return importlib.import_module(f"heareval.{stage}.runner").runner
    except ImportError as e:
        raise SystemExit(f"hear.py {stage}: {e}. Install the HEAR suite with: pip install -r "
                         "requirements-hear.txt && pip install --no-deps heareval==2021.1.3")
    finally:
        if stand_in:
            sys.modules.pop("tensorflow", None)


if __name__ == "__main__":
    STAGES = ("embeddings", "predictions")
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:  # (`hear.py STAGE --help`: the runner's)
        import argparse
        ap = argparse.ArgumentParser(
            description="heareval's own runners over this module (the HEAR 2021 API): "
            "`embeddings --model CKPT --tasks-dir TASKS [--embeddings-dir DIR] [--task T] "
            "[--model-options JSON]` writes embeddings/hear/<task>/ for every task under TASKS; "
            "`predictions DIR/hear/TASK ... [--grid default|fast|faster]` trains the suite's "
            "prediction heads on them and writes test.predicted-scores.json per task.")
        ap.add_argument("stage", choices=STAGES, help="then the runner's own flags")
        ap.parse_args()  # --help, or an error naming the stages
    stage = sys.argv[1]
    args = ["hear", *sys.argv[2:]] if stage == "embeddings" else sys.argv[2:]
    with user_errors():  # a checkpoint or an option that is wrong: one line, exit 1
        check_model_options(args)
        heareval_runner(stage).main(args=args, prog_name=f"hear.py {stage}")
