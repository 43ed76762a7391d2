"""Two Ray nodes (ray.cluster_utils.Cluster on this machine): the two training workers land on different
nodes, train together (DeepSpeed over gloo across the two nodes) and finish with bit-identical state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # One "slot" per node and one slot per worker: two workers cannot share a node.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "resources": {"train_slot": 1}, "include_dashboard": False},
    )
    second = cluster.add_node(num_cpus=4, resources={"train_slot": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, second
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_workers_on_two_nodes(two_nodes, tmp_path):
    import ray

    from revq_ray.config import load_config
    from revq_ray.data.synthetic import write_synthetic_shards
    from revq_ray.train import run

    cluster, second = two_nodes
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, 320, (16, 8, 8), shard_size=80, seed=1)
    cfg = load_config(
        ROOT / "configs" / "debug.yaml",
        [
            "name=two_node",
            f"output_dir={tmp_path / 'runs'}",
            f"data.shards={shards}",
            "data.val_items=32",
            "train.num_workers=2",
            "train.zero_stage=1",
            "train.batch_size=32",
            "train.epochs=1",
            "train.cpus_per_worker=1",
            "train.resources_per_worker={train_slot: 1}",
            "train.export_all_ranks=true",
            "train.max_failures=0",
        ],
    )
    result = run(cfg)
    assert result.error is None and math.isfinite(result.metrics["val_mse"])
    run_dir = tmp_path / "runs" / "two_node"
    workers = json.loads((run_dir / "workers.json").read_text())
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    landed = {w["node_id"] for w in workers}
    assert len(workers) == 2 and len(landed) == 2 and landed <= nodes, workers
    assert second.node_id in landed  # the added (non-head) node ran a worker
    from safetensors.torch import load_file

    a, b = (load_file(str(run_dir / "ranks" / f"rank{r}.safetensors")) for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
