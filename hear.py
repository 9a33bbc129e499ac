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
"""
import torch

from model import SAMPLE_RATE
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


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(
        description="A module, not a stage: the HEAR 2021 API (load_model, "
        "get_scene_embeddings, get_timestamp_embeddings) over any checkpoint load_encoder reads. "
        "Evaluate with: python -m heareval.embeddings.runner hear --model CKPT --tasks-dir "
        "tasks").parse_args()
