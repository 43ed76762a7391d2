"""Frozen VAE adapters, the audio front end and built-in Gaussian VAEs.

``load_vae(spec)`` is the one entry point; every adapter follows :class:`revq_ray.vae.base.FrozenVAE`:

===========================  ===============================================================================
spec                         what
===========================  ===============================================================================
``diffusers:<dir|hub-id>``   AutoencoderKL / AutoencoderDC / AutoencoderTiny / AutoencoderOobleck (class
                             from config.json ``_class_name``); a hub id (``owner/name[/subfolder]``) needs
                             internet
``taesd:<dir>``              TAESD-format ``*encoder*.pth`` + ``*decoder*.pth`` (e.g. ../shared/models/taef2)
``builtin:<dir>``            a built-in ImageConvVAE / MelVAE trained with ``python -m revq_ray.vae``
===========================  ===============================================================================

Heavy modules (diffusers, torchaudio) are imported only when a spec needs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from revq_ray.vae.base import FrozenVAE, Posterior

SPEC_FORMS = (
    "diffusers:<hub-id-or-dir> (AutoencoderKL/DC/Tiny/Oobleck), taesd:<dir> (TAESD-format *encoder*.pth + "
    "*decoder*.pth), builtin:<dir> (a VAE trained with `python -m revq_ray.vae`)"
)

__all__ = ["FrozenVAE", "Posterior", "load_vae", "load_vae_for", "parse_spec", "SPEC_FORMS"]


def parse_spec(spec: str) -> tuple[str, str]:
    """``"kind:target"`` -> (kind, target); raises ValueError listing the three valid forms."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"VAE spec {spec!r} has no '<kind>:' prefix; expected one of: {SPEC_FORMS}")
    kind, target = spec.split(":", 1)
    kind, target = kind.strip().lower(), target.strip()
    if kind not in ("diffusers", "taesd", "builtin"):
        raise ValueError(f"VAE spec {spec!r}: unknown kind {kind!r}; expected one of: {SPEC_FORMS}")
    if not target:
        raise ValueError(f"VAE spec {spec!r}: empty target after '{kind}:'; expected one of: {SPEC_FORMS}")
    return kind, target


def load_vae(
    spec: str,
    device: torch.device | str = "cpu",
    *,
    image_size: int | None = None,
    audio_samples: int | None = None,
) -> FrozenVAE:
    """Load a frozen VAE (eval mode, ``requires_grad`` False everywhere) from a spec string.

    Args:
        spec: ``diffusers:<hub-id-or-dir>``, ``taesd:<dir>`` or ``builtin:<dir>``.
        device: where the weights live; inputs are moved there.
        image_size: image VAEs: the square input size behind ``input_shape``/``latent_shape``. Default:
            diffusers config ``sample_size`` (else 256); taesd 256; builtin its training size.
        audio_samples: audio VAEs: the crop length in samples at the VAE's ``sample_rate`` (mel VAEs turn
            it into ``1 + audio_samples // hop`` frames rounded up to a multiple of 4). Default: Oobleck
            ~10 s, MelVAE its training ``frames``.
    """
    kind, target = parse_spec(spec)
    if kind == "diffusers":
        from revq_ray.vae.hf_diffusers import DiffusersVAE

        vae = DiffusersVAE(target, device, image_size=image_size, audio_samples=audio_samples)
    elif kind == "taesd":
        if audio_samples is not None:
            raise ValueError(f"{spec}: audio_samples is for audio VAEs; taesd is an image VAE")
        from revq_ray.vae.taesd import TAESDVAE

        vae = TAESDVAE(target, device, image_size=image_size)
    else:
        from revq_ray.vae.builtin import BuiltinVAE

        vae = BuiltinVAE(target, device, image_size=image_size, audio_samples=audio_samples)
    # Normalize the spec to what the user wrote (adapters may have expanded a path).
    vae.spec = f"{kind}:{target}"
    return vae


def load_vae_for(
    spec: str, latent_shape: Sequence[int], device: str | torch.device = "cpu", image_size: int | None = None
) -> FrozenVAE:
    """Load a VAE whose latents have ``latent_shape``.

    Image VAEs are convolutional: their latent size depends on the input size. Without an explicit
    ``image_size`` the VAE is loaded at its default size first, and if its latents do not match the model's,
    reloaded at ``latent side * downsampling factor`` (e.g. 8x8 latents of an f8 VAE -> 64x64 images).
    """
    vae = load_vae(spec, device=str(device), image_size=image_size)
    want = tuple(int(s) for s in latent_shape)
    if (
        image_size is None
        and getattr(vae, "modality", "image") == "image"
        and tuple(vae.latent_shape) != want
        and len(want) == 3
        and vae.latent_shape[-1]
    ):
        factor = int(vae.input_shape[-1]) // int(vae.latent_shape[-1])
        vae = load_vae(spec, device=str(device), image_size=want[-1] * factor)
    return vae
