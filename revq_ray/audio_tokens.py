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
from typing import Any

import numpy as np
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


def as_wave_list(inputs: Any) -> list[torch.Tensor]:
    """Waveforms as given ((L,), (B, L), arrays, or lists of them) -> a list of float (L_i,) tensors."""
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(np.ascontiguousarray(inputs))
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim == 1:
            return [inputs.float()]
        if inputs.ndim == 2:
            return [w.float() for w in inputs]
        raise ValueError(f"waveforms: expected (L,) or (B, L); got {tuple(inputs.shape)}")
    if isinstance(inputs, list | tuple):
        out = []
        for item in inputs:
            out.extend(as_wave_list(item))
        return out
    raise TypeError(f"waveforms: unsupported input type {type(inputs).__name__}")


class AudioCodec:
    """The audio side of a :class:`~revq_ray.tokenizer.Tokenizer`: recordings of any length <-> AudioIds.

    The Tokenizer quantizes one VAE input (one window); this class cuts recordings into windows, hands them to
    the Tokenizer, and decodes ids back by overlap-add and (mel VAEs) the vocoder.

    Args:
        tok: the Tokenizer it serves: anything with ``vae``, ``tokens``, ``device``,
            ``encode_inputs(x, batch_size)`` (VAE inputs -> ids) and ``decode_latents(ids_bt)``.
        vocoder: mel VAEs: the vocoder spec; None = the VAE's own (griffin-lim unless it names vocos).
    """

    def __init__(self, tok: Any, vocoder: str | None = None):
        self.tok = tok
        self.vocoder_override = vocoder
        self._vocoder: Any = None

    # ----------------------------------------------------------------------------------------- sizes
    @property
    def vae(self) -> Any:
        return self.tok.vae

    @property
    def input_kind(self) -> str:
        """``"mel"`` (a mel VAE: windows of F frames) or ``"waveform"`` (windows of ``clip`` samples)."""
        return str(getattr(self.vae, "input_kind", "mel"))

    @property
    def sample_rate(self) -> int | None:
        fe = getattr(self.vae, "front_end", None)
        if fe is not None:
            return int(fe.sample_rate)
        sr = getattr(self.vae, "sample_rate", None)
        return int(sr) if sr else None

    @property
    def clip_samples(self) -> int:
        """The waveform length (samples) whose mel is exactly one window (``(F - 1) * hop`` for a mel VAE: a
        centered STFT gives ``1 + n // hop`` frames)."""
        if self.input_kind == "mel":
            return (int(self.vae.input_shape[-1]) - 1) * int(self.vae.front_end.hop)
        return int(self.vae.input_shape[-1])

    @property
    def window_samples(self) -> int:
        """How far one window of T ids reaches in time, in samples (``F * hop`` for a mel VAE)."""
        if self.input_kind == "mel":
            return int(self.vae.input_shape[-1]) * int(self.vae.front_end.hop)
        return int(self.vae.input_shape[-1])

    def num_windows(self, n_samples: int) -> int:
        """Windows (of T ids each) that a recording of ``n_samples`` at ``sample_rate`` takes."""
        if self.input_kind == "mel":
            return num_windows(self.vae.front_end.num_frames(n_samples), int(self.vae.input_shape[-1]))
        return num_windows(n_samples, int(self.vae.input_shape[-1]))

    def use_vocoder(self, spec: str | None) -> None:
        """Decode mels with the vocoder ``spec`` from now on (None: the VAE's own)."""
        if spec != self.vocoder_override:
            self.vocoder_override, self._vocoder = spec, None

    @property
    def vocoder(self) -> Any:
        """Mel VAEs: the vocoder (``griffin-lim`` unless the VAE or ``vocoder=`` names ``vocos:...``)."""
        if self._vocoder is None:
            from revq_ray.vae.vocoder import load_vocoder

            spec = self.vocoder_override or getattr(self.vae, "vocoder_spec", None)
            self._vocoder = load_vocoder(spec, self.tok.device)
            check = getattr(self._vocoder, "check", None)
            if check is not None:
                check(self.vae.front_end)
        return self._vocoder

    # ----------------------------------------------------------------------------------------- encode
    def windows(
        self, inputs: Any, sample_rate: int | None
    ) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """Waveforms -> (per recording its windows (W_i, *input_shape), lengths at ``self.sample_rate``,
        lengths as given). Mel VAEs take the mel of the whole recording, then cut it into windows of F
        frames, so a window's frames are those the long recording has there."""
        import torchaudio

        if sample_rate is None:
            raise ValueError(
                "audio tokenizer: pass sample_rate= with the waveforms (their sampling rate in Hz)"
            )
        windows, lengths, source_lengths = [], [], []
        for w in as_wave_list(inputs):
            if w.numel() == 0:
                raise ValueError("audio tokenizer: an empty waveform (0 samples) has no tokens")
            source_lengths.append(int(w.numel()))
            if int(sample_rate) != self.sample_rate:
                w = torchaudio.functional.resample(w, int(sample_rate), int(self.sample_rate))
            lengths.append(int(w.numel()))
            if self.input_kind == "mel":
                fe = self.vae.front_end
                mel = fe(w.to(fe.mel.spectrogram.window.device))  # (n_mels, 1 + n // hop)
                windows.append(split_windows(mel, int(self.vae.input_shape[-1]), pad_value=-1.0))
            else:
                wins = split_windows(w[None], int(self.vae.input_shape[-1]), pad_value=0.0)
                windows.append(wins.reshape(-1, *self.vae.input_shape))
        return windows, lengths, source_lengths

    def encode(self, inputs: Any, sample_rate: int | None, batch_size: int) -> AudioIds:
        """Waveforms of any length -> :class:`AudioIds` (every window of every recording in one pass)."""
        windows, lengths, source_lengths = self.windows(inputs, sample_rate)
        ids_nt = self.tok.encode_inputs(torch.cat(windows), batch_size)
        items = list(ids_nt.split([len(w) for w in windows]))
        return AudioIds.from_items(
            items,
            lengths,
            int(self.tok.tokens),
            self.window_samples,
            self.sample_rate,
            int(sample_rate),
            source_lengths,
        )

    # ----------------------------------------------------------------------------------------- decode
    def postprocess(self, x: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """A VAE output batch -> waveforms (B, L) in [-1, 1] (``length`` samples, default one clip)."""
        length = self.clip_samples if length is None else int(length)
        if self.input_kind == "mel":
            return self.vocoder(x, self.vae.front_end, length)
        x = x.reshape(x.shape[0], -1)
        if x.shape[-1] < length:
            x = torch.nn.functional.pad(x, (0, length - x.shape[-1]))
        return x[..., :length].clamp(-1.0, 1.0)

    def decode(self, ids: Any, batch_size: int = 64, sample_rate: int | None = None) -> list[torch.Tensor]:
        """Audio ids -> one waveform per recording, each of its exact length (see ``Tokenizer.decode``)."""
        import torchaudio

        audio_ids = self.as_audio_ids(ids)
        outs = self.decode_windows([audio_ids.item_windows(b) for b in range(len(audio_ids))], batch_size)
        waves = []
        for b, y in enumerate(outs):
            n = int(audio_ids.lengths[b])
            w = self.output_to_wave(y, n)
            if sample_rate is not None and int(sample_rate) != self.sample_rate:
                w = torchaudio.functional.resample(w, self.sample_rate, int(sample_rate))
                src = audio_ids.source_lengths
                if audio_ids.source_rate == int(sample_rate) and src is not None:
                    n_out = int(src[b])
                    w = torch.nn.functional.pad(w, (0, max(0, n_out - w.numel())))[:n_out]
            waves.append(w.cpu())
        return waves

    def decode_windows(self, items: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
        """Per recording its ids (W_i, T) -> its VAE output reassembled over time, (C, W_i * N), by
        overlap-add of the windows and the windows straddling their borders."""
        counts = [int(x.shape[0]) for x in items]
        ids_nt = torch.cat(items)
        z = torch.cat(
            [
                self.tok.decode_latents(ids_nt[i : i + batch_size])
                for i in range(0, ids_nt.shape[0], batch_size)
            ]
        )
        return [overlap_add(*self._decode_pair(z_w, batch_size)) for z_w in z.split(counts)]

    def decode_latent_windows(self, z_items: list[torch.Tensor], batch_size: int = 64) -> list[torch.Tensor]:
        """Like :meth:`decode_windows` from raw latents (W_i, *latent_shape) per recording."""
        return [overlap_add(*self._decode_pair(z.to(self.tok.device), batch_size)) for z in z_items]

    def _decode_pair(self, z_wcl: torch.Tensor, batch_size: int) -> tuple[Any, Any, int]:
        """Decoded windows, decoded straddling windows, and how far into a window the latter start."""

        def dec(z: torch.Tensor) -> torch.Tensor:
            out = [self.vae.decode(z[i : i + batch_size]).cpu() for i in range(0, z.shape[0], batch_size)]
            y = torch.cat(out)
            return (
                y.reshape(y.shape[0], -1, y.shape[-1])
                if self.input_kind == "mel"
                else y.reshape(y.shape[0], 1, -1)
            )

        a = dec(z_wcl)
        b = dec(straddling_latents(z_wcl)) if z_wcl.shape[0] > 1 else None
        n, L = a.shape[-1], z_wcl.shape[-1]
        return a, b, (L // 2) * (n // L)

    def output_to_wave(self, y_ct: torch.Tensor, n_samples: int) -> torch.Tensor:
        """A reassembled VAE output (C, N) -> waveform (n_samples,)."""
        if self.input_kind == "mel":
            frames = self.vae.front_end.num_frames(n_samples)
            return self.postprocess(y_ct[None, :, :frames].to(self.tok.device), length=n_samples)[0]
        return self.postprocess(y_ct.reshape(1, -1), length=n_samples)[0]

    def as_audio_ids(self, ids: Any) -> AudioIds:
        """:class:`AudioIds` as is; a (B, W * T) id tensor (``PAD`` after a shorter row) as whole windows."""
        if isinstance(ids, AudioIds):
            return ids
        tokens = int(self.tok.tokens)
        t = torch.as_tensor(ids, dtype=torch.long)
        t = t[None] if t.ndim == 1 else t
        if t.ndim != 2 or t.shape[1] % tokens:
            raise ValueError(
                f"audio ids: expected AudioIds or (B, W * T) with T={tokens}; got {tuple(t.shape)}"
            )
        rows = [r.view(-1, tokens) for r in t]
        rows = [r[(r != PAD).any(dim=1)] for r in rows]  # drop padding windows
        hop = int(self.vae.front_end.hop) if self.input_kind == "mel" else 1
        # whole windows: a mel window of F frames is (F * W - 1) * hop samples of a centered STFT
        lengths = [len(r) * self.window_samples - (hop if self.input_kind == "mel" else 0) for r in rows]
        return AudioIds.from_items(rows, lengths, tokens, self.window_samples, self.sample_rate)
