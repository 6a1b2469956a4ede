"""One rank of the Ray backend: a Ray actor that runs the worker's job loop (``rank_loop.serve``).

The host and the actor talk in the local pool's protocol messages, pickled as bytes: the host
calls ``deliver(data)`` for each message to the rank and keeps one ``messages(timeout)`` call
outstanding to collect the rank's replies and progress. Tensors ride inside the messages, so
Ray's object store carries them between nodes.

This module imports nothing but the standard library at its top, and reaches the engine by
the package name it is given: inside ComfyUI the host imports the engine under the pack's
name, which a Ray worker (on any node) cannot import, so there the host ships this class by
value and the actor imports the engine as installed (``comfy_xdit``).
"""

from __future__ import annotations

import importlib
import os
import pickle
import queue
import socket
import threading


class QueueChannel:
    """rank_loop's channel over two queues: the host's messages in, this rank's messages out."""

    def __init__(self, loads):
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self._loads = loads

    def send(self, message) -> None:
        self.outbox.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self):
        return self._loads(self.inbox.get())


class RankActor:
    """Rank ``rank`` of ``world_size``; ``package`` is the engine as this node imports it."""

    def __init__(self, package: str, host_package: str, rank: int, world_size: int):
        self._package = package
        self._protocol = importlib.import_module(f"{package}.pool.protocol")
        self._rename = (host_package, package)
        self._rank, self._world_size = rank, world_size
        self._channel = QueueChannel(self._loads)
        print(f"comfy_xdit Ray rank {rank}/{world_size} pid {os.getpid()}", flush=True)

    def _loads(self, data: bytes):
        return self._protocol.loads(data, rename=self._rename)

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port on it, where the group's store will listen (rank 0)."""
        import ray

        address = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((address, 0))
            return address, s.getsockname()[1]

    def start(self, init: bytes, master: tuple[str, int]) -> bytes | None:
        """Join the group and start serving jobs; returns a pickled Failed message if that failed.

        Readiness (or a later failure) is reported through ``messages`` like every other message.
        """
        protocol = self._protocol
        try:
            config = self._loads(init).config
            rank_loop = importlib.import_module(f"{self._package}.pool.rank_loop")
            # Ray gives each GPU actor its own GPU (CUDA_VISIBLE_DEVICES): it is always cuda:0 here.
            device = "cuda:0" if config.device_type == "cuda" else "cpu"
            address, port = master
            engine, info = rank_loop.start_engine(config, self._rank, self._world_size, device, None,
                                                  init_method=f"tcp://{address}:{port}")
        except BaseException as exc:
            import traceback

            traceback.print_exc()
            return pickle.dumps(protocol.Failed(protocol.STARTUP, self._rank, protocol.RemoteError.capture(exc)))
        import ray

        info["node"] = ray.util.get_node_ip_address()
        tensors = rank_loop.InlineTensors()
        threading.Thread(
            target=rank_loop.serve,
            args=(engine, self._channel, self._rank, tensors, info, lambda: None),
            name="comfy-xdit-rank",
            daemon=True,
        ).start()
        return None

    def deliver(self, data: bytes) -> None:
        self._channel.inbox.put(data)

    def messages(self, timeout: float) -> list[bytes]:
        """The rank's messages since the last call; waits up to ``timeout`` seconds for the first."""
        try:
            batch = [self._channel.outbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                batch.append(self._channel.outbox.get_nowait())
            except queue.Empty:
                return batch
