"""systemd integration without a dependency: ``sd_notify`` over ``NOTIFY_SOCKET``.

The master sends ``READY=1`` when every worker is ready, ``RELOADING=1`` when a reload
starts, ``STOPPING=1`` when it stops (``Type=notify`` units). Socket activation is in
:mod:`fcgi_manager.sockets` (``bind = "systemd"``).
"""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if message.startswith("RELOADING=1"):
        message += f"\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}"
    address = "\0" + path[1:] if path.startswith("@") else path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(address)
        sock.sendall(message.encode())
        return True
    except OSError:
        return False
    finally:
        sock.close()
