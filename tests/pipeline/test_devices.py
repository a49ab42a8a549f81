"""`use_gpu` on the driver: what a stage asks Ray for. (Which device each task then takes, on
a Ray that declares a GPU this machine lacks: tests/jobs/test_train_job.py, which shares that
Ray with its run.)"""

from __future__ import annotations

import pytest

from pipeline import devices


def _publish_cluster_config(gpus_per_node: int, max_nodes: int) -> None:
    """What an autoscaler publishes in the GCS: a CPU head type plus one worker type."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_put

    config = autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 8}, max_count=1),
            autoscaler_pb2.NodeGroupConfig(
                name="gpu_worker",
                resources={"CPU": 8, "GPU": gpus_per_node},
                min_count=0,
                max_count=max_nodes,
            ),
        ]
    )
    _internal_kv_put(
        ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
        config.SerializeToString(),
        overwrite=True,
        namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(),
    )


def test_auto_asks_for_gpus_when_the_autoscaler_can_add_gpu_nodes(ray_session):
    """cluster.yaml's GPU types start at min_workers 0: a fresh cluster has no GPU up, and
    `auto` chose the CPU for every stage."""
    import ray._raylet
    from ray.experimental.internal_kv import _internal_kv_del

    assert ray_session.cluster_resources().get("GPU", 0) == 0
    assert devices.resolve_use_gpu("auto") is False  # no GPU, no autoscaler
    try:
        _publish_cluster_config(gpus_per_node=1, max_nodes=4)
        assert devices.autoscaler_max_gpus() == 4
        assert devices.resolve_use_gpu("auto") is True
        assert devices.resolve_use_gpu("false") is False
    finally:
        _internal_kv_del(
            ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
            namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(),
        )
    assert devices.resolve_use_gpu("auto") is False
    with pytest.raises(ValueError, match="auto|true|false"):
        devices.resolve_use_gpu("maybe")
