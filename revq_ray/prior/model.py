"""The stage-2 prior: a class-conditional decoder-only transformer over a tokenizer's ids. Plain PyTorch.

A revq-ray image tokenizer writes T ids per image, and id ``k`` at position ``t`` means *code k of codebook
t*: every token position has its own codebook of K codes (``manifest.json`` ``"vocab": "per_position"``). The
same number at two positions names two unrelated vectors. :class:`PriorTransformer` is built around that:

- **Output: position t chooses among codebook t's K codes only.** Every output position has K logits, never
  T*K: a softmax over the codes that can occur there. ``head="shared"`` is one ``Linear(D, K)`` for every
  position: logit k at output position t scores code k *of codebook t*; the weights are shared across
  positions and the hidden state, which carries position t's embedding, says which codebook is being
  predicted. ``head="per_position"`` gives each position its own (D, K) head (T*D*K weights): nothing shared.
- **Input: the embedding of id k at position t depends on (t, k), never on k alone.** ``embedding="table"``
  learns one D-vector per (t, k) (T*K rows: a shared (K, D) table plus a position embedding would give code k
  of codebook 3 and code k of codebook 7 the same content vector although they are unrelated).
  ``embedding="codebook"`` embeds the code's *actual vector* ``c[t, k]`` (d values, the tokenizer's codebook,
  exported beside the token dataset as ``codebooks.safetensors``), frozen, through a learned ``Linear(d, D)``:
  what the token means is its input, and nothing is learned per (t, k) (T*K*d fixed values, d*D weights).
- **Sequence.** Slot 0 holds the class embedding (``num_classes`` rows, plus the "null" class for
  classifier-free guidance); slot i >= 1 holds the embedding of the previous token (position i-1, id
  x[i-1]); a learned slot embedding is added to every slot. The output of slot i predicts x[i] among
  codebook i's codes. So a sequence of T ids is T slots: the last id is predicted, never fed.
- **Classifier-free guidance.** During training the label is replaced by the null class with probability
  ``cfg_dropout`` (:meth:`drop_labels`); sampling mixes ``uncond + s * (cond - uncond)`` (batched: the
  conditional and unconditional rows run as one batch). An unconditional prior (``num_classes=0``) has only
  the null class.
- **Sampling** (:meth:`generate`) runs one forward per token with a key-value cache (each step attends to the
  cached keys and values of all earlier slots), not one per prefix; :meth:`generate_full_prefix` is the
  reference that recomputes the prefix every step (tests: same seed -> same ids, logits equal to tolerance).

``save_pretrained`` / ``from_pretrained``: ``config.json`` (the architecture and ``meta``: what the prior was
trained on: the tokenizer's identity, class names) + ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "revq-ray-prior"
VERSION = 1


@dataclass
class PriorSpec:
    """The architecture of a :class:`PriorTransformer` (plain data: saved in ``config.json``)."""

    tokens: int  # T: ids per image
    codebook_size: int  # K: codes per position
    num_classes: int = 0  # 0: unconditional (only the null class)
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    embedding: str = "table"  # "table" | "codebook"
    head: str = "shared"  # "shared" | "per_position"
    code_dim: int = 0  # d of the codebook vectors (embedding="codebook")
    cfg_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.embedding not in ("table", "codebook"):
            raise ValueError(f"embedding={self.embedding!r}: choose 'table' or 'codebook'")
        if self.head not in ("shared", "per_position"):
            raise ValueError(f"head={self.head!r}: choose 'shared' or 'per_position'")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of heads={self.heads}")
        if self.embedding == "codebook" and self.code_dim < 1:
            raise ValueError("embedding='codebook' needs code_dim >= 1 (the codebook vectors' dimension)")
        if self.tokens < 1 or self.codebook_size < 2 or self.num_classes < 0:
            raise ValueError(
                f"tokens={self.tokens}, codebook_size={self.codebook_size}, num_classes={self.num_classes}"
            )

    @property
    def null_class(self) -> int:
        """The class id that stands for "no label" (classifier-free guidance): ``num_classes``."""
        return self.num_classes


class KVCache:
    """Keys and values of every layer for the slots seen so far: (B, heads, T, head_dim), preallocated."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.length = 0  # slots filled


class Attention(nn.Module):
    """Causal multi-head self-attention that can append to a :class:`KVCache`."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x_bld: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, n, d = x_bld.shape
        q, k, v = self.qkv(x_bld).view(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)  # (B, H, n, hd)
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            s = cache.length
            cache.k[layer][:, :, s : s + n] = k
            cache.v[layer][:, :, s : s + n] = v
            keys, values = cache.k[layer][:, :, : s + n], cache.v[layer][:, :, : s + n]
            if n == 1:  # one new slot attends to every cached one: no mask needed
                y = F.scaled_dot_product_attention(q, keys, values, dropout_p=p)
            else:  # n new slots after s cached ones: slot s+i sees slots 0..s+i
                mask = torch.ones(n, s + n, dtype=torch.bool, device=x_bld.device).tril(diagonal=s)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention and an MLP, each in a residual branch."""

    def __init__(self, d: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class PriorTransformer(nn.Module):
    """Class-conditional decoder-only transformer over per-position token ids (see the module docstring).

    Args:
        spec: the architecture (:class:`PriorSpec`) or a dict of its fields.
        codebooks_tkd: ``embedding="codebook"``: the (T, K, d) code vectors (a frozen buffer, saved with the
            model); ignored otherwise.
        meta: plain data saved in ``config.json`` beside the architecture (what the prior was trained on).
    """

    def __init__(
        self,
        spec: PriorSpec | dict[str, Any],
        codebooks_tkd: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.spec = spec if isinstance(spec, PriorSpec) else PriorSpec(**spec)
        self.meta: dict[str, Any] = dict(meta or {})
        s = self.spec
        T, K, D = s.tokens, s.codebook_size, s.d_model
        self.class_emb = nn.Embedding(s.num_classes + 1, D)  # the last row is the null class
        self.slot_emb = nn.Parameter(torch.zeros(T, D))
        if s.embedding == "table":
            self.tok_emb = nn.Embedding(T * K, D)  # row t*K + k: code k of codebook t
        else:
            if codebooks_tkd is None:
                codebooks_tkd = torch.zeros(T, K, s.code_dim)  # filled by load_state_dict
            if tuple(codebooks_tkd.shape) != (T, K, s.code_dim):
                raise ValueError(
                    f"codebooks_tkd has shape {tuple(codebooks_tkd.shape)}, expected (T, K, d) = "
                    f"({T}, {K}, {s.code_dim})"
                )
            self.register_buffer("codebooks_tkd", codebooks_tkd.detach().float().clone())
            self.code_proj = nn.Linear(s.code_dim, D)
        self.drop = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(Block(D, s.heads, s.mlp_ratio, s.dropout) for _ in range(s.layers))
        self.ln_f = nn.LayerNorm(D)
        if s.head == "shared":
            self.head = nn.Linear(D, K)
        else:
            self.head_w = nn.Parameter(torch.empty(T, D, K))
            self.head_b = nn.Parameter(torch.zeros(T, K))
        self.register_buffer("positions", torch.arange(T), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        nn.init.normal_(self.slot_emb, std=std)
        if self.spec.head == "per_position":
            nn.init.normal_(self.head_w, std=std)
        for blk in self.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(blk.attn.proj.weight, std=std / math.sqrt(2 * self.spec.layers))
            nn.init.normal_(blk.mlp[2].weight, std=std / math.sqrt(2 * self.spec.layers))

    # ----------------------------------------------------------------------------------------- pieces
    @property
    def tokens(self) -> int:
        return self.spec.tokens

    @property
    def codebook_size(self) -> int:
        return self.spec.codebook_size

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def embed_tokens(self, ids_bn: torch.Tensor, positions_n: torch.Tensor) -> torch.Tensor:
        """Ids (B, n) at token positions ``positions_n`` (n,) -> embeddings (B, n, D), each of (t, k)."""
        if self.spec.embedding == "table":
            return self.tok_emb(positions_n[None, :] * self.spec.codebook_size + ids_bn)
        vec_bnd = self.codebooks_tkd[positions_n[None, :], ids_bn]  # code k of codebook t: its vector
        return self.code_proj(vec_bnd)

    def logits_at(self, h_bnd: torch.Tensor, positions_n: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, n, D) of the slots predicting positions ``positions_n`` -> (B, n, K) logits,
        logit k at position t = code k of codebook t."""
        if self.spec.head == "shared":
            return self.head(h_bnd)
        w_ndk, b_nk = self.head_w[positions_n], self.head_b[positions_n]
        return torch.einsum("bnd,ndk->bnk", h_bnd, w_ndk) + b_nk

    def drop_labels(self, labels_b: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Classifier-free guidance training: each label becomes the null class with probability
        ``cfg_dropout`` (an unconditional prior: every label is the null class)."""
        if self.spec.num_classes == 0:
            return torch.full_like(labels_b, self.spec.null_class)
        p = self.spec.cfg_dropout
        if p <= 0:
            return labels_b
        u = torch.rand(labels_b.shape, generator=generator, device=labels_b.device)
        return torch.where(u < p, torch.full_like(labels_b, self.spec.null_class), labels_b)

    def _slots(self, labels_b: torch.Tensor, ids_bn: torch.Tensor) -> torch.Tensor:
        """Slot inputs: [class, e(0, x0), ..., e(n-1, x_{n-1})] + slot embeddings -> (B, n+1, D)."""
        n = ids_bn.shape[1]
        parts = [self.class_emb(labels_b)[:, None]]
        if n:
            parts.append(self.embed_tokens(ids_bn, self.positions[:n]))
        x = torch.cat(parts, 1)
        return x + self.slot_emb[: n + 1]

    def _check(self, ids_bt: torch.Tensor, labels_b: torch.Tensor) -> None:
        T, K = self.spec.tokens, self.spec.codebook_size
        if ids_bt.ndim != 2 or ids_bt.shape[1] > T:
            raise ValueError(f"ids: expected (B, n <= T={T}), got {tuple(ids_bt.shape)}")
        if ids_bt.numel() and (int(ids_bt.min()) < 0 or int(ids_bt.max()) >= K):
            raise ValueError(
                f"ids must lie in [0, K={K}) (per-position codes); got [{int(ids_bt.min())}, "
                f"{int(ids_bt.max())}]"
            )
        if labels_b.numel() and (int(labels_b.min()) < 0 or int(labels_b.max()) > self.spec.null_class):
            raise ValueError(
                f"labels must lie in [0, {self.spec.num_classes}] ({self.spec.num_classes}: the null class); "
                f"got [{int(labels_b.min())}, {int(labels_b.max())}]"
            )

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, ids_bt: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: ids (B, T) and labels (B,) -> (B, T, K), row t = the distribution of x[t]
        over codebook t's codes given the class and x[:t]. Labels are used as given (drop them for CFG with
        :meth:`drop_labels` first)."""
        self._check(ids_bt, labels_b)
        n = ids_bt.shape[1]
        x = self.drop(self._slots(labels_b, ids_bt[:, : n - 1]))
        for blk in self.blocks:
            x = blk(x)
        return self.logits_at(self.ln_f(x), self.positions[:n])

    def loss(self, ids_bt: torch.Tensor, labels_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy per token (nats) and the share of tokens whose most likely code is the true
        one (a 0-dim tensor each; labels used as given)."""
        logits = self.forward(ids_bt, labels_b)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids_bt.reshape(-1))
        acc = (logits.argmax(-1) == ids_bt).float().mean()
        return loss, acc

    # ----------------------------------------------------------------------------------------- sampling
    def _guided(self, logits_2bk: torch.Tensor, b: int, guidance: float) -> torch.Tensor:
        cond, uncond = logits_2bk[:b], logits_2bk[b:]
        return uncond + guidance * (cond - uncond)

    @staticmethod
    def pick(
        logits_bk: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Sample one id per row from logits (B, K): temperature, then the top-k (0 = all), then a
        multinomial draw (``temperature=0``: the argmax)."""
        logits_bk = logits_bk.float()
        if temperature <= 0:
            return logits_bk.argmax(-1)
        logits_bk = logits_bk / temperature
        if 0 < top_k < logits_bk.shape[-1]:
            kth = torch.topk(logits_bk, top_k, dim=-1).values[:, -1:]
            logits_bk = logits_bk.masked_fill(logits_bk < kth, float("-inf"))
        probs = torch.softmax(logits_bk, -1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def _pairs(self, labels_b: torch.Tensor, guidance: float) -> tuple[torch.Tensor, bool]:
        """The batch a sampling step runs: the labels, plus as many null-class rows when guiding."""
        guided = guidance != 1.0 and self.spec.num_classes > 0
        if not guided:
            return labels_b, False
        return torch.cat([labels_b, torch.full_like(labels_b, self.spec.null_class)]), True

    @torch.no_grad()
    def generate(
        self,
        labels_b: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sample ids (B, T) for ``labels_b`` (B,) with a key-value cache: T forwards of one slot each.

        ``guidance`` s: logits = uncond + s * (cond - uncond), the conditional and the null-class rows in one
        batch (s = 1: the conditional logits alone, no extra rows). ``return_logits``: also the (B, T, K)
        logits each id was drawn from (after guidance, before temperature / top-k)."""
        self._check(torch.zeros(len(labels_b), 0, dtype=torch.long), labels_b)
        was = self.training
        self.eval()
        try:
            T, b = self.spec.tokens, len(labels_b)
            lab, guided = self._pairs(labels_b, guidance)
            ref = self.class_emb.weight
            cache = KVCache(
                len(self.blocks), len(lab), self.spec.heads, T, self.spec.d_model // self.spec.heads, ref
            )
            ids = torch.zeros(b, T, dtype=torch.long, device=ref.device)
            all_logits = []
            x = self.class_emb(lab)[:, None] + self.slot_emb[:1]  # slot 0: the class
            for t in range(T):
                for i, blk in enumerate(self.blocks):
                    x = blk(x, cache, i)
                cache.length += 1
                logits = self.logits_at(self.ln_f(x), self.positions[t : t + 1])[:, 0]
                if guided:
                    logits = self._guided(logits, b, guidance)
                if return_logits:
                    all_logits.append(logits.float())
                ids[:, t] = self.pick(logits, temperature, top_k, generator)
                if t + 1 < T:  # slot t+1: the id just drawn, embedded as code ids[t] of codebook t
                    nxt = ids[:, t : t + 1].repeat(2, 1) if guided else ids[:, t : t + 1]
                    x = self.embed_tokens(nxt, self.positions[t : t + 1]) + self.slot_emb[t + 1 : t + 2]
            if return_logits:
                return ids, torch.stack(all_logits, 1)
            return ids
        finally:
            self.train(was)

    @torch.no_grad()
    def generate_full_prefix(
        self,
        labels_b: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The reference sampler: the same draws as :meth:`generate`, recomputing the whole prefix at every
        step (T forwards of up to T slots). For tests and the benchmark, not for use."""
        was = self.training
        self.eval()
        try:
            T, b = self.spec.tokens, len(labels_b)
            lab, guided = self._pairs(labels_b, guidance)
            ids = torch.zeros(b, T, dtype=torch.long, device=self.class_emb.weight.device)
            all_logits = []
            for t in range(T):
                prefix = ids[:, :t].repeat(2, 1) if guided else ids[:, :t]
                x = self._slots(lab, prefix)
                for blk in self.blocks:
                    x = blk(x)
                logits = self.logits_at(self.ln_f(x[:, -1:]), self.positions[t : t + 1])[:, 0]
                if guided:
                    logits = self._guided(logits, b, guidance)
                if return_logits:
                    all_logits.append(logits.float())
                ids[:, t] = self.pick(logits, temperature, top_k, generator)
            if return_logits:
                return ids, torch.stack(all_logits, 1)
            return ids
        finally:
            self.train(was)

    # ----------------------------------------------------------------------------------------- files
    def config_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds: format, version, the architecture and ``meta``."""
        return {"format": FORMAT, "version": VERSION, "spec": asdict(self.spec), "meta": self.meta}

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``path``."""
        import safetensors.torch

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        safetensors.torch.save_file(sd, str(out / WEIGHTS_NAME))
        (out / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=1))
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> PriorTransformer:
        """Load a ``save_pretrained`` directory (tensors only: safetensors, no pickle)."""
        import safetensors.torch

        p = Path(path)
        cfg_file = p / CONFIG_NAME
        if not cfg_file.is_file() or not (p / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{str(p)!r} holds no prior: expected {CONFIG_NAME} + {WEIGHTS_NAME} (an export of "
                "`python -m revq_ray.prior`: <run>/export/best or export/latest)"
            )
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: field 'format' is {cfg.get('format')!r}, not a {FORMAT!r} model")
        if int(cfg.get("version", 0)) > VERSION:
            raise ValueError(f"{cfg_file}: field 'version' {cfg['version']} is newer than this revq-ray")
        model = cls(PriorSpec(**cfg["spec"]), meta=cfg.get("meta") or {})
        model.load_state_dict(safetensors.torch.load_file(str(p / WEIGHTS_NAME)))
        return model.to(device).eval()
