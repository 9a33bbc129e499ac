"""
Shared test fixtures and helpers. The tests are one file per module (test_model.py tests
model.py, ...); test_pretrain.py runs the pre-training scripts and test_smoke.py the downstream
stages end to end on the demo data, on CPU.

    python -m pytest -q       # everything; ATST_TEST_DATA=DIR keeps the demo data between runs
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import model as M
import pretrain_asit as A
import runtime as R
from demo import make_demo

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The demo data, generated once per test session (the real generator, real WAV files)."""
    root = os.environ.get("ATST_TEST_DATA") or str(tmp_path_factory.mktemp("data"))
    make_demo(root)
    return root


def run(script, *args, data_root, nproc=0, check=True, env=None):
    """Run a stage script as a user would; returns the completed process."""
    return run_together([(script, *args)], data_root=data_root, nproc=nproc, check=check,
                        env=env)[0]


def run_together(jobs, data_root, nproc=0, check=True, env=None):
    """run() of several (script, *args) side by side (the cores of a CI machine kept busy by
    one-thread runs); their completed processes."""
    env = dict(os.environ, ATST_DATA=data_root, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               **(env or {}))
    cmds = [[sys.executable, script, *args] if not nproc else
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
             "--standalone", script, *args] for script, *args in jobs]
    procs = [subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    done = []
    for cmd, p in zip(cmds, procs):
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}\n"
                                 f"{err[-3000:]}")
    return done


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


TINY = ["--data", "demo", "--preset", "tiny", "--num_workers", "1"]


def mel_batch(B=4, T=301, seed=0):
    return torch.rand(B, 64, T, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_encoder(kind, seed=0):
    """A small ATST-Frame or ATST-Clip AudioEncoder with seeded random weights."""
    torch.manual_seed(seed)
    enc = M.Encoder(dim=64, depth=3, heads=4, drop_path=0.0, **M.KINDS[kind].encoder_args())
    return R.AudioEncoder(enc, kind).eval()


def tiny_asit(seed=0):
    """A small ASiT AudioEncoder with seeded random weights."""
    torch.manual_seed(seed)
    enc = M.Encoder(dim=32, depth=2, heads=2, drop_path=0.0, **M.KINDS["asit"].encoder_args())
    return R.AudioEncoder(enc, "asit").eval()


def asit_pair(**kw):
    """A small ASiT teacher-student module (pretrain_asit.ASiT)."""
    torch.manual_seed(0)
    return A.ASiT(dim=32, depth=2, heads=2, head_hidden=64, bottleneck=16, global_k=40,
                  local_k=24, recon_hidden=32, **kw)


def asit_inputs(B=3, T=64, seed=0):
    """(clean, corrupted, mask) of 2B crops of 128 x T, half the pixels masked to zero."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(2 * B, 128, T, generator=g)
    mask = (torch.rand(2 * B, 128, T, generator=g) < 0.5).float()
    return clean, clean * (1 - mask), mask


@pytest.fixture(scope="session")
def pretrained(data_root, tmp_path_factory):
    """Tiny ATST-Frame, ATST-Clip and ASiT pre-trained on the demo data for 24 steps (real
    runs)."""
    out = {kind: str(tmp_path_factory.mktemp(f"pre_{kind}")) for kind in ("frame", "clip",
                                                                            "asit")}
    run_together([(f"pretrain_{kind}.py", *TINY, "--max_steps", "24", "--warmup_epochs", "1",
                   "--log_every", "4", "--out_dir", path) for kind, path in out.items()],
                 data_root=data_root)
    return out

# ----------------------------------------------------------------------------------------------
# Miniature copies of the real datasets, in the layouts their authors distribute (file names,
# metadata formats, header lines, quoted label lists, commas in display names, a listed clip
# missing): what prepare.py reads. A few short clips per class, a tone per class over noise.


def _clip(path, seconds=1.0, sr=16000, freq=440.0, seed=0, channels=1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(len(t))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, np.stack([x] * channels, 1).astype(np.float32), sr, subtype="PCM_16")


def _text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _truncated(path, keep=0.4, seconds=1.0, sr=16000):
    """A clip cut short as an interrupted download leaves it (`keep` of its bytes; 0: an
    empty file); the format follows the extension (.ogg: Vorbis, else 16-bit PCM)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sr)) / sr)
    sf.write(path, x.astype(np.float32), sr,
             subtype="VORBIS" if path.endswith(".ogg") else "PCM_16")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


AS_CLASSES = [("/m/09x0r", "Speech"), ("/m/05zppz", "Male speech, man speaking"),
              ("/m/04rlf", "Music"), ("/m/0bt9lr", "Dog"), ("/m/05tny_", "Bark")]


def make_downloads(root):
    """{dataset: folder} of miniature downloads under root (deterministic)."""
    rng = np.random.default_rng(0)
    n = iter(range(10_000))
    src = {k: os.path.join(root, v) for k, v in dict(
        spcv2="speech_commands_v0.02", us8k="UrbanSound8K", vox1="voxceleb1", nsynth="nsynth",
        fsd50k="FSD50K", esc50="ESC-50-master", audioset="audioset",
        dcase2022="dcase/dataset").items()}
    # Speech Commands V2: <word>/<hash>_nohash_<k>.wav; 4 train, 1 valid, 1 test per word
    lists = {"validation_list.txt": [], "testing_list.txt": ["yes/0badf00d_nohash_0.wav"]}
    for w, word in enumerate(("yes", "no", "up", "down")):
        for k in range(6):
            rel = f"{word}/{1000 * w + k:08x}_nohash_{k % 2}.wav"
            _clip(os.path.join(src["spcv2"], rel), 1.0, 16000, 300 + 200 * w, next(n))
            if k >= 4:
                lists["validation_list.txt" if k == 4 else "testing_list.txt"].append(rel)
    _clip(os.path.join(src["spcv2"], "_background_noise_", "white_noise.wav"), 3.0)
    for f, rels in lists.items():
        _text(os.path.join(src["spcv2"], f), "".join(r + "\n" for r in rels))
    # UrbanSound8K: audio/fold<k>/<fsID>-<classID>-0-<n>.wav, metadata/UrbanSound8K.csv
    classes = {3: "dog_bark", 7: "jackhammer", 8: "siren"}
    rows = ["slice_file_name,fsID,start,end,salience,fold,classID,class"]
    for fold in range(1, 11):
        for k in range(2):
            cid = list(classes)[(fold + k) % 3]
            name = f"{100000 + 10 * fold + k}-{cid}-0-{k}.wav"
            _clip(os.path.join(src["us8k"], "audio", f"fold{fold}", name), 0.8,
                  (44100, 22050)[k], 200 * cid, next(n), channels=2 - k)
            rows.append(f"{name},{100000 + fold},0.0,0.8,1,{fold},{cid},{classes[cid]}")
    _text(os.path.join(src["us8k"], "metadata", "UrbanSound8K.csv"), "\n".join(rows) + "\n")
    # VoxCeleb1: <archive>/wav/id<spk>/<video>/<n>.wav, iden_split.txt (1 train, 2 val, 3 test)
    lines = []
    for s, spk in enumerate(("id10001", "id10002", "id10003")):
        archive = "vox1_test_wav" if s == 2 else "vox1_dev_wav"
        for k in range(6):
            rel = f"{spk}/{'1zcIwhmdeo4' if k < 3 else '7gWzIy6yIIk'}/{k % 3 + 1:05d}.wav"
            _clip(os.path.join(src["vox1"], archive, "wav", rel), 1.0, 16000, 150 + 100 * s,
                  next(n))
            lines.append(f"{1 if k < 4 else k - 2} {rel}")
    _text(os.path.join(src["vox1"], "meta", "iden_split.txt"), "\n".join(lines) + "\n")
    # NSynth: nsynth-<split>/examples.json + audio/<note>.wav; label = instrument family
    for split, per in (("train", 4), ("valid", 1), ("test", 1)):
        notes = {}
        for f, fam in enumerate(("bass", "guitar", "vocal")):
            for k in range(per):
                note = f"{fam}_acoustic_{f:03d}-{60 + k:03d}-{100 if split == 'train' else 75}"
                notes[note] = dict(note_str=note, instrument_family=f, instrument_family_str=fam,
                                   instrument_source=0, instrument_source_str="acoustic",
                                   pitch=60 + k, velocity=100, qualities=[0] * 10)
                _clip(os.path.join(src["nsynth"], f"nsynth-{split}", "audio", f"{note}.wav"),
                      1.0, 16000, 110 * (f + 1), next(n))
        if split == "train":  # a WAV cut short: its header gives more frames than it holds
            note = "bass_electronic_000-072-100"
            notes[note] = dict(notes["bass_acoustic_000-060-100"], note_str=note, pitch=72)
            _truncated(os.path.join(src["nsynth"], "nsynth-train", "audio", f"{note}.wav"), 0.5)
        _text(os.path.join(src["nsynth"], f"nsynth-{split}", "examples.json"), json.dumps(notes))
    # FSD50K: FSD50K.{dev,eval}_audio/<fname>.wav, ground truth with quoted label lists
    vocab = [("Bark", "/m/05tny_"), ("Dog", "/m/0bt9lr"), ("Music", "/m/04rlf"),
             ("Speech", "/m/09x0r"), ("Cat", "/m/01yrx")]  # no clip is a cat: 5 classes, 4 used
    _text(os.path.join(src["fsd50k"], "FSD50K.ground_truth", "vocabulary.csv"),
          "".join(f"{i},{lab},{mid}\n" for i, (lab, mid) in enumerate(vocab)))
    for part, count in (("dev", 16), ("eval", 4)):
        rows = ["fname,labels,mids" + (",split" if part == "dev" else "")]
        for k in range(count):
            picked = [vocab[k % 4]] + ([vocab[(k + 1) % 4]] if k % 3 == 0 else [])
            fname = 30000 * (part == "eval") + 1000 + k
            _clip(os.path.join(src["fsd50k"], f"FSD50K.{part}_audio", f"{fname}.wav"), 1.0,
                  44100, 300 + 150 * (k % 4), next(n))
            labels, mids = (",".join(x[i] for x in picked) for i in (0, 1))
            rows.append(f'{fname},"{labels}","{mids}"' +
                        (f",{'val' if k >= 12 else 'train'}" if part == "dev" else ""))
        _text(os.path.join(src["fsd50k"], "FSD50K.ground_truth", f"{part}.csv"),
              "\n".join(rows) + "\n")
    # ESC-50: audio/<fold>-<src>-<take>-<target>.wav, meta/esc50.csv
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, cat in enumerate(("dog", "rooster", "pig")):
            name = f"{fold}-{100032 + 10 * fold + target}-A-{target}.wav"
            _clip(os.path.join(src["esc50"], "audio", name), 1.0, 44100, 250 + 250 * target,
                  next(n))
            rows.append(f"{name},{fold},{target},{cat},{target == 0},{100032 + fold},A")
    _text(os.path.join(src["esc50"], "meta", "esc50.csv"), "\n".join(rows) + "\n")
    # AudioSet: the official CSVs (3 '#' lines, ', '-separated, quoted MIDs) in metadata/;
    # clips named as download tools name them, in nested folders, any format and rate
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    ytid = lambda: "".join(rng.choice(list(alphabet), 11))
    _text(os.path.join(src["audioset"], "metadata", "class_labels_indices.csv"),
          "index,mid,display_name\n" + "".join(f'{i},{mid},"{name}"\n'
                                                for i, (mid, name) in enumerate(AS_CLASSES)))
    names = {"balanced_train_segments": (11, lambda y: f"balanced/Y{y}.wav"),
             "unbalanced_train_segments": (25, lambda y: f"unbal/part0{int(y[1] < 'a')}/{y}_30000_"
                                                         "40000.flac"),
             "eval_segments": (6, lambda y: f"eval/{y}.wav" if y[0] < "a" else
                               f"eval/{y}_30.000.wav")}
    for part, (count, path) in names.items():
        lines = ["# Segments csv created Sun Mar  5 10:54:31 2017",
                 f"# num_ytids={count}, num_segs={count}, num_unique_labels=5, "
                 "num_positive_labels=20", "# YTID, start_seconds, end_seconds, positive_labels"]
        for k in range(count):
            y = ("--PJHxphWEs", "Y0AW_wRJk3c")[k] if part == "eval_segments" and k < 2 else ytid()
            mids = [AS_CLASSES[k % 5][0]] + ([AS_CLASSES[1][0]] if k % 5 == 0 else [])
            lines.append(f'{y}, 30.000, 40.000, "{",".join(mids)}"')
            if k < count - 1 or part == "eval_segments":  # the last one was never downloaded
                _clip(os.path.join(src["audioset"], "audio", path(y)), 1.0,
                      (44100, 48000)[k % 2], 200 + 100 * (k % 5), next(n), channels=1 + k % 2)
        if part == "unbalanced_train_segments":  # a scraped copy's cut-short Ogg, empty file
            for y, keep in (("0TruncOgg00", 0.4), ("0EmptyClip0", 0)):
                lines.append(f'{y}, 30.000, 40.000, "{AS_CLASSES[2][0]}"')
                _truncated(os.path.join(src["audioset"], "audio", "unbal", "part00",
                                        f"{y}_30000_40000.{'ogg' if keep else 'wav'}"), keep)
        _text(os.path.join(src["audioset"], "metadata", f"{part}.csv"), "\n".join(lines) + "\n")
    _clip(os.path.join(src["audioset"], "audio", "notes.wav"))            # named by no CSV
    # DESED (DCASE 2022 task 4) as generate_dcase_task4_2022.py lays it out; 2 s clips
    d, events = src["dcase2022"], ("Alarm_bell_ringing", "Dog", "Speech")
    strong = ["filename\tonset\toffset\tevent_label"]
    for k in range(13):
        strong += [f"{k}.wav\t{0.2 + j / 10:.1f}\t{1.0 + 3 * j / 10:.1f}\t{events[(k + j) % 3]}"
                   for j in range(2)]
        for folder, sr in (("soundscapes", 44100), ("soundscapes_16k", 16000)):
            path = os.path.join(d, "audio/train/synthetic21_train", folder, f"{k}.wav")
            if k == 9 and sr == 16000:            # _16k stopped as it wrote 9.wav
                _truncated(path, 0.5, 2.0, sr)
            elif k < (12 if sr == 44100 else 10):  # 12.wav is missing
                _clip(path, 2.0, sr, 300 + 100 * (k % 3), next(n))
    _text(os.path.join(d, "metadata/train/synthetic21_train/soundscapes.tsv"),
          "\n".join(strong) + "\n")
    weak = ["filename\tevent_labels"]
    for k in range(10):
        name = f"Y{ytid()}_{10 * k:.3f}_{10 * k + 10:.3f}.wav"
        weak.append(f"{name}\t{events[k % 3]}" + (f",{events[(k + 1) % 3]}" if k % 2 else ""))
        _clip(os.path.join(d, "audio/train/weak", name), 2.0, 44100, 200 + 100 * (k % 3),
              next(n))
    _text(os.path.join(d, "metadata/train/weak.tsv"), "\n".join(weak) + "\n")
    val, dur = ["filename\tonset\toffset\tevent_label"], ["filename\tduration"]
    for k in range(6):
        name = f"Y{ytid()}_{30 + k:.3f}_{40 + k:.3f}.wav"
        val.append(f"{name}\t0.3\t1.5\t{events[k % 3]}")
        dur.append(f"{name}\t2.0")
        for folder, sr in (("validation", 44100), ("validation_16k", 16000)):
            _clip(os.path.join(d, "audio/validation", folder, name), 2.0, sr,
                  300 + 100 * (k % 3), next(n))
    _text(os.path.join(d, "metadata/validation/validation.tsv"), "\n".join(val) + "\n")
    _text(os.path.join(d, "metadata/validation/validation_durations.tsv"),
          "\n".join(dur) + "\n")
    return src


@pytest.fixture(scope="session")
def downloads(tmp_path_factory):
    return make_downloads(str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="session")
def prepared(downloads, tmp_path_factory):
    """(data root, {dataset: seconds}): prepare.py's function run on every miniature download
    (test_prepare.py runs the command line too)."""
    import prepare
    root, times = str(tmp_path_factory.mktemp("prepared")), {}
    for name, src in downloads.items():
        t0 = time.time()
        prepare.prepare(name, src, root)
        times[name] = round(time.time() - t0, 3)
    print(f"prepare.py on the miniatures, seconds: {times}")
    return root, times


def _official(enc, kind):
    """Our encoder's weights renamed to the released layout (R9)."""
    inverse = {v: k for k, v in R.OFFICIAL_NAMES.items()}
    if kind == "clip":  # ATST-Clip keeps `norm`
        inverse = {k: v for k, v in inverse.items() if not k.startswith("norm")}
    return {inverse.get(k, k): v.clone() for k, v in enc.state_dict().items()}


def released_layouts(enc, kind):
    """(name, checkpoint) of our encoder's weights in every released ATST layout (R9)."""
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


def asit_release(ae):
    """An ASiT AudioEncoder's weights in the released file's layout (REFERENCE.md R18):
    `model.` names and a Conv2d(1, D, 16, 16) patch embedding."""
    sd = {f"model.{k}": v.clone() for k, v in ae.encoder.state_dict().items()}
    w = sd.pop("model.patch_embed.weight")
    sd["model.patch_embed.proj.weight"] = w.view(w.shape[0], 1, 16, 16)
    sd["model.patch_embed.proj.bias"] = sd.pop("model.patch_embed.bias")
    return sd
