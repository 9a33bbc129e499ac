"""augment.py: masking statistics, augmentations, waveform crops, Mixup with labels."""
import numpy as np
import torch
import torch.nn.functional as F

from augment import (FreqWarp, Mixup, RandomResizedCrop, gmml, group_mask, mixup_labels,
                     random_crops, resample_boxes, roll_shifts)
from conftest import mel_batch


def _runs(row):
    runs, r = [], 0
    for v in row.tolist() + [False]:
        if v:
            r += 1
        elif r:
            runs.append(r)
            r = 0
    return runs


def test_group_mask_statistics():
    """Over many draws at N=250: masked fraction 0.50 +- 0.02 (R4: mean 50.3%), every
    masked run at least 5 tokens, and per-clip fractions in the expected ~38-61% band."""
    g = torch.Generator().manual_seed(0)
    m = group_mask(torch.full((4000,), 250), 250, span=5, prob=0.65, generator=g)
    frac = m.float().mean(1)
    assert abs(frac.mean().item() - 0.50) < 0.02
    assert 0.30 < frac.min().item() and frac.max().item() < 0.70
    assert min(r for row in m[:300] for r in _runs(row)) >= 5
    assert not m[:, -1].any()  # starts are drawn from [0, N - 5): the last token never masks


def test_group_mask_respects_valid_lengths_and_random_mode():
    g = torch.Generator().manual_seed(1)
    n_valid = torch.tensor([250, 100, 30])
    m = group_mask(n_valid, 250, generator=g)
    for i, n in enumerate(n_valid.tolist()):
        assert not m[i, n:].any() and m[i, :n].any()
    r = group_mask(torch.full((2000,), 250), 250, span=1, prob=0.5, generator=g)
    assert abs(r.float().mean().item() - 0.5) < 0.02
    assert sum(x == 1 for row in r[:50] for x in _runs(row)) > 100  # isolated tokens occur


def test_augmentations_keep_shape_and_change_content():
    x = mel_batch()
    g = torch.Generator().manual_seed(0)
    mix = Mixup(bank_size=8)
    assert torch.equal(mix(x, g), x)  # empty bank: nothing to mix yet
    mix.push(mel_batch(seed=1))
    for aug in (mix, RandomResizedCrop(), FreqWarp("paper")):
        y = aug(x, g)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert (y - x).abs().mean() > 1e-3, aug
    # the 'code' rule leaves about 56% of clips unchanged (h >= F), the rest are warped
    y = FreqWarp("code")(mel_batch(B=400), torch.Generator().manual_seed(0))
    same = ((y - mel_batch(B=400)).abs().amax((1, 2)) < 1e-4).float().mean().item()
    assert 0.45 < same < 0.67


def test_augmentations_are_reproducible_from_the_generator():
    x = mel_batch()
    for aug in (RandomResizedCrop(), FreqWarp()):
        a = aug(x, torch.Generator().manual_seed(5))
        b = aug(x, torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


def test_resample_box_identity_and_interpolate_equivalence():
    """The identity box returns the input; an interior box equals BYOL-A's crop followed by
    F.interpolate(bicubic, align_corners=True) away from the crop border."""
    x = mel_batch(B=2, T=101)
    B = x.shape[0]
    full = lambda v: torch.full((B,), float(v))
    assert torch.allclose(resample_boxes(x, full(0), full(64), full(0), full(101)), x, atol=1e-4)
    ref = F.interpolate(x[:, None, 5:45, 10:70], size=(64, 101), mode="bicubic",
                        align_corners=True)[:, 0]
    y = resample_boxes(x, full(5), full(40), full(10), full(60))
    assert torch.allclose(y[:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-4)


def test_freq_warp_leaves_time_alone_and_mixup_stays_between():
    t = torch.linspace(-1, 1, 200)
    x = t.view(1, 1, -1).expand(16, 64, -1).contiguous()  # depends on time only
    assert torch.allclose(FreqWarp("paper")(x, torch.Generator().manual_seed(0)), x, atol=1e-4)
    a, z = mel_batch(B=64), mel_batch(B=1, seed=3).bfloat16().float()  # the bank holds bf16
    mix = Mixup(bank_size=4)
    mix.push(z)
    y = mix(a, torch.Generator().manual_seed(0))  # log-mean-exp lies between its inputs
    assert (y >= torch.minimum(a, z) - 1e-5).all() and (y <= torch.maximum(a, z) + 1e-5).all()
    assert (y - a).abs().amax((1, 2)).max() > 0.05


def test_mixup_bank_is_a_fifo_and_round_trips():
    mix = Mixup(bank_size=3)
    for v in range(5):
        mix.push(torch.full((1, 2, 4), float(v) / 10))
    assert sorted(round(x, 2) for x in mix.bank[:, 0, 0].float().tolist()) == [0.2, 0.3, 0.4]
    other = Mixup(bank_size=3)
    other.load_state_dict(mix.state_dict())
    assert torch.equal(other.bank, mix.bank) and int(other.count) == other.seen == 5
    x = torch.zeros(2, 2, 4)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(other(x, g()), mix(x, g())) and not torch.equal(other(x, g()), x)


def test_random_crops_lie_inside_the_real_audio():
    """Waveform segments (ATST-Clip, R4 / the reference's RandomCrop): a crop starts inside
    the clip's real audio, never in the zero padding of a short clip; a clip shorter than the
    segment is taken from its start and padded with zeros."""
    S, n = 1000, 200
    x = torch.arange(1.0, S + 1).expand(6, S).clone()        # value = 1 + sample index
    valid = torch.tensor([1000, 700, 300, 200, 150, 10])
    x[torch.arange(S) >= valid[:, None]] = 0                # zero padding past the real audio
    for seed in range(50):
        y = random_crops(x, n, valid, torch.Generator().manual_seed(seed))
        assert y.shape == (6, n)
        for i, v in enumerate(valid.tolist()):
            real = y[i][y[i] > 0]
            assert (real.diff() == 1).all()                  # one contiguous segment
            assert real.numel() == min(n, v)                 # as much real audio as there is
            assert y[i, :real.numel()].equal(real)           # padding only after the audio
    starts = torch.stack([random_crops(x, n, valid, torch.Generator().manual_seed(s))[1, 0]
                          for s in range(400)])
    assert starts.min() >= 1 and starts.max() <= 501          # starts in [0, 700 - 200]
    assert starts.min() < 20 and starts.max() > 480           # ... spread over all of it
    mel = torch.arange(20.0).view(1, 1, 20).expand(3, 2, 20)  # any leading shape
    assert random_crops(mel, 6, g=torch.Generator().manual_seed(0)).shape == (3, 2, 6)


def test_mixup_labels_mixes_inputs_and_targets_alike():
    x = torch.randn(64, 3, 5)
    y = torch.nn.functional.one_hot(torch.arange(64) % 4, 4).float()
    xm, ym = mixup_labels(x, y, 0.5, np.random.default_rng(0))
    assert torch.allclose(ym.sum(1), torch.ones(64))        # mixed one-hots stay distributions
    rng = np.random.default_rng(0)                           # R6: partner, then lambda
    perm = torch.from_numpy(rng.permutation(64))
    lam = torch.from_numpy(rng.beta(0.5, 0.5, 64)).float()
    want = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[perm]
    assert torch.allclose(xm, want, atol=1e-6)
    assert torch.allclose(ym, lam[:, None] * y + (1 - lam[:, None]) * y[perm], atol=1e-6)
    again = mixup_labels(x, y, 0.5, np.random.default_rng(0))
    assert torch.equal(again[0], xm) and torch.equal(again[1], ym)
    assert lam.min() < 0.1 and lam.max() > 0.9                # Beta(0.5, 0.5) is U-shaped


def test_gmml_statistics_and_branches():
    """R13 on 592 x 128: the zeros branch covers U(0.5, 0.7) of the pixels and a bit
    more (the last rectangle overshoots: mean 0.606 measured on the reference), covered pixels
    exactly 0; the replace branch covers at least 0.30 (mean 0.314), its pixels are the clean
    pixels of one donor clip at the same place; nothing else changes; a branch is taken half
    the time; coverage never falls below the drawn target."""
    g = torch.Generator().manual_seed(0)
    f, t = torch.arange(128.0)[:, None], torch.arange(592.0)
    x = torch.arange(1.0, 65)[:, None, None] * 1e6 + f * 1000 + t   # clip, mel bin, frame
    zeros, pasted = [], []
    for _ in range(4):
        y, m = gmml(x, g)
        keep = ~m.bool()
        assert torch.equal(y[keep], x[keep]) and set(m.unique().tolist()) <= {0.0, 1.0}
        for i in range(64):
            vals = (y[i] - f * 1000 - t)[m[i].bool()]           # donor * 1e6 where pasted
            share = m[i].mean().item()
            if y[i][m[i].bool()].eq(0).all():
                zeros.append(share)
            else:
                assert (vals == vals[0]).all() and vals[0] % 1e6 == 0   # one donor, in place
                pasted.append(share)
    zeros, pasted = torch.tensor(zeros), torch.tensor(pasted)
    assert abs(zeros.mean() - 0.606) < 0.02 and zeros.min() >= 0.5 and zeros.max() < 0.79
    assert 0.03 < zeros.std() < 0.08
    assert pasted.min() >= 0.30 and abs(pasted.mean() - 0.314) < 0.01
    fixed = gmml(x, g, p_replace=0.0, zeros=(0.6, 0.6))[1].mean((1, 2))
    assert fixed.min() >= 0.6 and fixed.max() < 0.6 + 0.09     # one rectangle at most over
    branch = [gmml(torch.arange(1.0, 513)[:, None, None].expand(512, 16, 32), g)[0]
              for _ in range(2)]
    replaced = torch.cat([(b == 0).sum((1, 2)) == 0 for b in branch]).float().mean()
    assert abs(replaced - 0.5) < 0.05


def test_gmml_rectangles_are_within_a_third_of_each_axis():
    """With a tiny target one rectangle is kept: a solid box, 1 to 0.3 x 592 - 1 frames long
    and 1 to 0.3 x 128 - 1 mel bins wide; align=16 puts its corners on the patch grid."""
    g = torch.Generator().manual_seed(1)
    x = torch.ones(256, 128, 592)
    for align in (1, 16):
        _, m = gmml(x, g, p_replace=0.0, zeros=(1e-9, 1e-9), align=align)
        rows, cols = m.amax(2), m.amax(1)                        # (B, F), (B, T)
        h, w = cols.sum(1), rows.sum(1)
        assert torch.equal(m.sum((1, 2)), h * w)                  # a solid rectangle
        assert h.min() >= align and h.max() <= 176 and w.min() >= align and w.max() <= 37
        if align == 1:
            assert h.max() > 150 and w.max() > 30
        else:
            first_t = cols.argmax(1)
            assert (first_t % 16 == 0).all() and (rows.argmax(1) % 16 == 0).all()


def test_roll_then_crop_rotates_the_real_audio_only():
    """ASiT rolls a clip's real audio circularly (p = 0.5, offset uniform in [0, valid]) before
    cropping; the zero padding stays after the audio."""
    wav = torch.arange(1.0, 11).expand(400, 10).clone()
    valid = torch.tensor([10, 6] * 200)
    wav[1::2, 6:] = 0
    g = torch.Generator().manual_seed(0)
    shift = roll_shifts(valid, g, p=0.5)
    y = random_crops(wav, 10, valid, g, shift)                   # the whole clip: no crop
    rolled = 0
    for i in range(400):
        v, s = valid[i].item(), shift[i].item()
        assert 0 <= s <= v
        assert torch.equal(y[i, :v], torch.roll(wav[i, :v], s)) and torch.equal(y[i, v:],
                                                                                wav[i, v:])
        rolled += not torch.equal(y[i], wav[i])
    # p = 0.5, and a shift of 0 or `valid` (of valid + 1 equally likely) changes nothing
    assert abs(rolled / 400 - 0.5 * (9 / 11 + 5 / 7) / 2) < 0.07
    z = random_crops(wav, 4, valid, torch.Generator().manual_seed(1), shift)
    for i in range(400):                                         # a crop of the rolled clip
        rolled_clip = torch.cat([torch.roll(wav[i, :valid[i]], shift[i].item()),
                                 wav[i, valid[i]:]])
        assert any(torch.equal(z[i], rolled_clip[k:k + 4]) for k in range(valid[i] - 3))
