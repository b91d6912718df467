"""Listening sockets: parse ``bind``, create or inherit the socket, read its queue.

Bind forms: ``unix:/path`` (or an absolute path), ``127.0.0.1:9000``, ``[::1]:9000``,
``:9000`` (all IPv4 addresses), ``fd:N`` (an inherited listening socket, 0 being
FCGI_LISTENSOCK_FILENO), ``systemd`` (socket activation, ``LISTEN_FDS``).

A unix socket file left by a dead owner is stale: ``connect()`` is refused, so it is
removed and bound anew; one that accepts the connection belongs to a live server and is an
error (spawn-fcgi's rule; blind unlinking would steal a running instance's address).
Permissions are set with the umask around ``bind``, then owner, group and mode are applied
before ``listen``, so the web server never sees the socket with the wrong access.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

from .errors import BindError, ConfigError

SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class Address:
    kind: str  # "unix", "tcp", "fd", "systemd"
    path: str = ""
    host: str = ""
    port: int = 0
    fd: int = -1

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "tcp":
            return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.kind == "fd":
            return f"fd:{self.fd}"
        return "systemd"


def parse_address(bind: str, key: str = "listen.bind") -> Address:
    text = bind.strip()
    if text == "systemd":
        return Address("systemd")
    if text.startswith("fd:"):
        try:
            return Address("fd", fd=int(text[3:]))
        except ValueError:
            raise ConfigError(f"{key}: {bind!r}: expected fd:N, like fd:0") from None
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"{key}: {bind!r}: unix: needs a path")
        return Address("unix", path=path)
    if text.startswith("/"):
        return Address("unix", path=text)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{key}: {bind!r}: write IPv6 addresses as [::1]:9000")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ConfigError(
                f"{key}: cannot read {bind!r}",
                'use "unix:/path/to/sock", "127.0.0.1:9000", "[::1]:9000", "fd:0" or "systemd"',
            )
        host = host or "0.0.0.0"
    try:
        port_no = int(port)
        if not 0 <= port_no <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{key}: {bind!r}: port must be a number 0-65535") from None
    return Address("tcp", host=host, port=port_no)


def _unix_socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except socket.timeout:
        return True  # accepted into a full backlog: someone is listening
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if exc.errno == errno.EAGAIN:
            return True
        raise
    finally:
        probe.close()


def _lookup_ids(owner: str, group: str) -> Tuple[int, int]:
    uid = gid = -1
    if owner:
        try:
            pw = pwd.getpwnam(owner) if not owner.isdigit() else pwd.getpwuid(int(owner))
            uid = pw.pw_uid
            if not group:
                gid = pw.pw_gid
        except KeyError:
            raise ConfigError(f"listen.owner: no user named {owner!r} on this system") from None
    if group:
        try:
            gid = (grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))).gr_gid
        except KeyError:
            raise ConfigError(f"listen.group: no group named {group!r} on this system") from None
    return uid, gid


def bind_unix(path: str, backlog: int, mode: str, owner: str, group: str) -> socket.socket:
    uid, gid = _lookup_ids(owner, group)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(f"{path} exists and is not a socket",
                            "remove it or choose another listen.bind path")
        if _unix_socket_is_live(path):
            raise BindError(f"{path} is in use: another server is listening on it",
                            "stop that server first, or choose another listen.bind path")
        os.unlink(path)  # stale: its owner is gone
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise BindError(f"cannot create {path}: directory {directory} does not exist",
                        "create it (owned by the user fcgi-manager runs as)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The mode comes from the umask at bind time: nothing is chmod'ed by path afterwards
    # (a path can be swapped for a link between two calls; a created inode cannot).
    old_umask = os.umask(0o777 & ~int(mode, 8))
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if len(os.fsencode(path)) > 107:  # sun_path: Python raises without an errno
            raise BindError(f"listen.bind {path}: the path is too long for a unix socket",
                            "use a path of at most 107 bytes") from None
        raise BindError(f"cannot bind {path}: {exc.strerror or exc}",
                        "check the directory's permissions" if exc.errno == errno.EACCES
                        else "") from None
    finally:
        os.umask(old_umask)
    try:
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid, follow_symlinks=False)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        _unlink_quietly(path)
        raise BindError(f"cannot set owner/mode of {path}: {exc.strerror}",
                        "listen.owner/group need root, or a group the master's user is in"
                        ) from None
    return sock


def bind_tcp(host: str, port: int, backlog: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = {
            errno.EADDRINUSE: "another process listens there: stop it or pick another port",
            errno.EACCES: "ports below 1024 need root",
            errno.EADDRNOTAVAIL: "that address is not on this machine",
        }.get(exc.errno or 0, "")
        raise BindError(f"cannot bind {host}:{port}: {exc.strerror}", hint) from None
    return sock


def inherit_fd(fd: int) -> socket.socket:
    """A listening socket passed to us as ``fd`` (spawn-fcgi, Supervisor, mod_fcgid)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(
            f"fd {fd} is not a socket ({exc.strerror})",
            "fd:0 is for running under spawn-fcgi, Supervisor's fcgi-program, lighttpd "
            "bin-path or Apache mod_fcgid, which pass a listening socket on stdin",
        ) from None
    if not is_listening(sock):
        sock.detach()
        raise BindError(f"fd {fd} is a socket but not a listening one",
                        "the program that started fcgi-manager must pass a listening socket")
    sock.set_inheritable(False)  # it came inheritable: no program the app starts gets it
    if fd <= 2:
        # On stdin (FCGI_LISTENSOCK_FILENO) every child would inherit it as its stdin:
        # move it to a close-on-exec descriptor and put /dev/null in its place.
        moved = socket.socket(fileno=os.dup(fd))
        sock.detach()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, fd)
        os.close(devnull)
        sock = moved
    return sock


def is_listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


def fd0_is_listening_socket() -> bool:
    """True when stdin is a listening socket (we were started as a FastCGI child)."""
    try:
        st = os.fstat(0)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    sock = socket.socket(fileno=0)
    try:
        return is_listening(sock)
    finally:
        sock.detach()


def systemd_socket(fd: int = SD_LISTEN_FDS_START) -> socket.socket:
    if not passed_fds():
        raise BindError("listen.bind = \"systemd\" but no socket was passed (LISTEN_FDS unset)",
                        "start it from a .socket unit (see examples/systemd/)")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return inherit_fd(fd)


def passed_fds() -> Tuple[int, ...]:
    """The descriptors systemd passed to this process (sd_listen_fds(3)), if any."""
    pid = os.environ.get("LISTEN_PID", "")
    fds = os.environ.get("LISTEN_FDS", "")
    if not fds.isdigit() or (pid.isdigit() and int(pid) != os.getpid()):
        return ()
    return tuple(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(fds)))


def _fd_address(fd: int) -> Optional[Tuple[int, object]]:
    """(family, address) a passed descriptor is bound to; None if it is no socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return sock.family, sock.getsockname()
    except OSError:
        return None
    finally:
        sock.detach()


def _wanted(address: Address) -> Optional[Tuple[int, object]]:
    if address.kind == "unix":
        return socket.AF_UNIX, os.path.realpath(address.path)
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address.host or None, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
            socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return None
    return family, sockaddr[:2]


def activated(address: Address) -> Address:
    """Under socket activation, the passed socket that *is* ``listen.bind``, as if
    ``bind = "systemd"`` (gunicorn does the same): the shipped .socket unit and a config
    naming its path then start together, with no second edit. A passed socket that is
    not the configured address is an error naming ``bind = "systemd"``: binding the path
    anew would fight systemd for it (and ``Restart=`` makes that a loop)."""
    fds = passed_fds()
    if not fds or address.kind not in ("unix", "tcp"):
        return address
    wanted = _wanted(address)
    seen = []
    for fd in fds:
        got = _fd_address(fd)
        if got is None:
            continue
        family, name = got
        if family == socket.AF_UNIX and isinstance(name, str) and name:
            name = os.path.realpath(name)
        elif family in (socket.AF_INET, socket.AF_INET6) and isinstance(name, tuple):
            name = name[:2]
        if wanted is not None and (family, name) == wanted:
            return Address("systemd", path=address.path, host=address.host,
                           port=address.port, fd=fd)
        seen.append(str(name) if family != socket.AF_UNIX else f"unix:{name}")
    raise BindError(
        f"listen.bind is {address}, but systemd passed {len(fds)} other socket(s) "
        f"(LISTEN_FDS: {', '.join(seen) or 'not sockets'})",
        'set bind = "systemd" in [listen] to serve on the passed socket, or make the '
        ".socket unit's ListenStream= the same address as listen.bind")


def create_listener(address: Address, backlog: int, mode: str = "0660", owner: str = "",
                    group: str = "") -> socket.socket:
    if address.kind == "unix":
        sock = bind_unix(address.path, backlog, mode, owner, group)
    elif address.kind == "tcp":
        sock = bind_tcp(address.host, address.port, backlog)
    elif address.kind == "fd":
        sock = inherit_fd(address.fd)
    else:
        sock = systemd_socket(address.fd if address.fd >= SD_LISTEN_FDS_START
                              else SD_LISTEN_FDS_START)
    return sock


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def socket_file_inode(address: Address) -> int:
    """The inode of our unix socket file right after bind (0 for other kinds)."""
    if address.kind != "unix":
        return 0
    try:
        return os.stat(address.path).st_ino
    except OSError:
        return 0


def remove_unix_socket(address: Address, inode: int) -> None:
    """Remove our socket file on exit, but only if it is still ours (same inode): a newer
    instance may have replaced it, and its socket must not vanish under it."""
    if address.kind != "unix" or not inode:
        return
    try:
        if os.stat(address.path).st_ino == inode:
            os.unlink(address.path)
    except OSError:
        pass


class ClientFilter:
    """``listen.allowed_clients`` / ``FCGI_WEB_SERVER_ADDRS`` for TCP: who may connect.

    Built once, by the master at start (before ``app.clear_env`` empties the
    environment), and handed to every worker: a bad entry is a config error naming the
    key or the variable, never a worker that dies at boot or a filter that quietly
    lets everyone in."""

    def __init__(self, allowed: Iterable[str], where: str = "listen.allowed_clients") -> None:
        self.networks = tuple(self._parse(allowed, where))

    @staticmethod
    def _parse(allowed: Iterable[str], where: str) -> list:
        nets = []
        for item in allowed:
            item = item.strip()
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(f"{where}: {item!r} is not an IP address or network",
                                  "write addresses like 127.0.0.1, ::1 or 10.0.0.0/8"
                                  ) from None
        return nets

    @classmethod
    def from_config(cls, allowed: Iterable[str]) -> Optional[ClientFilter]:
        items = list(allowed)
        env = os.environ.get("FCGI_WEB_SERVER_ADDRS", "")
        env_items = [a for a in env.replace(";", ",").split(",") if a.strip()]
        if not items and not env_items:
            return None
        flt = cls(items)
        flt.networks += tuple(cls._parse(env_items, "FCGI_WEB_SERVER_ADDRS (environment)"))
        return flt

    def allows(self, peer: object) -> bool:
        if not isinstance(peer, tuple):
            return True  # unix sockets: file permissions decide
        try:
            ip = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


# -- listen queue depth (Linux) ----------------------------------------------------------

_TCP_INFO_UNACKED = 24  # offsetof(struct tcp_info, tcpi_unacked); tcpi_sacked follows


def tcp_listen_queue(sock: socket.socket) -> Optional[Tuple[int, int]]:
    """(queued now, backlog) for a listening TCP socket via TCP_INFO, None if unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_UNACKED + 8:
        return None
    return struct.unpack_from("=II", info, _TCP_INFO_UNACKED)


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_DONE = 3
_NLMSG_ERROR = 2
_UDIAG_SHOW_RQLEN = 0x10
_UNIX_DIAG_RQLEN = 4
_TCP_LISTEN = 10


def unix_listen_queue(sock: socket.socket) -> Optional[Tuple[int, int]]:
    """(queued now, backlog) of a listening unix socket via NETLINK_SOCK_DIAG.

    This is what ``ss -xl`` shows as Recv-Q/Send-Q; the socket is found by its inode.
    """
    try:
        ino = os.fstat(sock.fileno()).st_ino
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError, ValueError):
        return None
    try:
        nl.settimeout(1.0)
        req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0,
                          _UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF)
        hdr = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY,
                          _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
        nl.send(hdr + req)
        while True:
            data = nl.recv(65536)
            if not data:
                return None
            pos = 0
            while pos + 16 <= len(data):
                length, mtype, _, _, _ = struct.unpack_from("=IHHII", data, pos)
                if length < 16:
                    return None
                if mtype in (_NLMSG_DONE, _NLMSG_ERROR):
                    return None
                found = _parse_unix_diag(data[pos + 16 : pos + length], ino)
                if found is not None:
                    return found
                pos += (length + 3) & ~3
    except OSError:
        return None
    finally:
        nl.close()


def _parse_unix_diag(msg: bytes, ino: int) -> Optional[Tuple[int, int]]:
    if len(msg) < 16:
        return None
    _, _, _, _, msg_ino = struct.unpack_from("=BBBBI", msg, 0)
    if msg_ino != ino:
        return None
    pos = 16
    while pos + 4 <= len(msg):
        rta_len, rta_type = struct.unpack_from("=HH", msg, pos)
        if rta_len < 4:
            return None
        if rta_type == _UNIX_DIAG_RQLEN and rta_len >= 12:
            return struct.unpack_from("=II", msg, pos + 4)
        pos += (rta_len + 3) & ~3
    return None


def listen_queue(sock: socket.socket) -> Optional[Tuple[int, int]]:
    family = sock.family
    if family == socket.AF_UNIX:
        return unix_listen_queue(sock)
    if family in (socket.AF_INET, socket.AF_INET6):
        return tcp_listen_queue(sock)
    return None
