"""Multi-node training on a simulated cluster (`ray.cluster_utils.Cluster`: a head and a worker node, each with its
own raylet, on this machine), workers spread across nodes (STRICT_SPREAD), checkpoints, metrics and export on the
loopback S3.

The session already has a local Ray (`ray_session`), so the cluster lives in a subprocess of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    sys.path.insert(0, os.environ["TESTS_DIR"])
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from llm_platform import storage
    from llm_platform.config.model import ModelConfig
    from llm_platform.config.train import CheckpointConfig, OptimizerConfig, ScalingConfig, TrainConfig
    from llm_platform.train.launcher import launch
    from fixtures.training import make_dataset

    storage.configure({"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    root = os.environ["BUCKET"] + "/platform"
    dataset = make_dataset(root, "pretrain", seq_len=32)
    # The head's own dashboard (the State API below) on a free port: the session's local Ray may hold 8265.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dashboard_port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": dashboard_port})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}})
    try:
        tc = TrainConfig(max_steps=4, micro_batch_size=4, log_interval_steps=2, eval_interval_steps=4, eval_batches=1,
                         max_failures=0, checkpoint=CheckpointConfig(interval_steps=2),
                         optimizer=OptimizerConfig(warmup_steps=1))
        result = launch(ModelConfig(hidden_size=32, max_position_embeddings=64), tc,
                        ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD"), dataset, root,
                        run_name="spread")
        workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
        print("RESULT " + json.dumps({"run_uri": result.run_uri, "export_uri": result.export_uri,
                                      "checkpoint_uri": result.checkpoint_uri, "metrics": result.metrics,
                                      "nodes": sorted({w.node_id for w in workers})}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_nodes_spread_with_checkpoints_on_s3(s3_bucket, s3_server):
    from llm_platform import storage

    env = dict(os.environ, BUCKET=s3_bucket, AWS_ENDPOINT_URL=s3_server,
               TESTS_DIR=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])

    assert len(out["nodes"]) == 2  # one worker per node
    assert out["run_uri"].startswith("s3://") and out["metrics"]["step"] == 4
    assert out["checkpoint_uri"].endswith("checkpoint_00000004")
    names = storage.listdir(out["checkpoint_uri"])
    # both ranks' DCP shards merged into one checkpoint, plus the metadata and the train state
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.json"} <= set(names)
    assert storage.exists(storage.join(out["run_uri"], "metrics.jsonl"))
    assert storage.exists(storage.join(out["run_uri"], "lineage.json"))
    assert storage.exists(storage.join(out["export_uri"], "model.safetensors"))
