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


def test_a_local_instance_never_joins_another_cluster_on_this_machine(monkeypatch) -> None:
    """Without an address Ray joins $RAY_ADDRESS's cluster, or the last one `ray start` recorded here (another
    user's on a shared machine); `address="local"` is Ray's documented way to start a new one instead."""
    from mopd.runtime import start_local_ray

    calls: list[dict] = []

    class Recorder:
        def init(self, **options) -> None:
            calls.append(options)

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # start_local_ray sets it: restored after
    start_local_ray(Recorder(), num_cpus=2)
    assert calls == [{"address": "local", "include_dashboard": False, "_node_ip_address": "127.0.0.1",
                      "num_cpus": 2}]
