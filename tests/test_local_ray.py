"""A Ray instance mopd starts on this machine listens on the loopback address only (the issue: tests and local
runs bound the node, the object store and the learner group's rendezvous to the machine's network address)."""

from __future__ import annotations


def test_the_local_ray_node_and_its_workers_are_on_the_loopback_address(ray_local) -> None:
    ray = ray_local

    @ray.remote(num_cpus=0)
    def node_ip() -> str:
        return ray.util.get_node_ip_address()

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    assert ray.get(node_ip.remote()) == "127.0.0.1"
