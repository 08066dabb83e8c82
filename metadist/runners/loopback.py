"""Every Ray that metadist starts listens on 127.0.0.1 only: the local instance a run or a
sweep starts (``init_ray``) and each node of ``metadist cluster up --local``.

Ray 2.60 has no public switch for it. Given ``127.0.0.1`` as the node's address, Ray
swaps it for the machine's outward IP (``resolve_ip_for_localhost``), and its gRPC servers
(GCS, raylet, workers, dashboard agent, runtime-env agent) then listen on every
interface. Two things keep them on loopback, both needed (each alone leaves servers on
``*``): the private function patched to leave the address alone, and
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch for "this host's address is
loopback", which every process Ray starts inherits (it also keeps a driver that connects
to ``127.0.0.1:PORT`` from being redirected to the outward IP). ``test_ray_train`` and
``test_jobs`` list the sockets of what Ray started and fail if any is off loopback: a Ray
release that renames the function shows there.
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def keep_ray_on_loopback() -> None:
    """Call in the process that starts Ray, before it does."""
    import ray._private.services as services

    services.resolve_ip_for_localhost = lambda host: host
    os.environ.update(LOOPBACK_ENV)


def keep_serve_replica_on_node_address() -> None:
    """Call in a Ray Serve replica's constructor. Ray Serve 2.60 then starts the replica's
    inter-deployment gRPC server on every interface (``"[::]:0"`` in
    ``ray.serve._private.replica``), whatever the node's address; this binds it to the
    node's address instead (127.0.0.1 on a Ray metadist started), which is where Serve's
    routers connect to it (``node_ip:port``). A Ray that no longer binds it this way is an
    error, not a replica listening everywhere unnoticed."""
    import ray
    import ray.serve._private.replica as replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:
        raise RuntimeError("this Ray Serve no longer starts its replica's gRPC server "
                           "through add_port_to_grpc_server: metadist cannot keep it off "
                           "the machine's other interfaces (metadist/runners/loopback.py)")
    if getattr(bind, "on_node_address", False):
        return
    host = ray.util.get_node_ip_address()
    host = f"[{host}]" if ":" in host else host

    def on_node_address(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return bind(server, address)

    on_node_address.on_node_address = True
    replica.add_port_to_grpc_server = on_node_address
