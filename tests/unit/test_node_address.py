"""The trainer's rendezvous address (process group and weight group) is the node's IP as Ray
knows it, never the hostname's address (127.0.1.1 on stock Debian/Ubuntu)."""

from __future__ import annotations

import socket

import ray

from cai_ray.actors import trainer
from cai_ray.actors.group import WorkerContext


def _worker() -> trainer.DistributedWorker:
    return trainer.DistributedWorker(WorkerContext("trainer", 0, 2))


def test_address_is_rays_node_ip_not_the_hostnames(monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostbyname", lambda _: "127.0.1.1")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    host, port = _worker().address()
    assert host == "10.0.0.7" and 0 < port < 65536


def test_address_outside_ray_is_loopback(monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostbyname", lambda _: "127.0.1.1")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert _worker().address()[0] == "127.0.0.1"
