"""Keep a one-machine pool's rendezvous off the network.

torch's TCPStore (env://) listens on every interface whatever MASTER_ADDR says, and gloo and
NCCL pick their socket interface from the host name. A local pool needs no network at all: its
ranks meet in a FileStore inside the pool's private folder, and gloo/NCCL are told to use the
loopback interface (unless the user chose one). Multi-node pools and Ray keep their TCP paths.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from . import protocol

# gloo (CPU workers) and NCCL's bootstrap (GPU workers) read these.
SOCKET_INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def loopback_interface() -> str | None:
    """The name of the loopback interface ("lo" on Linux, "lo0" on macOS), or None if none is found."""
    if not hasattr(socket, "if_nameindex"):
        return None
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), None)


def local_rendezvous_environment(store_file: Path, inherited: dict[str, str]) -> dict[str, str]:
    """Variables that make a local pool's ranks meet through ``store_file`` and talk over loopback."""
    env = {protocol.ENV_STORE_FILE: str(store_file)}
    interface = loopback_interface() if sys.platform != "win32" else None
    if interface is not None:
        for variable in SOCKET_INTERFACE_VARIABLES:
            if not inherited.get(variable):  # a user's explicit choice wins
                env[variable] = interface
    return env
