"""hear.py: the HEAR 2021 API as heareval calls it, and heareval's own runners (embeddings, then
the prediction heads and their scores) on two tiny tasks written in HEAR's task format."""
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf
import torch

import model as M
import runtime as R
from plumbing import UserError
from conftest import asit_release, released_layouts, run, tiny_asit

SR = 16000


def test_hear_api_as_the_runner_calls_it(tmp_path):
    import hear
    enc = M.Encoder(dim=128, depth=2, heads=2, mask_token=True)
    _, ck = next(released_layouts(enc, "frame"))
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


def test_hear_api_on_asit(tmp_path):
    """hear.py serves ASiT like ATST: 160 ms timestamps from 80 ms, [CLS, mean] scenes."""
    import hear
    torch.manual_seed(0)     # a release holds no head count: load_encoder takes dim // 64
    ae = R.AudioEncoder(M.Encoder(dim=128, depth=2, heads=2, drop_path=0.0, cls_token=True,
                                  tokens="patch16", qkv_bias=True, max_tokens=296), "asit").eval()
    torch.save(asit_release(ae), tmp_path / "asit.pt")
    model = hear.load_model(str(tmp_path / "asit.pt"), device="cpu")
    assert model.timestamp_embedding_size == 2 * 128 and model.scene_embedding_size == 4 * 128
    audio = torch.rand(3, 2 * 16000) * 0.2 - 0.1
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.shape == (3, 12, 256) and (ts.diff(dim=1) == 160).all() and (ts[:, 0] == 80).all()
    torch.testing.assert_close(emb[0], ae(audio[:1], 16000, layers="all").frames[0])
    assert hear.get_scene_embeddings(audio, model).shape == (3, 512)


def test_bad_model_options_name_the_flag(tmp_path, data_root):
    """--model-options (heareval's runner json.loads it: a traceback; an unknown key: a
    TypeError inside its Embedding class) is checked first: one line naming the flag and what
    it takes, exit 1."""
    import hear
    for text, said in (("{frame_pool: concat}", "not JSON"),
                       ('["concat"]', "not a JSON object; it takes hear.load_model's options"),
                       ('{"pool": "concat"}', r"unknown \['pool'\]; it takes hear.load_model's "
                                              r"options \(layers, device, frame_pool\)")):
        for args in (["--model-options", text], [f"--model-options={text}"]):
            with pytest.raises(UserError, match=f"--model-options '{re.escape(text)}': {said}"):
                hear.check_model_options(["hear", "--model", "x.ckpt", *args])
    hear.check_model_options(["hear", "--model-options", '{"frame_pool": "concat"}'])
    (tmp_path / "tasks").mkdir()
    torch.save(asit_release(tiny_asit()), tmp_path / "asit.pt")
    p = run("hear.py", "embeddings", "--model", str(tmp_path / "asit.pt"), "--tasks-dir",
            str(tmp_path / "tasks"), "--model-options", "{frame_pool: concat}",
            data_root=data_root, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith(
        "error: --model-options '{frame_pool: concat}': not JSON (Expecting property name")


def _tone(seconds, rng, events=()):
    """Noise with a tone per (start s, end s, Hz): what tells the classes apart."""
    t = np.arange(int(seconds * SR)) / SR
    x = 0.02 * rng.standard_normal(len(t))
    for start, end, hz in events:
        on = (t >= start) & (t < end)
        x[on] += 0.3 * np.sin(2 * np.pi * hz * t[on])
    return x.astype(np.float32)


def make_hear_tasks(root, seed=0):
    """Two tasks as hear-preprocess writes them: task_metadata.json, labelvocabulary.csv, one
    JSON per split (file -> labels; events as label / start / end in ms) and 16 kHz audio under
    16000/<split>/. A scene task in three folds (multiclass, top-1 accuracy) and an event task
    in train / valid / test (multilabel, onset F-measure and segment error rate)."""
    rng = np.random.default_rng(seed)
    tones = {"low": 300.0, "mid": 1200.0, "high": 4000.0}

    def task(name, meta, splits, labels):
        d = os.path.join(root, name)
        os.makedirs(d)
        meta = dict(task_name=name, version="tiny", mode="full", default_mode="full",
                    splits=list(splits), **meta)
        json.dump(meta, open(os.path.join(d, "task_metadata.json"), "w"), indent=2)
        with open(os.path.join(d, "labelvocabulary.csv"), "w") as f:
            f.write("idx,label\n" + "".join(f"{i},{c}\n" for i, c in enumerate(labels)))
        for split, items in splits.items():
            os.makedirs(os.path.join(d, str(SR), split))
            for fname, (audio, _) in items.items():
                sf.write(os.path.join(d, str(SR), split, fname), audio, SR, subtype="PCM_16")
            json.dump({f: lab for f, (_, lab) in items.items()},
                      open(os.path.join(d, f"{split}.json"), "w"))

    folds = {f"fold{k:02d}": {f"{c}_{k}_{i}.wav": (_tone(1.0, rng, [(0, 1, hz)]), [c])
                              for c, hz in tones.items() for i in range(6)} for k in range(3)}
    task("tiny_scene", dict(embedding_type="scene", prediction_type="multiclass",
                            split_mode="new_split_kfold", nfolds=3, sample_duration=1.0,
                            evaluation=["top1_acc"], evaluation_params=dict(
                                # one fold (18 clips) trains: one step per epoch, so 30
                                task_specific_param_grid=dict(lr=[3.2e-3], max_epochs=[30],
                                                              patience=[30]))),
         folds, list(tones))

    def clip(i):
        events = []
        for c, hz in list(tones.items())[:2]:
            start = float(rng.uniform(0.2, 2.0))
            end = start + float(rng.uniform(0.5, 1.5))
            events.append((start, end, hz))
        labels = [dict(label=c, start=1000 * s, end=1000 * e)
                  for c, (s, e, _) in zip(tones, events)]
        return f"clip_{i}.wav", (_tone(4.0, rng, events), labels)
    splits = {s: dict(clip(f"{s}{i}") for i in range(n))
              for s, n in (("train", 24), ("valid", 8), ("test", 8))}
    task("tiny_events", dict(embedding_type="event", prediction_type="multilabel",
                             split_mode="trainvaltest", sample_duration=4.0,
                             evaluation=["event_onset_200ms_fms", "segment_1s_er"]),
         splits, list(tones)[:2])


def test_heareval_runners_score_the_tiny_tasks(tmp_path, data_root):
    """The README's two commands: heareval's embedding runner over hear.py (its Embedding
    class, batching, label alignment and memmaps), then its prediction runner (grid search,
    k-fold, sed_eval), give a test score per task, and both are far above chance: the embeddings
    reach the runner in the order of their labels. ASiT's concatenated frames through
    --model-options are 8 times wider."""
    tasks, emb = tmp_path / "tasks", tmp_path / "embeddings"
    make_hear_tasks(str(tasks))
    torch.manual_seed(0)
    enc = M.Encoder(dim=64, depth=2, heads=2, drop_path=0.0, **M.KINDS["frame"].encoder_args())
    _, ck = next(released_layouts(enc, "frame"))
    torch.save(ck, tmp_path / "frame.ckpt")
    torch.save(asit_release(tiny_asit()), tmp_path / "asit.pt")
    run("hear.py", "embeddings", "--model", str(tmp_path / "frame.ckpt"), "--tasks-dir",
        str(tasks), "--embeddings-dir", str(emb), data_root=data_root)
    run("hear.py", "embeddings", "--model", str(tmp_path / "asit.pt"), "--tasks-dir",
        str(tasks), "--task", "tiny_events", "--embeddings-dir", str(emb), "--model-options",
        '{"frame_pool": "concat"}', data_root=data_root)
    dims = {d: json.load(open(emb / d / "tiny_events" / "test.embedding-dimensions.json"))
            for d in ("hear", "hear-frame-pool=concat")}
    assert dims["hear"] == [8 * 100, 2 * 64]  # 8 clips of 4 s, 40 ms frames, 2 blocks
    # ASiT: 24 columns of 16 x 10 ms in 398 mel frames, 8 band tokens of 32 side by side
    assert dims["hear-frame-pool=concat"] == [8 * 24, 2 * 8 * 32]
    p = run("hear.py", "predictions", str(emb / "hear" / "tiny_scene"),
            str(emb / "hear" / "tiny_events"), "--grid", "faster", "--grid-points", "1",
            data_root=data_root)
    scene = json.load(open(emb / "hear" / "tiny_scene" / "test.predicted-scores.json"))
    events = json.load(open(emb / "hear" / "tiny_events" / "test.predicted-scores.json"))
    assert set(scene) >= {"fold00", "fold01", "fold02", "aggregated_scores"}, p.stdout[-2000:]
    assert scene["aggregated_scores"]["test_top1_acc_mean"] > 0.8  # 3 classes: chance is 1/3
    assert events["test"]["test_event_onset_200ms_fms"] > 0.5
    assert events["test"]["test_segment_1s_er"] < 0.5
    p = run("hear.py", data_root=data_root, check=False)
    assert p.returncode == 2 and "the following arguments are required: stage" in p.stderr

