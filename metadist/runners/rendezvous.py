"""The workers' process group, with a rendezvous that listens only where Ray does.

Ray Train's ``TorchConfig`` has torch's rank 0 open the rendezvous ``TCPStore``, and
torch binds that store to every interface, whatever address it is given: a local run
that keeps all of Ray on 127.0.0.1 would still listen on the machine's outward address.
Here rank 0 binds the socket itself, to the address Ray uses for its node (127.0.0.1 on
the Ray that metadist starts, the node's cluster address otherwise), and hands torch the
listening descriptor (``master_listen_fd``). Everything else, the backend choice, the
environment that torch expects and the shutdown, is Ray Train's.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

# Rank 0's server end, kept for as long as its process group lives.
_served: dist.TCPStore | None = None


def _serve(world_size: int, timeout_s: int) -> tuple[str, int]:
    global _served
    host = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family, backlog=1024)
    port = listener.getsockname()[1]
    # detach(): the store owns the descriptor from now on and closes it.
    _served = dist.TCPStore(host, port, world_size, is_master=True,
                            timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                            master_listen_fd=listener.detach())
    return host, port


def _join(backend: str, rank: int, world_size: int, host: str, port: int,
          timeout_s: int) -> None:
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        # As Ray Train does: a hung collective fails the worker instead of blocking it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))
    store = _served if rank == 0 else dist.TCPStore(host, port, world_size,
                                                     is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)


def _release() -> None:
    global _served
    _served = None


class _BoundBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        world_size = len(worker_group)
        host, port = worker_group.execute_single(0, _serve, world_size,
                                                 backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(
            rank, _join, backend, rank, world_size, host, port, backend_config.timeout_s)
            for rank in range(world_size)])

    def on_shutdown(self, worker_group, backend_config) -> None:
        super().on_shutdown(worker_group, backend_config)
        worker_group.execute(_release)


@dataclass
class BoundRendezvous(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on the rank-0 node's Ray address."""

    @property
    def backend_cls(self):
        return _BoundBackend
