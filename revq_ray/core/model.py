"""ReVQModel: standardizer + token layout + quantizer + rectifier, with a token-level encode/decode API.

latents (B, *latent_shape) -> standardize -> tokens (B, T, d) -> quantizer -> ids (B, T) and quantized
tokens -> latent view -> rectifier -> de-standardize -> latents. Training happens in standardized space:

- ``decoupled`` (default, as the ReVQ reference trains): ``rect = MSE(z_std, rectifier(q.detach()))`` trains
  only the rectifier; the quantizer's own losses train only the codebook.
- ``joint`` (``model.quantizer.loss: joint``): the paper's single objective ``MSE(z_std, rectifier(q))`` with
  ``q = quantizer.codes(ids)``, so the reconstruction loss reaches the codebook (or SimVQ's map) through the
  code lookup, on top of the quantizer's own (straight-through) commitment loss.

GQ is the exception to "standardize first": its codebook is samples of the VAE's N(0, I) prior, so it
quantizes the posterior (mean and log-variance) in the VAE's raw units; its codes are standardized afterwards
for the rectifier. ``decode(ids)`` runs the same ops as ``forward`` and equals it exactly in eval mode.

Saved and loaded with the Hugging Face mixin: ``save_pretrained(dir)`` writes ``config.json`` (latent shape
and the full ``ModelConfig``) and ``model.safetensors`` (parameters and persistent buffers: standardizer
mean/std, code-usage counts, method state); ``from_pretrained(dir_or_repo_id)`` reads them back with
safetensors only (never pickle).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from revq_ray.core.files import follow_umask
from revq_ray.core.layout import TokenLayout, channel_order_for
from revq_ray.core.precision import as_fp32, full_precision
from revq_ray.core.quantizers import QuantOut, ReduceFn, build_quantizer
from revq_ray.core.rectifiers import build_rectifier
from revq_ray.core.standardizer import Standardizer

if TYPE_CHECKING:  # pragma: no cover
    from revq_ray.config import ModelConfig

__all__ = ["ModelOut", "ReVQModel", "total_loss"]

_WEIGHTS_NAME = "model.safetensors"  # huggingface_hub.constants.SAFETENSORS_SINGLE_FILE


def _safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's header (8-byte length + JSON), without reading weights. Raises
    a ``ValueError`` naming the file when it is not whole (truncated by a full disk or a broken copy)."""
    import json

    fix = "copy it again, or re-export it (a training run rewrites export/latest at its next checkpoint)"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header length {n}); {fix}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(
                f"{path}: truncated or damaged ({size:,} bytes, header unreadable); {fix}"
            ) from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    need = 8 + n + max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if size < need:
        raise ValueError(f"{path}: truncated or damaged ({size:,} bytes, its header says {need:,}); {fix}")
    return {k: v["shape"] for k, v in tensors.items()}


def _check_shapes_before_building(cls: type, kwargs: dict[str, Any], path: str) -> None:
    """Compare config.json's model with the weights file before allocating it: a corrupt or edited config
    (e.g. codebook_size=2**31) must fail naming the key, not try to allocate terabytes."""
    stored = _safetensors_shapes(path)
    k_cfg = (kwargs.get("model") or {}).get("quantizer", {}).get("codebook_size")
    counts = stored.get("quantizer.counts")  # (tokens or groups, codebook_size) for every quantizer
    if k_cfg is not None and counts and int(k_cfg) != counts[-1]:
        raise ValueError(
            f"{os.path.dirname(path)}: config.json says model.quantizer.codebook_size={k_cfg}, "
            f"{os.path.basename(path)} holds {counts[-1]} codes: the config was edited or belongs to another "
            "model"
        )
    try:
        with torch.device("meta"):  # shapes only: no memory
            shapes = {k: list(v.shape) for k, v in cls(**kwargs).state_dict().items()}
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: the strict load still checks
        return
    diff = [
        f"{k}: config.json gives {shapes[k]}, weights hold {stored[k]}"
        for k in shapes
        if k in stored and shapes[k] != stored[k]
    ]
    if diff:
        raise ValueError(
            f"{os.path.dirname(path)}: config.json does not match {os.path.basename(path)} "
            f"({'; '.join(diff[:3])}): the config was edited or belongs to another model"
        )


@dataclass
class ModelOut:
    """What :meth:`ReVQModel.forward` returns."""

    latents_rec: torch.Tensor
    """Reconstructed latents (B, *latent_shape): rectified and de-standardized (what the VAE decoder gets)."""
    ids_bt: torch.Tensor
    """Code index per token (B, T), int64, in [0, codebook_size)."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """The quantizer's named losses plus ``"rect"``, all scalars in standardized units."""
    quantized: torch.Tensor | None = None
    """Quantized latent (B, *latent_shape) in standardized units, before the rectifier."""
    rectified_std: torch.Tensor | None = None
    """Rectifier output (B, *latent_shape) in standardized units."""
    latents_std: torch.Tensor | None = None
    """The standardized input (B, *latent_shape): the target of ``"rect"`` (handy for metrics)."""

    @property
    def loss(self) -> torch.Tensor:
        """Sum of all losses (the training objective)."""
        return total_loss(self)


def total_loss(out: ModelOut) -> torch.Tensor:
    """Sum of ``out.losses`` (the quantizer's losses and the rectifier's ``"rect"``)."""
    if not out.losses:
        raise ValueError("ModelOut.losses is empty: nothing to optimize")
    return sum(out.losses.values(), torch.zeros((), device=out.latents_rec.device))


def _validated_model_config(model: Any) -> ModelConfig:
    """The full, validated ``ModelConfig`` of a plain dict (``config.json``'s ``model``) or a ``ModelConfig``.

    This is the model's one bridge to :mod:`revq_ray.config` (pydantic), imported here, when a model is
    built, so that importing :mod:`revq_ray.core` needs no pydantic. Unknown keys and bad values are errors
    naming the field; missing ones take today's defaults (an old ``config.json`` written with every field
    keeps its meaning)."""
    from revq_ray.config import ModelConfig, parse_config

    if isinstance(model, ModelConfig):
        return model.model_copy(deep=True)  # later edits to the caller's object must not desync us
    return parse_config(dict(model or {}), ModelConfig)


class ReVQModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="revq-ray",
    tags=["revq-ray", "vector-quantization", "tokenizer"],
    paper_url="https://arxiv.org/abs/2507.10547",
):
    """Quantizer and rectifier over frozen-VAE latents of shape ``latent_shape`` ((C, H, W) or (C, L)).

    Args:
        latent_shape: shape of one latent without the batch dim, e.g. ``[32, 8, 8]`` or ``[16, 200]``.
        model: a :class:`~revq_ray.config.ModelConfig` as a plain dict (``cfg.model_dump()``), so that the
            Hugging Face mixin can store it in ``config.json``; None means the defaults. A ``ModelConfig``
            instance is accepted too. Prefer :meth:`from_config` when you hold a ``ModelConfig``.
    """

    def __init__(self, latent_shape: list[int], model: dict[str, Any] | None = None):
        super().__init__()
        cfg = _validated_model_config(model)
        self.cfg: ModelConfig = cfg
        self.layout = TokenLayout(latent_shape, cfg.quantizer.tokens, kind=cfg.layout)
        self.standardizer = Standardizer(self.layout.latent_shape, weighted=cfg.weighting != "none")
        if cfg.layout == "position":
            # which channels share a token: set from the channel weights (set_channel_weights), saved with the
            # model so ids decode the same way forever
            self.register_buffer("channel_order", torch.arange(self.layout.latent_shape[0]))
        self.quantizer = build_quantizer(cfg.quantizer, self.layout.dim)
        # GQ quantizes the VAE posterior in raw units (its codebook is the VAE prior); the others work on
        # standardized latents. Either way the rectifier and its loss live in standardized units.
        self._raw_units = cfg.quantizer.type == "gq"
        self.rectifier = build_rectifier(
            cfg.rectifier,
            channels=self.layout.latent_shape[0],
            spatial_dims=len(self.layout.latent_shape) - 1,
        )
        # What save_pretrained writes to config.json: always the full, validated config (so a saved model does
        # not change meaning if a default changes later), whatever form the caller passed. Not init_from: that
        # is how a training run started, not part of the model (a saved model stands on its own).
        self._hub_mixin_config = {
            "latent_shape": list(self.layout.latent_shape),
            "model": cfg.model_dump(mode="json", exclude={"init_from"}),
        }

    @classmethod
    def from_config(cls, latent_shape: list[int] | tuple[int, ...], cfg: ModelConfig) -> ReVQModel:
        """Build from a validated :class:`~revq_ray.config.ModelConfig` (passed through, not re-parsed)."""
        return cls(list(latent_shape), cfg)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.layout.latent_shape

    @property
    def tokens(self) -> int:
        """T: tokens (= codebook groups) per latent."""
        return self.layout.tokens

    @property
    def codebook_size(self) -> int:
        """K: codes per group; ids lie in [0, K)."""
        return self.cfg.quantizer.codebook_size

    @property
    def bits_per_sample(self) -> float:
        """T * log2(K): the size of one latent's token sequence in bits."""
        return self.tokens * math.log2(self.codebook_size)

    # ----------------------------------------------------------------------------------------- layout
    def to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """(B, *latent_shape) -> (B, T, d) in this model's token layout (any units)."""
        return self.layout.to_tokens(z, getattr(self, "channel_order", None))

    def to_latent(self, tokens_btd: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, *latent_shape): the exact inverse of :meth:`to_tokens`."""
        return self.layout.to_latent(tokens_btd, getattr(self, "channel_order", None))

    @torch.no_grad()
    def set_channel_weights(self, weights: torch.Tensor) -> None:
        """``model.weighting: decoder``: set the per-channel weights (e.g. from
        :func:`revq_ray.core.sensitivity.decoder_channel_weights`) before the codebook is initialized. With
        ``model.layout: position`` the channels are also dealt to the token groups in decreasing weight, so
        each group holds an equal share of the channels the decoder cares about."""
        w = self.standardizer.set_channel_weights(weights)
        if self.cfg.layout == "position":
            self.channel_order.copy_(channel_order_for(w).to(self.channel_order))

    # ----------------------------------------------------------------------------------------- internals
    def _check(self, latents: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)}: expected (B, *latent_shape) = (B, "
                f"{', '.join(map(str, self.latent_shape))})"
            )
        if logvar is not None and logvar.shape != latents.shape:
            raise ValueError(f"logvar shape {tuple(logvar.shape)} != latents shape {tuple(latents.shape)}")
        return latents.to(self.standardizer.mean.dtype)

    def _quantize(self, z: torch.Tensor, z_std: torch.Tensor, logvar: torch.Tensor | None) -> QuantOut:
        """Run the quantizer in its own units: standardized tokens, or (GQ) the VAE's raw posterior.

        Always fp32 with autocast off (see :mod:`revq_ray.core.precision`): the caller holds that region."""
        if not self._raw_units:
            return self.quantizer(self.to_tokens(z_std))
        # GQ's codebook is samples of the VAE's N(0, I) prior, so it must see the posterior (mean, log-var)
        # in the VAE's own units; standardizing would break the match with the prior.
        logvar_btd = None if logvar is None else self.to_tokens(logvar.to(z.dtype))
        return self.quantizer(self.to_tokens(z), logvar_btd=logvar_btd)

    def _to_std(self, q_btd: torch.Tensor) -> torch.Tensor:
        """Quantized tokens (quantizer units) -> standardized latent view (what the rectifier sees)."""
        # contiguous: a code lookup may return a strided view (e.g. SimVQ's per-group map), and outputs
        # should not inherit odd strides (safetensors, .view() and DDP buckets reject them).
        q = self.to_latent(q_btd.contiguous())
        return self.standardizer(q) if self._raw_units else q

    def _rectify_and_destandardize(self, q_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The rectifier is the one part that may run under autocast (bf16); its output is brought back to
        # fp32 (a differentiable cast) before de-standardizing and before any loss.
        rectified_std = as_fp32(self.rectifier(q_std))
        with full_precision(rectified_std.device):
            return rectified_std, self.standardizer.inverse(rectified_std)

    @contextlib.contextmanager
    def _eval_quantizer(self) -> Iterator[None]:
        """Quantizer in eval mode for the block: inference never adds to training code-usage counts."""
        was = self.quantizer.training
        self.quantizer.eval()
        try:
            yield
        finally:
            self.quantizer.train(was)

    # ----------------------------------------------------------------------------------------- API
    def forward(self, latents: torch.Tensor, logvar: torch.Tensor | None = None) -> ModelOut:
        """Quantize and rectify a batch of raw latents (B, *latent_shape); returns outputs and losses.

        ``logvar`` (the VAE posterior's log-variance, raw units, same shape) is used by GQ only and ignored
        by the other methods.
        """
        z = self._check(latents, logvar)
        with full_precision(z.device):  # standardize, search, gather, quantizer losses: fp32 always
            z_std = self.standardizer(z)
            qout = self._quantize(z, z_std, as_fp32(logvar))
            if "rect" in qout.losses:
                raise RuntimeError(
                    "the quantizer returned a loss named 'rect', which the rectifier's loss uses"
                )
            if self.cfg.quantizer.loss == "joint":
                # One objective ||z - g(q(z))||^2: the rectifier's loss also trains the codebook, through the
                # (differentiable) code lookup. The quantizer's straight-through output would send this
                # gradient to the frozen latents instead, where nothing learns from it.
                q_btd = self.quantizer.codes(qout.ids_bt)
            else:
                # Decoupled (reference): the rectifier learns on fixed codes and never pushes the codebook.
                q_btd = qout.quantized_btd.detach()
            q_std = self._to_std(q_btd)
        rectified_std, latents_rec = self._rectify_and_destandardize(q_std)
        with full_precision(z.device):
            losses = {**qout.losses, "rect": F.mse_loss(rectified_std, z_std)}
        return ModelOut(
            latents_rec=latents_rec,
            ids_bt=qout.ids_bt,
            losses=losses,
            quantized=q_std,
            rectified_std=rectified_std,
            latents_std=z_std,
        )

    @torch.no_grad()
    def encode(self, latents: torch.Tensor, logvar: torch.Tensor | None = None) -> torch.Tensor:
        """Raw latents (B, *latent_shape) -> token ids (B, T) int64 in [0, codebook_size).

        Runs the quantizer in eval mode, so encoding never touches the training code-usage counts.
        ``logvar`` as in :meth:`forward` (GQ only).
        """
        z = self._check(latents, logvar)
        with self._eval_quantizer(), full_precision(z.device):
            ids_bt = self._quantize(z, self.standardizer(z), as_fp32(logvar)).ids_bt
        return ids_bt.long()

    def decode(self, ids_bt: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> raw latents (B, *latent_shape).

        codes -> latent view -> rectifier -> de-standardize. In eval mode this equals
        ``forward(latents).latents_rec`` for ``ids_bt = encode(latents)`` exactly (the same ops).
        Not wrapped in no_grad, so the rectifier can be fine-tuned from ids; wrap calls in
        ``torch.inference_mode()`` for pure inference.
        """
        if ids_bt.dim() != 2 or ids_bt.shape[1] != self.tokens:
            raise ValueError(f"ids of shape {tuple(ids_bt.shape)}: expected (B, {self.tokens})")
        if ids_bt.dtype.is_floating_point or ids_bt.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got {ids_bt.dtype}")
        if ids_bt.numel() and (int(ids_bt.min()) < 0 or int(ids_bt.max()) >= self.codebook_size):
            raise ValueError(
                f"ids out of range [0, {self.codebook_size}): "
                f"min {int(ids_bt.min())}, max {int(ids_bt.max())}"
            )
        with full_precision(ids_bt.device):
            q_std = self._to_std(self.quantizer.codes(ids_bt.long()))
        return self._rectify_and_destandardize(q_std)[1]

    @torch.no_grad()
    def quantize_only(self, latents: torch.Tensor, logvar: torch.Tensor | None = None) -> torch.Tensor:
        """Raw latents -> quantized raw latents, no rectifier (for "MSE without rectifier" metrics)."""
        z = self._check(latents, logvar)
        with self._eval_quantizer(), full_precision(z.device):
            q = self.to_latent(self._quantize(z, self.standardizer(z), as_fp32(logvar)).quantized_btd)
            return q if self._raw_units else self.standardizer.inverse(q)

    @torch.no_grad()
    def init_codebook(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialize codebooks from raw training latents (N, *latent_shape); fit the standardizer first."""
        z = self._check(latents, None)
        tokens_ntd = self.to_tokens(z if self._raw_units else self.standardizer(z))
        self.quantizer.init_from_tokens(tokens_ntd, generator=generator)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by module: ``"codebook"`` (quantizer) and ``"rectifier"``.

        The trainer gives each its own lr, weight decay and gradient clipping (ReVQ's recipe). Either list may
        be empty (e.g. GQ has no trainable codebook, the identity rectifier has no parameters).
        """
        groups = {
            "codebook": [p for p in self.quantizer.parameters() if p.requires_grad],
            "rectifier": [p for p in self.rectifier.parameters() if p.requires_grad],
        }
        grouped = {id(p) for ps in groups.values() for p in ps}
        stray = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in grouped]
        if stray:  # a new module must be assigned to a group, or the trainer would silently not train it
            raise RuntimeError(f"trainable parameters outside the codebook/rectifier groups: {stray}")
        return groups

    def set_reduce_fn(self, fn: ReduceFn) -> None:
        """Inject the cross-rank sum (e.g. an all-reduce) that the quantizer's resets and state use."""
        setter: Callable[[ReduceFn], Any] | None = getattr(self.quantizer, "set_reduce_fn", None)
        if setter is not None:
            setter(fn)
        else:
            self.quantizer.reduce_fn = fn

    def extra_repr(self) -> str:
        return (
            f"latent_shape={self.latent_shape}, tokens={self.tokens}, codebook_size={self.codebook_size}, "
            f"quantizer={self.cfg.quantizer.type}, rectifier={self.cfg.rectifier.type}, "
            f"bits_per_sample={self.bits_per_sample:g}"
        )

    # ----------------------------------------------------------------------------------------- hub loading
    def _save_pretrained(self, save_directory: str | os.PathLike) -> None:
        super()._save_pretrained(save_directory)
        # safetensors writes 0600 whatever the umask says: teammates who share the folder must read it.
        follow_umask(os.path.join(save_directory, _WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> ReVQModel:
        """Load a model saved with :meth:`save_pretrained` from a local directory or a hub repo id.

        Keyword arguments are those of ``huggingface_hub.ModelHubMixin.from_pretrained`` (``revision``,
        ``cache_dir``, ``local_files_only``, ``token``, ...) plus ``map_location`` (default "cpu") and
        ``strict`` (default True). Weights are read from ``model.safetensors`` only; the model is returned in
        eval mode. With ``HF_HUB_OFFLINE=1`` a repo id resolves from the local hub cache.
        """
        name = str(pretrained_model_name_or_path)
        looks_like_path = os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1
        if not os.path.isdir(name) and (looks_like_path or os.path.exists(name)):
            # Without this a mistyped local path reaches the hub client and fails as an invalid repo id.
            raise FileNotFoundError(
                f"{name!r} is not a directory holding a saved ReVQModel (config.json + model.safetensors)"
            )
        return super().from_pretrained(name, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> ReVQModel:
        """Build from config.json and load model.safetensors (strictly; never a pickle), in eval mode."""
        import safetensors.torch

        if "latent_shape" not in model_kwargs:
            raise FileNotFoundError(
                f"{model_id!r} has no readable config.json with 'latent_shape': not a ReVQModel saved with "
                "save_pretrained (or pass latent_shape= and model= explicitly)"
            )
        if os.path.isdir(model_id):
            path = os.path.join(model_id, _WEIGHTS_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist: save the model with save_pretrained first")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(
                repo_id=model_id,
                filename=_WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        _check_shapes_before_building(cls, model_kwargs, path)
        model = cls(**model_kwargs)
        # Load on CPU into the CPU-built module, then move: load_model copies into the existing tensors, so
        # loading straight onto another device would not move the model there.
        safetensors.torch.load_model(model, path, strict=strict, device="cpu")
        if str(map_location) != "cpu":
            model.to(map_location)
        model.eval()
        return model
