"""The fast training-step paths give the plain paths' results (benchmarks/train_step.py measures their speed).

- chunked matmul search (``nearest_code``) vs the reference's ``vmap(cdist + min)``;
- sparse codebook gradient (``GroupedVQ.sparse_grad``) vs the dense one;
- :class:`RowSparseAdamW` vs ``torch.optim.AdamW`` (equal where the semantics agree, and the documented
  difference where they do not) and vs ``torch.optim.SparseAdam`` (the same lazy semantics);
- sync-free, sparse-aware per-module clipping vs ``torch.nn.utils.clip_grad_norm_``;
- a whole ReVQModel step through the fast path vs the reference recipe;
- the channels_last rectifier vs the default layout.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from revq_ray.config import ModelConfig, TrainConfig
from revq_ray.core.model import ReVQModel
from revq_ray.core.optim import RowSparseAdamW, build_optimizer, build_train_optimizer, clip_grad_norms_
from revq_ray.core.quantizers.grouped import gather_codes
from revq_ray.core.quantizers.search import nearest_code

pytestmark = pytest.mark.core


def reference_search(tokens_btd: torch.Tensor, codebook_gkd: torch.Tensor):
    """The ReVQ reference: ``vmap(cdist + min, chunk_size=2)`` over groups -> (ids_bt, euclidean dist_bt)."""

    def find_nearest(x, y):
        dist, ids = torch.min(torch.cdist(x, y), dim=-1)
        return dist, ids

    with torch.no_grad():
        dist_gb, ids_gb = torch.vmap(find_nearest, in_dims=0, out_dims=0, chunk_size=2)(
            tokens_btd.transpose(0, 1), codebook_gkd
        )
    return ids_gb.t(), dist_gb.t()


def _sparse_grad(G=3, K=6, d=2, rows=((0, 1), (0, 1), (2, 5), (1, 0)), seed=0) -> torch.Tensor:
    """An uncoalesced sparse (G, K, d) gradient with a duplicated row."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(rows, dtype=torch.long).t()
    return torch.sparse_coo_tensor(idx, torch.randn(idx.shape[1], d, generator=g), (G, K, d))


# ------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("G,K,d,B", [(8, 300, 4, 16), (4, 1000, 8, 9)])
def test_chunked_search_matches_cdist(G, K, d, B):
    g = torch.Generator().manual_seed(G * K)
    codebook = torch.randn(G, K, d, generator=g)
    # Tokens near one code each (plus some plain random ones): a clear nearest code, no float near-ties.
    pick = torch.randint(K, (B, G), generator=g)
    tokens = codebook[torch.arange(G), pick] + 0.05 * torch.randn(B, G, d, generator=g)
    tokens[: B // 3] = torch.randn(B // 3, G, d, generator=g)
    ids, d2 = nearest_code(tokens, codebook, budget_mb=0.25)  # a tiny budget: many chunks
    ids_ref, dist_ref = reference_search(tokens, codebook)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(d2.sqrt(), dist_ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ sparse grad
def test_sparse_gather_values_and_grad_match_dense():
    G, K, d, B = 5, 7, 3, 11
    g = torch.Generator().manual_seed(1)
    cb = torch.randn(G, K, d, generator=g)
    ids = torch.randint(K, (B, G), generator=g)  # B > K: duplicates certain
    w = torch.randn(B, G, d, generator=g)
    a, b = torch.nn.Parameter(cb.clone()), torch.nn.Parameter(cb.clone())
    qa, qb = gather_codes(a, ids), gather_codes(b, ids, sparse=True)
    assert torch.equal(qa, qb)
    (qa * w).sum().backward()
    (qb * w).sum().backward()
    assert b.grad.is_sparse and not a.grad.is_sparse
    assert b.grad._nnz() == B * G  # only looked-up rows, duplicates not summed yet
    torch.testing.assert_close(b.grad.to_dense(), a.grad, rtol=0, atol=1e-6)
    # Without grad mode (eval, encode) it is the plain lookup.
    with torch.no_grad():
        assert torch.equal(gather_codes(b, ids, sparse=True), qa)


def test_grouped_vq_sparse_grad_same_losses_and_grads():
    cfg = ModelConfig.model_validate(
        {"quantizer": {"tokens": 16, "codebook_size": 8}, "rectifier": {"type": "identity"}}
    )
    torch.manual_seed(0)
    dense = ReVQModel.from_config([4, 4, 4], cfg)
    sparse = copy.deepcopy(dense)
    sparse.quantizer.sparse_grad = True
    z = torch.randn(6, 4, 4, 4)
    od, os_ = dense(z), sparse(z)
    assert torch.equal(od.ids_bt, os_.ids_bt)
    for k in od.losses:
        assert torch.equal(od.losses[k], os_.losses[k])
    od.loss.backward()
    os_.loss.backward()
    gs = sparse.quantizer.codebook.grad
    assert gs.is_sparse
    torch.testing.assert_close(gs.to_dense(), dense.quantizer.codebook.grad, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------ optimizer
def _dense_and_sparse_steps(grads_per_step, wd=0.0, lr=0.05, foreach=False):
    """Run AdamW on densified grads and RowSparseAdamW on the sparse grads from the same start."""
    start = torch.randn(grads_per_step[0].shape, generator=torch.Generator().manual_seed(7))
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    oa = torch.optim.AdamW([a], lr=lr, weight_decay=wd, foreach=foreach)
    ob = RowSparseAdamW([b], lr=lr, weight_decay=wd)
    for gr in grads_per_step:
        a.grad = gr.to_dense()
        b.grad = gr
        oa.step()
        ob.step()
    return start, a.detach(), b.detach(), ob


def test_row_sparse_adamw_first_step_equals_adamw_everywhere():
    gr = _sparse_grad()
    start, a, b, _ = _dense_and_sparse_steps([gr])
    # Moments start at zero: dense AdamW leaves rows without gradient where they are, like the lazy update.
    assert torch.equal(a, b)
    assert not torch.equal(a, start)


def test_row_sparse_adamw_weight_decay_only_on_rows_with_gradient():
    gr = _sparse_grad()
    start, a, b, _ = _dense_and_sparse_steps([gr], wd=0.1)
    hit = gr.coalesce().to_dense().abs().sum(-1) > 0  # (G, K)
    assert torch.equal(a[hit], b[hit])  # same update (decay included) on rows with gradient
    assert torch.equal(b[~hit], start[~hit])  # lazy: untouched
    torch.testing.assert_close(a[~hit], start[~hit] * (1 - 0.05 * 0.1))  # dense: decayed


def test_row_sparse_adamw_matches_adamw_on_rows_hit_every_step_and_differs_elsewhere():
    always = [(0, 0), (1, 3)]
    steps = [
        _sparse_grad(rows=always + [(2, 2)], seed=1),  # (2, 2) hit at step 1 only
        _sparse_grad(rows=always + [(0, 5), (0, 5)], seed=2),  # (0, 5) first hit at step 2 (zero moments)
        _sparse_grad(rows=always + [(0, 5), (2, 2)], seed=3),  # (2, 2) hit again after a gap
        _sparse_grad(rows=always, seed=4),
    ]
    start, a, b, opt = _dense_and_sparse_steps(steps)
    for g, k in always:
        assert torch.equal(a[g, k], b[g, k]), (g, k)
    never = torch.ones(3, 6, dtype=torch.bool)
    for g, k in always + [(2, 2), (0, 5)]:
        never[g, k] = False
    assert torch.equal(a[never], b[never]) and torch.equal(b[never], start[never])
    # The documented difference: after a gap dense AdamW keeps moving and decaying, lazy Adam does not.
    assert not torch.allclose(a[2, 2], b[2, 2])
    assert not torch.allclose(a[0, 5], b[0, 5])  # hit at steps 2-3, dense kept drifting it at step 4
    # State has AdamW's layout (code that clears the moments of reset rows relies on it).
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and float(st["step"]) == len(steps)


def test_row_sparse_adamw_is_lazy_adam_like_sparse_adam():
    rows = [[(0, 0), (1, 1)], [(1, 1)], [(0, 0), (2, 4)]]
    steps = [_sparse_grad(rows=r, seed=i) for i, r in enumerate(rows)]
    start = torch.randn(3, 6, 2)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    oa = torch.optim.SparseAdam([a], lr=0.05)
    ob = RowSparseAdamW([b], lr=0.05, weight_decay=0.0)
    for gr in steps:
        a.grad, b.grad = gr.coalesce(), gr
        oa.step()
        ob.step()
    # SparseAdam folds the bias corrections into the step size (eps placement differs): equal to rounding.
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_row_sparse_adamw_dense_grads_are_plain_adamw():
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    oa = torch.optim.AdamW([a], lr=0.01, weight_decay=0.01)
    ob = RowSparseAdamW([b], lr=0.01, weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(4, 3)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ clipping
def test_clip_grad_norms_matches_torch_per_group_dense_and_sparse():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 4)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    grads = [torch.randn(5, 4) * s for s in (3.0, 0.1, 0.2)]
    for p, r, g in zip(ps, ref, grads):
        p.grad, r.grad = g.clone(), g.clone()
    norms = clip_grad_norms_({"a": ps[:1], "b": ps[1:]}, 1.0)
    na = torch.nn.utils.clip_grad_norm_(ref[:1], 1.0)
    nb = torch.nn.utils.clip_grad_norm_(ref[1:], 1.0)
    assert isinstance(norms["a"], torch.Tensor)  # no host sync: the caller decides when to read it
    torch.testing.assert_close(norms["a"], na)
    torch.testing.assert_close(norms["b"], nb)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.grad, r.grad)
    # Sparse: duplicate rows add up before the norm; the clipped gradient equals the densified clip.
    cb = torch.nn.Parameter(torch.zeros(3, 6, 2))
    dense = torch.nn.Parameter(torch.zeros(3, 6, 2))
    gr = _sparse_grad() * 10.0
    cb.grad, dense.grad = gr, gr.to_dense()
    n_sparse = clip_grad_norms_({"codebook": [cb]}, 1.0)["codebook"]
    n_dense = torch.nn.utils.clip_grad_norm_([dense], 1.0)
    assert cb.grad.is_sparse and cb.grad.is_coalesced()
    torch.testing.assert_close(n_sparse, n_dense)
    torch.testing.assert_close(cb.grad.to_dense(), dense.grad)


# ------------------------------------------------------------------------------------------ whole step
def _tiny_model() -> ReVQModel:
    cfg = ModelConfig.model_validate(
        {
            "quantizer": {"tokens": 16, "codebook_size": 32},
            "rectifier": {"type": "vit", "width": 32, "depth": 1, "head_dim": 16, "expand_ratio": 2.0},
        }
    )
    torch.manual_seed(0)
    m = ReVQModel.from_config([4, 4, 4], cfg)
    torch.nn.init.normal_(m.rectifier.head.weight, std=0.02)  # so every rectifier layer gets gradient
    return m


def _reference_step(model: ReVQModel, opt: torch.optim.Optimizer, z: torch.Tensor) -> torch.Tensor:
    """The reference recipe's step on ``model`` (dense grads, torch clipping per module, AdamW)."""
    z_std = model.standardizer(z)
    tokens = model.layout.to_tokens(z_std)
    ids, _ = reference_search(tokens, model.quantizer.codebook.detach())
    G, K, d = model.quantizer.codebook.shape
    q = model.quantizer.codebook.view(-1, d)[(ids + torch.arange(G) * K).reshape(-1)].view(tokens.shape)
    loss_q = F.mse_loss(q, tokens.detach())
    rec = model.rectifier(model.layout.to_latent(q.detach()))
    loss = loss_q + F.mse_loss(rec, z_std)
    loss.backward()
    for ps in model.param_groups().values():
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ids


@pytest.mark.parametrize("sparse", [False, True])
def test_fast_step_matches_reference_recipe(sparse):
    ref = _tiny_model()
    fast = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW(
        [
            {"params": [ref.quantizer.codebook], "lr": 1e-2, "weight_decay": 0.0},
            {"params": list(ref.rectifier.parameters()), "lr": 5e-4, "weight_decay": 1e-4},
        ]
    )
    opt_fast = build_optimizer(fast, lr=1e-2, sparse_codebook=sparse, fused=True)
    assert fast.quantizer.sparse_grad is sparse
    fast.rectifier.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 4, 4, 4, generator=g)
    ids_ref = _reference_step(ref, opt_ref, z)
    out = fast(z)
    assert torch.equal(out.ids_bt, ids_ref)
    out.loss.backward()
    norms = clip_grad_norms_({grp["name"]: grp["params"] for grp in opt_fast.param_groups}, 1.0)
    assert set(norms) == {"codebook", "rectifier"}
    opt_fast.step()
    opt_fast.zero_grad(set_to_none=True)
    # One step from zero moments: lazy == dense everywhere; fused AdamW and channels_last only reorder sums.
    torch.testing.assert_close(fast.quantizer.codebook, ref.quantizer.codebook, rtol=1e-5, atol=1e-6)
    for (n, pf), pr in zip(fast.rectifier.named_parameters(), ref.rectifier.parameters()):
        torch.testing.assert_close(pf, pr, rtol=1e-4, atol=1e-6, msg=n)


def test_channels_last_rectifier_matches_default_layout():
    m = _tiny_model().rectifier
    cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    x = torch.randn(5, 4, 4, 4)
    ya, yb = m(x), cl(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    assert yb.shape == ya.shape
    ya.square().mean().backward()
    yb.square().mean().backward()
    for (n, pa), pb in zip(m.named_parameters(), cl.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_build_optimizer_groups_and_rejects_sparse_without_codebook():
    m = _tiny_model()
    opt = build_optimizer(m, lr=1e-3)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["codebook", "rectifier"]
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-5) and opt.param_groups[1]["weight_decay"] == 1e-4
    assert opt.param_groups[0]["weight_decay"] == 0.0 and not m.quantizer.sparse_grad
    gq = ReVQModel.from_config(
        [4, 4, 4], ModelConfig.model_validate({"quantizer": {"type": "gq", "tokens": 16, "codebook_size": 8}})
    )
    with pytest.raises(ValueError, match="codebook_update=rows_lazy"):
        build_optimizer(gq, lr=1e-3, sparse_codebook=True)


def test_build_train_optimizer_reads_the_config_fields():
    m = _tiny_model()
    opt = build_train_optimizer(
        m, TrainConfig(lr=2e-3, codebook_update="rows_lazy", fused_optimizer=True, channels_last=True)
    )
    assert m.quantizer.sparse_grad and opt.param_groups[0]["lr"] == 2e-3 and opt.defaults["fused"]
    assert m.rectifier.stem.weight.is_contiguous(memory_format=torch.channels_last)
    plain = _tiny_model()
    opt = build_train_optimizer(
        plain, TrainConfig(codebook_update="dense", fused_optimizer=False, channels_last=False)
    )
    assert not plain.quantizer.sparse_grad and not opt.defaults["fused"]
    assert not plain.rectifier.stem.weight.is_contiguous(memory_format=torch.channels_last)
    default = _tiny_model()  # the defaults: fused AdamW, channels_last at ZeRO 0, lazy codebook (auto)
    opt = build_train_optimizer(default, TrainConfig())
    assert opt.defaults["fused"] and default.rectifier.stem.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert default.quantizer.sparse_grad
    rows = _tiny_model()  # rows: in one process there is nothing to exchange, the update is dense AdamW
    build_train_optimizer(rows, TrainConfig(codebook_update="rows"))
    assert not rows.quantizer.sparse_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs CUDA")
def test_dense_fast_step_has_no_host_sync_on_cuda():  # pragma: no cover - no GPU in CI
    m = _tiny_model().cuda()
    opt = build_optimizer(m, lr=1e-3, fused=True)
    z = torch.randn(8, 4, 4, 4, device="cuda")
    groups = {g["name"]: g["params"] for g in opt.param_groups}
    m(z).loss.backward()  # warm-up (lazy state init)
    clip_grad_norms_(groups, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = m(z)
        out.loss.backward()
        clip_grad_norms_(groups, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------ row exchange
def test_exchange_sparse_rows_equals_the_dense_all_reduce_average():
    """Three simulated ranks (the gather is injected): the union of their touched rows, summed per row and
    scaled by 1 / world, equals the dense average of their gradients; a rank without rows still works."""
    from revq_ray.core.optim import exchange_sparse_rows, local_gather

    p = torch.zeros(3, 6, 2)
    ranks = [
        _sparse_grad(seed=0),
        _sparse_grad(rows=((0, 1), (2, 2), (2, 2)), seed=1),
        torch.sparse_coo_tensor(torch.empty(2, 0, dtype=torch.long), torch.empty(0, 2), (3, 6, 2)),
    ]
    packed = {}

    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        # Every rank's packed (row index, row) tensor, as an all-gather would hand them back.
        packed["me"] = t
        return [t] + [others_packed[i] for i in (1, 2)]

    # Each rank's own packed tensor, from the single-process path.
    others_packed = {}
    for i in (1, 2):
        exchange_sparse_rows(p, ranks[i], lambda t, i=i: others_packed.__setitem__(i, t) or [t])
    got = exchange_sparse_rows(p, ranks[0], gather, world_size=3)
    want = sum(g.to_dense() for g in ranks) / 3
    assert got.is_sparse and got.is_coalesced() and got.sparse_dim() == 2
    torch.testing.assert_close(got.to_dense(), want, rtol=1e-6, atol=0)
    assert packed["me"].dtype == torch.float32 and packed["me"].shape[1] == 1 + 2
    # one process: the coalesced local gradient, unchanged
    local = exchange_sparse_rows(p, ranks[1], local_gather)
    torch.testing.assert_close(local.to_dense(), ranks[1].to_dense())
    with pytest.raises(ValueError, match="fp32"):
        exchange_sparse_rows(p.double(), ranks[0].double())
