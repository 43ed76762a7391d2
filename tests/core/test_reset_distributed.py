"""Two real gloo processes, different local data: after a reset both hold bit-identical codebooks, equal to a
single process that saw all the data (the reset used the all-reduced counts and the same noise)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from revq_ray.core.quantizers import GroupedVQ, ResetParams

pytestmark = pytest.mark.core

G, K, D, STEPS, BATCH = 3, 32, 4, 3, 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(reduce_fn=None) -> GroupedVQ:
    torch.manual_seed(0)  # same initial codebook everywhere (a trainer broadcasts it; here: same seed)
    kw = {"reduce_fn": reduce_fn} if reduce_fn is not None else {}
    return GroupedVQ(G, D, K, reset_cfg=ResetParams(ratio=0.5, noise=0.1), **kw).train()


def _local_batches(rank: int) -> list[torch.Tensor]:
    # Each rank sees data near a different half of the codes: locally-dead codes differ between ranks.
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        torch.manual_seed(0)
        cb = torch.randn(G, K, D)  # the initial codebook (same draw as _build)
    lo, hi = (0, 12) if rank == 0 else (8, 24)  # codes 24.. are dead everywhere, 12..23 only on rank 0
    out = []
    for _ in range(STEPS):
        pick = torch.randint(lo, hi, (BATCH, G), generator=g)
        out.append(cb[torch.arange(G), pick] + 0.01 * torch.randn(BATCH, G, D, generator=g))
    return out


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q = _build(_all_reduce_sum)
        with torch.no_grad():
            for batch in _local_batches(rank):
                q(batch)
        local_counts = q.counts.clone()
        report = q.maybe_reset(torch.Generator().manual_seed(1234))
        torch.save(
            {
                "codebook": q.codebook.detach().clone(),
                "local_counts": local_counts,
                "groups": report.groups,
                "codes": report.codes,
                "counts_after": q.counts.clone(),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reset_identically(tmp_path):
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    # The ranks saw different data...
    assert not torch.equal(r0["local_counts"], r1["local_counts"])
    # ...yet reset the same rows to bit-identical values.
    assert torch.equal(r0["codebook"], r1["codebook"])
    assert torch.equal(r0["groups"], r1["groups"]) and torch.equal(r0["codes"], r1["codes"])
    assert r0["groups"].numel() > 0
    assert r0["counts_after"].sum() == 0 and r1["counts_after"].sum() == 0

    # Global semantics: a code used only on rank 1 is not dead, even though rank 0 never hit it.
    global_counts = r0["local_counts"] + r1["local_counts"]
    reset_mask = torch.zeros(G, K, dtype=torch.bool)
    reset_mask[r0["groups"], r0["codes"]] = True
    assert torch.all(global_counts[reset_mask] == 0)
    only_rank1 = (r0["local_counts"] == 0) & (r1["local_counts"] > 0)
    assert only_rank1.any() and not (reset_mask & only_rank1).any()

    # Same as one process that saw both ranks' data with the same generator seed.
    single = _build()
    with torch.no_grad():
        for batch in _local_batches(0) + _local_batches(1):
            single(batch)
    assert torch.equal(single.counts, global_counts)
    single.maybe_reset(torch.Generator().manual_seed(1234))
    assert torch.equal(single.codebook.detach(), r0["codebook"])
