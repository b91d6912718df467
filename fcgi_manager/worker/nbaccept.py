"""Accept unix-socket connections non-blocking: ``accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)``.

Why this exists: Python's ``socket.accept()`` passes only ``SOCK_CLOEXEC``, so every
accepted socket is blocking, and an ``AF_UNIX`` socket does not inherit ``SO_RCVTIMEO``
from its listener (TCP does). The worker's first read right after ``accept`` must never
block on a client that connected and sent nothing, so with a blocking socket it has to ask
first (one ``poll`` per connection). A socket accepted non-blocking is simply read: the
request is almost always there already (nginx writes it as soon as it connects), and when
it is not, the read fails with ``EAGAIN`` and the connection is parked in epoll. That is
one system call fewer per request, for a call through ctypes that costs a fraction of it.

Writes on such a socket never block either: the worker waits for room with ``poll``,
bounded by ``write_timeout`` (see ``Conn.send``), instead of relying on ``SO_SNDTIMEO``.

Only the number of the new socket is returned, no peer address: unix peers have none that
matters (``ClientFilter`` lets every unix peer through, file permissions decide).
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Optional

try:
    import ctypes
except ImportError:  # an interpreter built without ctypes: the worker probes instead
    ctypes = None  # type: ignore[assignment]  # the module or None: both paths are checked

_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)


def _libc_accept4() -> Optional[Callable[..., int]]:
    if ctypes is None or not hasattr(socket, "SOCK_NONBLOCK"):
        return None
    try:
        accept4 = ctypes.CDLL(None, use_errno=True).accept4
    except (OSError, AttributeError):
        return None
    accept4.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    accept4.restype = ctypes.c_int
    return accept4


# Looked up once at import, in the master before it forks: the workers share it.
_ACCEPT4 = _libc_accept4()


def nonblocking_acceptor(listen_fd: int) -> Optional[Callable[[], int]]:
    """A function that accepts one connection on ``listen_fd`` and returns its (non-blocking,
    close-on-exec) descriptor, raising ``OSError`` as ``socket.accept`` would
    (``BlockingIOError`` when none is waiting); None where ``accept4`` is not available."""
    accept4 = _ACCEPT4
    if accept4 is None:
        return None
    get_errno = ctypes.get_errno
    flags = _FLAGS

    def accept() -> int:
        fd = accept4(listen_fd, None, None, flags)
        if fd < 0:
            err = get_errno()
            raise OSError(err, os.strerror(err))  # the errno's subclass (BlockingIOError...)
        return fd

    return accept
