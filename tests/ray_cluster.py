"""A two-node Ray cluster on 127.0.0.1 for tests, run as its own process: ``python -m tests.ray_cluster``.

A head node (1 CPU, resource ``head``) and a worker node (2 CPUs, resource ``worker_node``), both real
raylets started with ``ray.cluster_utils.Cluster`` (Ray's own multi-node test harness), every listener on
loopback. ``ray start --address`` cannot be used for this on loopback: it refuses to join a second node
while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the setting that keeps Ray on 127.0.0.1), and without it
it rewrites 127.0.0.1 into the machine's external address.

``python -m tests.ray_cluster PORT`` puts the head's Ray Client server on PORT (the caller picks a free one,
as ``tests.conftest.free_port`` does, outside the ranges Ray's own processes take).

Protocol: one JSON line on stdout per command read from stdin.
  start (no command)  {"address": GCS address, "client_address": "ray://..." (Ray Client), "worker": node id}
  remove-worker       {"removed": node id}      the worker node's processes are killed, as by `ray stop` there
  add-worker          {"worker": node id}       a fresh worker node joins
  actors              {"actors": [{"class", "name", "state", "node"}], "nodes": {node id: alive}}
End of input shuts the cluster down.
"""
from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback addresses only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import ray  # noqa: E402
from ray._private import state  # noqa: E402  (actor placement without the dashboard's state API)
from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 128 << 20}


def main() -> None:
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    client_port = int(sys.argv[1])
    os.makedirs("/tmp/ray", exist_ok=True)  # the harness records the head's address there and assumes it exists
    cluster = Cluster(initialize_head=True, head_node_args={
        **NODE, "num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False, "temp_dir": temp_dir,
        "ray_client_server_port": client_port})
    worker = cluster.add_node(**NODE, num_cpus=2, resources={"worker_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")

    def reply(doc: dict) -> None:
        print(json.dumps(doc), flush=True)

    reply({"address": cluster.address, "client_address": f"ray://127.0.0.1:{client_port}", "worker": worker.node_id})
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "remove-worker":
                cluster.remove_node(worker)
                reply({"removed": worker.node_id})
            elif command == "add-worker":
                worker = cluster.add_node(**NODE, num_cpus=2, resources={"worker_node": 1})
                cluster.wait_for_nodes()
                reply({"worker": worker.node_id})
            elif command == "actors":
                actors = [{"class": a["ActorClassName"], "name": a["Name"], "state": a["State"],
                           "node": a["Address"]["NodeID"]} for a in state.actors().values()]
                reply({"actors": actors, "nodes": {n["NodeID"]: n["Alive"] for n in ray.nodes()}})
            else:
                reply({"error": f"unknown command {command!r}"})
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
