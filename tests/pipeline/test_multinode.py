"""Ray Train on a real multi-node cluster: STRICT_SPREAD placement survives losing a node.

The cluster is `ray.cluster_utils.Cluster` in this process: a head that runs the driver, the
Train controller and the dataset manager (0 CPUs, so no training worker lands there) and
worker nodes of 2 CPUs each (1 for a training worker, 1 for Ray Data's read/map tasks; with
1 CPU per node both would be taken by the training workers and the dataset would never
produce a batch). Removing a node kills its raylet and every process on it, the stand-in
for losing a GPU machine.

Each node keeps its own worker pool, so a Ray Data task that lands on a node whose idle
workers were reaped pays a fresh `import torch` (seconds on a loaded 2-core machine, every
epoch); the cluster keeps idle workers for the length of the test instead.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.train import CHECKPOINT_FILE, PROBE_DIR, load_training_checkpoint, run_training

NODE_CPUS = 2  # one training worker + one for Ray Data tasks
SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 300_000}


@pytest.fixture
def cluster(local_ray):
    """A head (0 CPUs) and two worker nodes; the session's local Ray is back afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    restore = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if restore:
            local_ray()


def _worker_nodes(run_dir: Path) -> dict[int, str]:
    """Rank -> node id prefix, from the storage probe each training worker writes at start."""
    nodes = {}
    for probe in (run_dir / PROBE_DIR).glob("worker-*"):
        node = probe.read_text()
        if node:  # empty while the worker is writing it
            nodes[int(probe.name.split("-")[1])] = node
    return nodes


def _wait_for(condition, thread: threading.Thread, outcome: dict, what: str, timeout: float):
    deadline = time.time() + timeout
    while not condition() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    assert condition(), f"{what}: {outcome.get('error') or 'timed out'}"


@pytest.mark.slow
def test_lost_node_restarts_workers_on_other_nodes_from_last_checkpoint(
    cluster, tiny_config, tiny_shards, tmp_path
):
    import ray

    cfg = tiny_config("train.epochs=6", "train.max_failures=3")
    run_dir = tmp_path / "spread"  # shared storage: all "nodes" run on this machine
    outcome: dict = {}

    def train():
        try:
            outcome["run"] = run_training(
                cfg,
                str(tiny_shards / "train"),
                storage_path=str(tmp_path),
                name="spread",
                num_workers=2,
                placement_strategy="STRICT_SPREAD",
            )
        except BaseException as e:  # surfaced by the assertions below
            outcome["error"] = e

    thread = threading.Thread(target=train)
    thread.start()
    try:
        # STRICT_SPREAD: one training worker on each worker node, none on the head.
        _wait_for(lambda: len(_worker_nodes(run_dir)) == 2, thread, outcome, "start", 120)
        before = _worker_nodes(run_dir)
        by_prefix = {node.node_id[:12]: node for node in cluster.worker_nodes}
        assert set(before.values()) == set(by_prefix), before

        # A spare node for the restarted worker group (add_node must run on the main thread).
        spare = cluster.add_node(num_cpus=NODE_CPUS)

        # Once epoch 2's checkpoint is on storage, epoch 0's is registered with the controller:
        # a worker's report queue holds one report (epoch 1's put waits until the controller's
        # poll took epoch 0's), and rank 0 uploads epoch 2's only after every rank passed the
        # report barrier of epoch 2. Epoch 1's file alone does not say so: epoch 0's report can
        # still sit in the queue (CI saw a fresh start that way).
        third = run_dir / "checkpoint_epoch_0002" / CHECKPOINT_FILE
        _wait_for(third.exists, thread, outcome, "epoch 2 checkpoint", 180)
        assert thread.is_alive(), "training finished before the node could be removed"
        lost = by_prefix[before[0]]  # the node of rank 0, the worker that writes checkpoints
        cluster.remove_node(lost)
    finally:
        thread.join(timeout=240)
    assert not thread.is_alive(), "training did not finish after the node was lost"
    assert "error" not in outcome, outcome.get("error")

    run = outcome["run"]
    assert run.result.metrics["epoch"] == 5  # completed the configured epochs
    # The restarted group loaded a registered checkpoint (-1 would be a fresh start). Epoch 1's
    # or 2's may still be unregistered when the node goes (the controller collects reports when
    # it polls the workers), so this is epoch 0's or a later one.
    assert run.result.metrics["resumed_from"] >= 0
    assert load_training_checkpoint(run.checkpoint_path)["epoch"] == 5

    # The restarted workers are on two different live nodes, neither of them the lost one.
    after = _worker_nodes(run_dir)
    alive = {n["NodeID"][:12] for n in ray.nodes() if n["Alive"]}
    assert len(set(after.values())) == 2 and set(after.values()) <= alive, after
    assert lost.node_id[:12] not in after.values()
    assert spare.node_id[:12] in after.values()
