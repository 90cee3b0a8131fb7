"""What /proc says about a process's sockets, for tests that must know which process holds a connection or port."""

from __future__ import annotations

import os
from pathlib import Path


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` has open (none if it is gone)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return set()
    inodes = set()
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_sockets() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every TCP socket (/proc/net/tcp and tcp6; state 0A is LISTEN)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
            found.append((local, remote, fields[3], fields[9]))
    return found


def listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on TCP ``port``."""
    return {inode for local, _, state, inode in tcp_sockets() if local == port and state == "0A"}
