"""
An X-ARES encoder (github.com/jimbozhang/xares, `pip install xares`) for any checkpoint
load_encoder reads: ours, the released ATST-Frame / ATST-Clip / ASiT files, or an exported
folder. X-ARES feeds (B, T) 16 kHz audio of any length and reads (B, T', D) frames, with the
`sampling_rate`, `output_dim` and `hop_size_in_ms` attributes; the runtime chunks long inputs
(minutes) and keeps every frame. X-ARES's own audio_encoder_checker passes for every kind
(test_runtime.py).

    from xares_encoder import AtstEncoder
    encoder = AtstEncoder("atstframe_base.ckpt")                    # 40 ms frames, 768 wide
    encoder = AtstEncoder("ASIT_ssl.pt", frame_pool="concat")       # 160 ms, 8 band tokens
"""
import torch

from model import SAMPLE_RATE
from runtime import load_encoder


class AtstEncoder(torch.nn.Module):
    """layers: None (the last block), "all" or block indices, concatenated per frame;
    frame_pool: ASiT's band tokens averaged ('' / mean) or side by side (concat)."""

    def __init__(self, ckpt, layers=None, frame_pool="", device=None):
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.ae = load_encoder(ckpt, device).pool_frames(frame_pool)
        self.layers = layers
        self.sampling_rate = SAMPLE_RATE
        self.output_dim = self.ae.dims(layers)[0]
        self.hop_size_in_ms = self.ae.frame_s * 1000

    @torch.no_grad()
    def forward(self, audio):
        """(B, T) or (T,) audio at 16 kHz -> (B, T', output_dim) frames, on audio's device."""
        e = self.ae(audio, SAMPLE_RATE, layers=self.layers)
        return e.frames.to(audio.device if torch.is_tensor(audio) else "cpu")
