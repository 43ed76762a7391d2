"""Chunked nearest-code search: exact against brute force, ties, and the memory budget."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from revq_ray.core.quantizers.search import MB, estimate_peak_bytes, nearest_code, plan_search

pytestmark = pytest.mark.core


def brute_force(tokens_btd: torch.Tensor, codebook_gkd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d2 = (tokens_btd[:, :, None, :] - codebook_gkd[None]).square().sum(-1)  # (B, G, K)
    return d2.argmin(-1), d2.min(-1).values


def separated(B: int, G: int, K: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 codes on a coarse grid and tokens close to one code each: a unique, well-separated nearest."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randint(-50, 50, (G, K, d), generator=g).double()
    pick = torch.randint(K, (B, G), generator=g)
    tokens = codebook[torch.arange(G), pick] + 0.01 * torch.randn(B, G, d, generator=g, dtype=torch.float64)
    return tokens, codebook


@pytest.mark.parametrize(
    "B,G,K,d,budget_mb,block",
    [
        (37, 3, 1000, 4, 0.05, 64),  # K not a multiple of the chunk or the block
        (5, 2, 7, 3, 0.001, 64),  # K smaller than a block
        (64, 4, 333, 8, 256.0, 64),  # one chunk
        (1, 1, 2, 1, 1.0, 64),
        (100, 5, 2049, 4, 0.03, 64),  # batch chunked too
        (33, 2, 515, 2, 0.02, 7),  # odd block
    ],
)
def test_matches_brute_force_float64(B, G, K, d, budget_mb, block):
    tokens, codebook = separated(B, G, K, d, seed=B + K)
    plan = plan_search(B, G, K, d, budget_mb=budget_mb, elem_bytes=8, block=block)
    if budget_mb < 1 and K > 100:
        assert plan.code_chunk < K, "the small budget must force code chunking"
    ids, dist = nearest_code(tokens, codebook, budget_mb, block=block)
    ref_ids, ref_dist = brute_force(tokens, codebook)
    assert ids.dtype == torch.int64 and ids.shape == (B, G)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(dist, ref_dist, rtol=0, atol=1e-12)


@pytest.mark.parametrize("target", [None, 4096, 1 << 16, 1 << 30])
def test_float32_random_distances_match(target):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(200, 6, 4, generator=g)
    codebook = torch.randn(6, 3001, 4, generator=g)
    ids, dist = nearest_code(tokens, codebook, 1.0, target_chunk_bytes=target)
    ref_ids, ref_dist = brute_force(tokens.double(), codebook.double())
    # float32 rounding may swap near-ties; the chosen code must still be (numerically) nearest.
    chosen = (tokens.double() - codebook.double()[torch.arange(6), ids]).square().sum(-1)
    torch.testing.assert_close(chosen, ref_dist, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-5)
    assert (ids == ref_ids).float().mean() > 0.99


@pytest.mark.parametrize("budget_mb,block", [(256.0, 64), (0.01, 64), (0.01, 8)])
def test_ties_resolve_to_lowest_index(budget_mb, block):
    # Integer-valued float64 data: every distance is computed exactly, so duplicates tie exactly.
    G, K, d = 2, 300, 3
    g = torch.Generator().manual_seed(1)
    codebook = torch.randint(-20, 20, (G, K, d), generator=g).double()
    codebook[:, 250] = codebook[:, 5]  # duplicate in another chunk/block
    codebook[:, 6] = codebook[:, 5]  # duplicate in the same block
    tokens = codebook[:, 5].unsqueeze(0).repeat(4, 1, 1)
    ids, dist = nearest_code(tokens, codebook, budget_mb, block=block)
    assert torch.equal(ids, torch.full((4, G), 5))
    assert torch.equal(dist, torch.zeros(4, G, dtype=torch.float64))
    assert torch.equal(ids, brute_force(tokens, codebook)[0])


@pytest.mark.parametrize(
    "B,G,K,d",
    [(256, 512, 16384, 4), (256, 256, 65536, 8), (256, 256, 262144, 8), (4096, 1, 1 << 20, 16), (3, 2, 5, 1)],
)
@pytest.mark.parametrize("budget_mb", [1.0, 16.0, 256.0])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_respects_budget(B, G, K, d, budget_mb, device):
    plan = plan_search(B, G, K, d, budget_mb=budget_mb, device=device)
    assert plan.peak_bytes <= budget_mb * MB
    assert plan.code_chunk % plan.block == 0
    assert 1 <= plan.group_chunk <= G and 1 <= plan.batch_chunk <= B
    again = estimate_peak_bytes(
        batch=B, groups=G, codes=K, dim=d, group_chunk=plan.group_chunk, batch_chunk=plan.batch_chunk,
        code_chunk=plan.code_chunk, block=plan.block, final_rows=plan.final_rows,
        bias_per_chunk=plan.bias_per_chunk,
    )  # fmt: skip
    assert again == plan.peak_bytes
    # A full (B, K) distance matrix of one group would not fit: the plan must chunk the codes or rows.
    if budget_mb * MB < B * K * 4:
        assert plan.batch_chunk * plan.code_chunk * 4 <= budget_mb * MB


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="search_budget_mb"):
        plan_search(1, 1, 1 << 20, 4, budget_mb=0.001)
    with pytest.raises(ValueError, match="search_budget_mb"):
        plan_search(1, 1, 8, 4, budget_mb=-1)
    # 0 = auto: a fixed 256 MB on CPU
    assert plan_search(1, 1, 8, 4, budget_mb=0).peak_bytes <= 256 * (1 << 20)


def test_shape_errors():
    with pytest.raises(ValueError, match="one codebook per token"):
        nearest_code(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="expected tokens"):
        nearest_code(torch.zeros(2, 4), torch.zeros(2, 5, 4))


def test_half_precision_inputs_search_in_float32():
    tokens, codebook = separated(16, 2, 100, 4, seed=3)
    ids, dist = nearest_code(tokens.to(torch.bfloat16) / 64, codebook.to(torch.bfloat16) / 64)
    assert dist.dtype == torch.float32
    ref, _ = brute_force(tokens.to(torch.bfloat16).double() / 64, codebook.to(torch.bfloat16).double() / 64)
    assert torch.equal(ids, ref)


def test_measured_memory_stays_within_budget():
    """In a fresh process: a search whose full distance matrix would be 256 MiB raises the RSS high-water
    mark by far less than that (the budget is 8 MB; allow allocator slack)."""
    script = textwrap.dedent(
        """
        import resource, torch
        torch.set_num_threads(1)
        from revq_ray.core.quantizers.search import nearest_code
        g = torch.Generator().manual_seed(0)
        tokens = torch.randn(128, 1, 4, generator=g)
        codebook = torch.randn(1, 1 << 19, 4, generator=g)
        nearest_code(tokens[:2], codebook[:, :1024], 8.0)  # warm up allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ids, _ = nearest_code(tokens, codebook, 8.0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    delta = int(out.stdout.strip().splitlines()[-1])
    full_matrix = 128 * (1 << 19) * 4
    assert delta < 32 * MB, (
        f"RSS grew by {delta / MB:.1f} MB (full matrix would be {full_matrix / MB:.0f} MB)"
    )
