"""Audio of any length as token ids: fixed windows in time order, and seamless reassembly.

A tokenizer's model quantizes one VAE latent of a fixed shape, i.e. one *window* of audio: ``F`` mel frames
(``F * hop`` samples) for a mel VAE, ``clip`` samples for a waveform VAE. A recording of any length is cut
into ``W = ceil(frames / F)`` consecutive, non-overlapping windows (the last one padded with silence, the true
length kept), and its ids are the windows' ids one after the other::

    ids[w * T : (w + 1) * T]  =  the T ids of window w, which covers mel frames [w * F, (w + 1) * F)
                                 (samples [w * F * hop, (w + 1) * F * hop)), in the model's token order

so a sequence model sees time running left to right, T ids per window. :class:`AudioIds` carries a batch of
such sequences (padded with ``PAD`` where recordings differ in length) with their true lengths.

Decoding is overlap-add: the windows are decoded as they were encoded (sequence A), and once more shifted by
half a window, each made of the second half of window w's latent and the first half of window w+1's
(sequence B, which the decoder renders continuously across the border). A and B are blended with
complementary sin^2 weights: A counts fully at window centres, B at window borders, so no border shows a
step. Mel VAEs then vocode the whole reassembled mel at once, to the exact original length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PAD = -1  # id of a position past the end of a shorter recording in a batch


@dataclass
class AudioIds:
    """Token ids of a batch of recordings of any length.

    Attributes:
        ids: (B, W_max * T) int64; row b holds ``windows[b] * T`` ids (window after window, see the module
            docstring), then ``PAD``.
        lengths: (B,) true lengths in samples at ``sample_rate`` (the tokenizer's rate).
        windows: (B,) windows per recording.
        tokens_per_window: T.
        window_samples: samples one window covers at ``sample_rate``.
        sample_rate: the tokenizer's sample rate (``Tokenizer.sample_rate``).
        source_rate: the rate the waveforms came in at; ``source_lengths`` their lengths at that rate
            (``Tokenizer.decode(ids, sample_rate=ids.source_rate)`` gives back exactly those lengths).
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    windows: torch.Tensor
    tokens_per_window: int
    window_samples: int
    sample_rate: int
    source_rate: int | None = None
    source_lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def item(self, b: int) -> torch.Tensor:
        """Recording ``b``'s ids, (windows[b] * T,), no padding."""
        return self.ids[b, : int(self.windows[b]) * self.tokens_per_window]

    def item_windows(self, b: int) -> torch.Tensor:
        """Recording ``b``'s ids as (windows[b], T)."""
        return self.item(b).view(-1, self.tokens_per_window)

    @property
    def seconds(self) -> torch.Tensor:
        return self.lengths.double() / self.sample_rate

    @classmethod
    def from_items(
        cls,
        items: list[torch.Tensor],
        lengths: list[int],
        tokens_per_window: int,
        window_samples: int,
        sample_rate: int,
        source_rate: int | None = None,
        source_lengths: list[int] | None = None,
    ) -> AudioIds:
        """Batch per-recording id sequences (each (W_i * T,) or (W_i, T)) with their lengths."""
        flat = [torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in items]
        for i, x in enumerate(flat):
            if x.numel() == 0 or x.numel() % tokens_per_window:
                raise ValueError(
                    f"audio ids #{i}: {x.numel()} ids is not a positive multiple of T={tokens_per_window}"
                )
        width = max(x.numel() for x in flat)
        ids = torch.full((len(flat), width), PAD, dtype=torch.long)
        for i, x in enumerate(flat):
            ids[i, : x.numel()] = x
        return cls(
            ids=ids,
            lengths=torch.as_tensor(lengths, dtype=torch.long),
            windows=torch.as_tensor([x.numel() // tokens_per_window for x in flat], dtype=torch.long),
            tokens_per_window=tokens_per_window,
            window_samples=window_samples,
            sample_rate=sample_rate,
            source_rate=source_rate,
            source_lengths=None if source_lengths is None else torch.as_tensor(source_lengths),
        )


def num_windows(n_steps: int, window: int) -> int:
    """Windows of ``window`` steps (frames or samples) that cover ``n_steps``: at least one."""
    return max(1, math.ceil(int(n_steps) / int(window)))


def split_windows(x_ct: torch.Tensor, window: int, pad_value: float) -> torch.Tensor:
    """(C, N) -> (W, C, window): consecutive windows along the last axis, the last one padded."""
    w = num_windows(x_ct.shape[-1], window)
    extra = w * window - x_ct.shape[-1]
    if extra:
        x_ct = torch.nn.functional.pad(x_ct, (0, extra), value=pad_value)
    return x_ct.reshape(x_ct.shape[0], w, window).permute(1, 0, 2)


def straddling_latents(z_wcl: torch.Tensor) -> torch.Tensor:
    """(W, C, L) -> (W - 1, C, L): the second half of window w's latent followed by the first of w+1's."""
    half = z_wcl.shape[-1] // 2
    return torch.cat([z_wcl[:-1, ..., half:], z_wcl[1:, ..., :half]], dim=-1)


def overlap_add(a_wct: torch.Tensor, b_wct: torch.Tensor | None, offset: int) -> torch.Tensor:
    """Blend decoded windows ``a`` (W, C, N) laid end to end with the straddling ones ``b`` (W-1, C, N),
    which start ``offset`` steps into each window, by sin^2 weights peaking at each window's centre.
    -> (C, W * N)."""
    w, c, n = a_wct.shape
    pos = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    bump = torch.sin(math.pi * pos) ** 2  # 0 at the borders of a window, 1 at its centre
    a = a_wct.float().permute(1, 0, 2).reshape(c, w * n)
    wa = bump.repeat(w)
    if b_wct is None or b_wct.shape[0] == 0:
        return a
    b = torch.zeros_like(a)
    wb = torch.zeros_like(wa)
    for k in range(b_wct.shape[0]):
        s = k * n + offset
        e = min(s + n, w * n)
        b[:, s:e] = b_wct[k, :, : e - s].float()
        wb[s:e] = bump[: e - s]
    return (a * wa + b * wb) / (wa + wb).clamp_min(1e-8)
