"""Sockets: socket, socketpair, bind/listen/accept/connect, send/recv and their
msg forms (SCM_RIGHTS), shutdown, names, options.

AF_UNIX (``rump/socket.py``) and AF_INET/AF_INET6 over the instance's
private loopback network (``rump/inet.py``, docs/semantics.md).  Errnos and checks follow Linux's net/socket.c
and net/unix/af_unix.c: a socket call on an fd that is not a socket is
ENOTSOCK, pointers are checked before anything moves (EFAULT).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from tender_service.machine.errors import GuestError
from tender_service.rump.fdtable import drop
from tender_service.rump.files import File
from tender_service.rump.fs import S_IFMT, S_IFSOCK
from tender_service.rump.inet import IPPROTO_IP, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP, InetSocket
from tender_service.rump.socket import (
    AF_INET,
    AF_INET6,
    AF_UNIX,
    MSG_CMSG_CLOEXEC,
    MSG_CTRUNC,
    MSG_OOB,
    SCM_MAX_FD,
    SOCK_BUF,
    SOCK_CLOEXEC,
    SOCK_DGRAM,
    SOCK_NONBLOCK,
    SOCK_STREAM,
    SOMAXCONN,
    SUN_PATH_MAX,
    Socket,
    UnixSocket,
    drop_files,
    make_pair,
)
from tender_service.rump.syscalls.abi import i32, read_iovecs
from tender_service.rump.vfs import AT_FDCWD

if TYPE_CHECKING:
    from tender_service.rump.kernel import Kernel
    from tender_service.rump.process import Lwp

AF_UNSPEC = 0
SOL_SOCKET = 1
SCM_RIGHTS, SCM_CREDENTIALS = 1, 2
SO_REUSEADDR, SO_TYPE, SO_ERROR, SO_SNDBUF, SO_RCVBUF = 2, 3, 4, 7, 8
SO_LINGER, SO_PROTOCOL, SO_DOMAIN, SO_ACCEPTCONN = 13, 38, 39, 30
READ_ONLY_OPTS = {SO_TYPE, SO_ERROR, SO_PROTOCOL, SO_DOMAIN, SO_ACCEPTCONN}
SOCKADDR_UN_SIZE = 2 + SUN_PATH_MAX
MSGHDR = struct.Struct("<QI4xQQQQi4x")
CMSGHDR = struct.Struct("<Qii")
WMEM_MAX = SOCK_BUF  # net.core.wmem_max / rmem_max
MAX_IO = 0x7FFFF000
PROTO_LEVELS = {IPPROTO_IP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_IPV6}


def _sock(lwp: Lwp, fd: int) -> Socket:
    f = lwp.proc.fds.get(i32(fd))  # EBADF
    if not isinstance(f, Socket):
        raise GuestError(errno.ENOTSOCK)
    return f


def _usock(lwp: Lwp, fd: int) -> UnixSocket:
    """A socket of this kernel: names and connections (a pair that crossed VMs has
    neither to give)."""
    f = _sock(lwp, fd)
    if not isinstance(f, UnixSocket):
        raise GuestError(errno.EOPNOTSUPP)
    return f


def _check_type(domain: int, stype: int, protocol: int) -> tuple[int, int]:
    """(socket type, SOCK_* flags) as socket(2) validates them."""
    domain, stype, protocol = i32(domain), i32(stype), i32(protocol)
    flags = stype & ~0xF
    if flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC):
        raise GuestError(errno.EINVAL)
    t = stype & 0xF
    if domain in (AF_INET, AF_INET6):
        allowed = {SOCK_STREAM: (0, IPPROTO_TCP), SOCK_DGRAM: (0, IPPROTO_UDP)}
        if t not in allowed:
            raise GuestError(errno.ESOCKTNOSUPPORT)
        if protocol not in allowed[t]:
            raise GuestError(errno.EPROTONOSUPPORT)
        return t, flags
    if domain != AF_UNIX:
        raise GuestError(errno.EAFNOSUPPORT)
    if protocol not in (0, AF_UNIX):
        raise GuestError(errno.EPROTONOSUPPORT)
    if t not in (SOCK_STREAM, SOCK_DGRAM):
        raise GuestError(errno.ESOCKTNOSUPPORT)
    return t, flags


def _install(lwp: Lwp, sock: File, flags: int) -> int:
    return lwp.proc.fds.install(sock, cloexec=bool(flags & SOCK_CLOEXEC))


def sys_socket(k: Kernel, lwp: Lwp, domain: int, stype: int, protocol: int) -> int:
    t, flags = _check_type(domain, stype, protocol)
    if i32(domain) in (AF_INET, AF_INET6):
        return _install(lwp, InetSocket(i32(domain), t, flags & SOCK_NONBLOCK), flags)
    return _install(lwp, UnixSocket(t, flags & SOCK_NONBLOCK), flags)


def sys_socketpair(k: Kernel, lwp: Lwp, domain: int, stype: int, protocol: int, sv: int) -> int:
    if i32(domain) in (AF_INET, AF_INET6):
        raise GuestError(errno.EOPNOTSUPP)
    t, flags = _check_type(domain, stype, protocol)
    k.mem.offset(sv, 8)
    a, b = make_pair(t, flags & SOCK_NONBLOCK)
    fds = lwp.proc.fds
    fa = _install(lwp, a, flags)
    try:
        fb = _install(lwp, b, flags)
    except GuestError:
        fds.close(k, fa)
        b.refs = 1
        drop(k, b)
        raise
    k.mem.write(sv, struct.pack("<ii", fa, fb))
    return 0


# -- addresses ----------------------------------------------------------------------
def _read_addr(k: Kernel, addr: int, addrlen: int) -> bytes:
    """The name in a sockaddr_un: a path (no NUL), b"\\0..." abstract, b"" for none."""
    n = i32(addrlen)
    if n < 2 or n > SOCKADDR_UN_SIZE:
        raise GuestError(errno.EINVAL)
    raw = k.mem.read(addr, n)
    (family,) = struct.unpack_from("<H", raw)
    if family != AF_UNIX:
        raise GuestError(errno.EINVAL)
    path = raw[2:]
    if not path:
        return b""
    if path[0] == 0:
        return path  # abstract: every byte counts
    return path.split(b"\0", 1)[0]


def _write_addr(k: Kernel, addr: int, lenp: int, data: bytes) -> None:
    """Copy a sockaddr out as accept/getsockname/recvfrom do: truncated to the buffer,
    the full length in ``*lenp``."""
    if not addr:
        return
    have = i32(k.mem.read_u32(lenp))
    if have < 0:
        raise GuestError(errno.EINVAL)
    k.mem.write(addr, data[:have])
    k.mem.write_u32(lenp, len(data))


def _check_addr_out(k: Kernel, addr: int, lenp: int) -> None:
    """EFAULT before a connection or a message is taken."""
    if addr:
        have = i32(k.mem.read_u32(lenp))
        if have < 0:
            raise GuestError(errno.EINVAL)
        k.mem.offset(addr, have)
        k.mem.offset(lenp, 4)


def _lookup(k: Kernel, lwp: Lwp, name: bytes) -> UnixSocket:
    if not name:
        raise GuestError(errno.EINVAL)
    names = k.unix_names
    if name.startswith(b"\0"):
        found = names.abstract.get(name)
    else:
        base = k.fs.base(lwp.proc, AT_FDCWD, name)
        st = k.fs.tree.stat(base, name)  # ENOENT, ENOTDIR, ELOOP ...
        if st.mode & S_IFMT != S_IFSOCK:
            raise GuestError(errno.ECONNREFUSED)
        found = names.by_ino.get(st.ino)
    if found is None or found.closed:
        raise GuestError(errno.ECONNREFUSED)
    return found


def sys_bind(k: Kernel, lwp: Lwp, fd: int, addr: int, addrlen: int) -> int:
    s = _usock(lwp, fd)
    if isinstance(s, InetSocket):
        s.bind_to(k, *s.parse(k, addr, addrlen & 0xFFFF_FFFF, True))
        return 0
    name = _read_addr(k, addr, addrlen)
    if s.name:  # already bound: EINVAL, unless a path's name is taken (checked first)
        if name and not name.startswith(b"\0"):
            base = k.fs.base(lwp.proc, AT_FDCWD, name)
            try:
                k.fs.tree.stat(base, name, False)
            except GuestError:
                raise GuestError(errno.EINVAL) from None
            raise GuestError(errno.EADDRINUSE)
        raise GuestError(errno.EINVAL)
    names = k.unix_names
    if not name:  # autobind: an abstract name the kernel picks
        while True:
            name = b"\0%05x" % (next(names.autobind) & 0xFFFFF)
            if name not in names.abstract:
                break
    if name.startswith(b"\0"):
        if name in names.abstract:
            raise GuestError(errno.EADDRINUSE)
        names.abstract[name] = s
    else:
        base = k.fs.base(lwp.proc, AT_FDCWD, name)
        ino = k.fs.tree.mksock(base, name, 0o777 & ~lwp.proc.umask)
        names.by_ino[ino] = s
        s.ino = ino
    s.name = name
    return 0


def sys_listen(k: Kernel, lwp: Lwp, fd: int, backlog: int) -> int:
    s = _usock(lwp, fd)
    if isinstance(s, InetSocket):
        s.listen_inet(k, i32(backlog))
        return 0
    if not s.stream:
        raise GuestError(errno.EOPNOTSUPP)
    if not s.name or s.connected:
        raise GuestError(errno.EINVAL)
    n = i32(backlog)
    s.backlog = SOMAXCONN if n < 0 or n > SOMAXCONN else n
    s.listening = True
    s._changed(k)
    return 0


def sys_accept4(k: Kernel, lwp: Lwp, fd: int, addr: int, addrlen: int, flags: int) -> int:
    flags = i32(flags)
    if flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC):
        raise GuestError(errno.EINVAL)
    s = _usock(lwp, fd)
    if not s.stream:
        raise GuestError(errno.EOPNOTSUPP)
    if not s.listening:
        raise GuestError(errno.EINVAL)
    _check_addr_out(k, addr, addrlen)
    lwp.proc.fds.lowest_free()  # EMFILE before the connection is taken (as Linux)
    conn = s.accept_conn(k, lwp)
    conn.flags |= flags & SOCK_NONBLOCK
    newfd = _install(lwp, conn, flags)
    _write_addr(k, addr, addrlen, conn.out_name(conn.peer_name))
    return newfd


def sys_accept(k: Kernel, lwp: Lwp, fd: int, addr: int, addrlen: int) -> int:
    return sys_accept4(k, lwp, fd, addr, addrlen, 0)


def sys_connect(k: Kernel, lwp: Lwp, fd: int, addr: int, addrlen: int) -> int:
    f = _sock(lwp, fd)
    if not isinstance(f, UnixSocket) and f.connected:  # a connection that crossed VMs
        if f.connect_owed:
            f.connect_owed = False
            return 0
        raise GuestError(errno.EISCONN)
    s = _usock(lwp, fd)
    if isinstance(s, InetSocket):
        if not s.stream and i32(addrlen) >= 2 and k.mem.read(addr, 2) == b"\0\0":
            s.peer_addr, s.peer_name = None, b""  # AF_UNSPEC: UDP disconnects
            return 0
        return s.connect_inet(k, lwp, *s.parse(k, addr, addrlen & 0xFFFF_FFFF, False))
    if not s.stream and i32(addrlen) >= 2 and k.mem.read(addr, 2) == b"\0\0":
        s.peer, s.peer_name = None, b""  # AF_UNSPEC: a datagram socket disconnects
        return 0
    name = _read_addr(k, addr, addrlen)
    target = _lookup(k, lwp, name)
    if s.stream:
        return s.connect_to(k, lwp, target)
    if target.stype != s.stype:
        raise GuestError(errno.EPROTOTYPE)
    s.peer, s.peer_name = target, target.name
    s._changed(k)
    return 0


def sys_shutdown(k: Kernel, lwp: Lwp, fd: int, how: int) -> int:
    _sock(lwp, fd).shutdown(k, i32(how))
    return 0


def sys_getsockname(k: Kernel, lwp: Lwp, fd: int, addr: int, addrlen: int) -> int:
    s = _sock(lwp, fd)
    _check_addr_out(k, addr, addrlen)
    _write_addr(k, addr, addrlen, s.out_name(s.name))
    return 0


def sys_getpeername(k: Kernel, lwp: Lwp, fd: int, addr: int, addrlen: int) -> int:
    s = _sock(lwp, fd)
    if not s.has_peer or s.listening:
        raise GuestError(errno.ENOTCONN)
    _check_addr_out(k, addr, addrlen)
    _write_addr(k, addr, addrlen, s.out_name(s.peer_name))
    return 0


# -- data -------------------------------------------------------------------------------
def _gather(k: Kernel, vecs: list[tuple[int, int]]) -> tuple[int, Callable[[int, int], bytes]]:
    """(total length, chunk(offset, size)) over iovecs; EFAULT checked up front."""
    vecs = [(b, n) for b, n in vecs if n]
    for base, n in vecs:
        k.mem.offset(base, n)
    total = sum(n for _, n in vecs)
    if len(vecs) == 1:
        base = vecs[0][0]
        return total, lambda off, size: k.mem.read(base + off, size)

    def chunk(off: int, size: int) -> bytes:
        out = bytearray()
        pos = 0
        for base, n in vecs:
            if pos + n > off and len(out) < size:
                start = max(off - pos, 0)
                out += k.mem.read(base + start, min(n - start, size - len(out)))
            pos += n
        return bytes(out)

    return total, chunk


def _dest(k: Kernel, lwp: Lwp, s: Socket, addr: int, addrlen: int) -> object:
    if not addr or not addrlen:
        return None
    if isinstance(s, InetSocket):
        return None if s.stream else s.parse(k, addr, addrlen & 0xFFFF_FFFF, False)
    if s.stream:
        raise GuestError(errno.EISCONN if s.connected else errno.EOPNOTSUPP)
    target = _lookup(k, lwp, _read_addr(k, addr, addrlen))
    if target.stype != s.stype:
        raise GuestError(errno.EPROTOTYPE)
    return target


def _send(
    k: Kernel,
    lwp: Lwp,
    s: Socket,
    vecs: list[tuple[int, int]],
    flags: int,
    addr: int,
    addrlen: int,
    files: list[File] | None,
) -> int:
    if flags & MSG_OOB:
        drop_files(k, files)
        raise GuestError(errno.EOPNOTSUPP)
    try:
        dest = _dest(k, lwp, s, addr, addrlen)
        total, chunk = _gather(k, vecs)
    except GuestError:
        drop_files(k, files)
        raise
    return s.send(k, lwp, min(total, MAX_IO), chunk, files, flags, dest)  # type: ignore[arg-type]


def sys_sendto(
    k: Kernel, lwp: Lwp, fd: int, buf: int, n: int, flags: int, addr: int, addrlen: int
) -> int:
    s = _sock(lwp, fd)
    return _send(k, lwp, s, [(buf, min(n, MAX_IO))], i32(flags), addr, addrlen, None)


def sys_recvfrom(
    k: Kernel, lwp: Lwp, fd: int, buf: int, n: int, flags: int, addr: int, addrlen: int
) -> int:
    s = _sock(lwp, fd)
    _check_addr_out(k, addr, addrlen)
    flags = i32(flags)
    if flags & MSG_OOB:
        raise GuestError(errno.EINVAL)
    got, files, sender, _ = s.recv(k, lwp, [(buf, min(n, MAX_IO))], flags)
    drop_files(k, files)
    if sender and not s.stream:
        _write_addr(k, addr, addrlen, s.out_name(sender))
    elif addr:
        k.mem.write_u32(addrlen, 0)  # an unnamed sender (or a stream): no address
    return got


def _take_files(k: Kernel, lwp: Lwp, control: int, controllen: int) -> list[File] | None:
    """The files of SCM_RIGHTS messages, each with an in-flight reference taken."""
    if controllen < CMSGHDR.size:
        return None
    if controllen > 1 << 20:
        raise GuestError(errno.ENOBUFS)
    raw = k.mem.read(control, controllen)
    files: list[File] = []
    off = 0
    try:
        while off + CMSGHDR.size <= controllen:
            clen, level, ctype = CMSGHDR.unpack_from(raw, off)
            if clen < CMSGHDR.size or clen > controllen - off:
                raise GuestError(errno.EINVAL)
            if level == SOL_SOCKET:
                if ctype == SCM_RIGHTS:
                    n = (clen - CMSGHDR.size) // 4
                    if n <= 0 or n + len(files) > SCM_MAX_FD:
                        raise GuestError(errno.EINVAL)
                    for (fd,) in struct.iter_unpack("<i", raw[off + 16 : off + 16 + 4 * n]):
                        f = lwp.proc.fds.get(fd)
                        f.refs += 1
                        files.append(f)
                elif ctype != SCM_CREDENTIALS:
                    raise GuestError(errno.EINVAL)
            off += (clen + 7) & ~7
    except GuestError:
        drop_files(k, files)
        raise
    return files or None


def sys_sendmsg(k: Kernel, lwp: Lwp, fd: int, msg: int, flags: int) -> int:
    s = _sock(lwp, fd)
    name, namelen, iov, iovlen, control, controllen, _ = k.mem.unpack(MSGHDR, msg)
    vecs = read_iovecs(k.mem, iov, iovlen)
    # a stream send resumed after a partial wait already carried its files
    files = None if lwp.progress else _take_files(k, lwp, control, controllen)
    return _send(k, lwp, s, vecs, i32(flags), name, namelen, files)


def sys_recvmsg(k: Kernel, lwp: Lwp, fd: int, msg: int, flags: int) -> int:
    s = _sock(lwp, fd)
    flags = i32(flags)
    name, namelen, iov, iovlen, control, controllen, _ = k.mem.unpack(MSGHDR, msg)
    if flags & MSG_OOB:
        raise GuestError(errno.EINVAL)
    vecs = read_iovecs(k.mem, iov, iovlen)
    k.mem.offset(msg, MSGHDR.size)
    if name and namelen:
        k.mem.offset(name, namelen)
    if control and controllen:
        k.mem.offset(control, min(controllen, 1 << 20))
    got, files, sender, msg_flags = s.recv(k, lwp, vecs, flags)
    out_namelen = 0
    if name and namelen and sender and not s.stream:
        data = s.out_name(sender)
        k.mem.write(name, data[: min(namelen, len(data))])
        out_namelen = len(data)
    used = 0
    if files:
        room = (controllen - CMSGHDR.size) // 4 if controllen >= CMSGHDR.size else 0
        fds: list[int] = []
        for f in files:
            if len(fds) < room:
                try:
                    fds.append(lwp.proc.fds.install(f, cloexec=bool(flags & MSG_CMSG_CLOEXEC)))
                except GuestError:  # EMFILE: the rest are lost, as Linux
                    room = len(fds)
            drop(k, f)  # the in-flight reference
        if fds:
            clen = CMSGHDR.size + 4 * len(fds)
            k.mem.write(
                control,
                CMSGHDR.pack(clen, SOL_SOCKET, SCM_RIGHTS) + struct.pack(f"<{len(fds)}i", *fds),
            )
            used = min((clen + 7) & ~7, controllen)
        if len(fds) < len(files):
            msg_flags |= MSG_CTRUNC
    k.mem.write_u32(msg + 8, out_namelen)
    k.mem.write_u64(msg + 40, used)
    k.mem.write_u32(msg + 48, msg_flags)
    return got


# -- options ----------------------------------------------------------------------------
def sys_setsockopt(k: Kernel, lwp: Lwp, fd: int, level: int, name: int, val: int, n: int) -> int:
    s = _sock(lwp, fd)
    level, name, n = i32(level), i32(name), i32(n)
    if level != SOL_SOCKET:
        return _proto_option(k, s, level, name, val, n)
    if n < 0:
        raise GuestError(errno.EINVAL)
    if name in READ_ONLY_OPTS:
        raise GuestError(errno.ENOPROTOOPT)
    if n < (8 if name == SO_LINGER else 4):
        raise GuestError(errno.EINVAL)
    data = k.mem.read(val, min(n, 256))
    value = struct.unpack_from("<i", data)[0]
    if name == SO_SNDBUF:
        s.sndbuf = max(min(max(value, 0), WMEM_MAX) * 2, 4608)
    elif name == SO_RCVBUF:
        s.rcvbuf = max(min(max(value, 0), WMEM_MAX) * 2, 2304)
    else:
        s.options[(level, name)] = data  # SO_REUSEADDR, SO_KEEPALIVE, SO_LINGER...: kept
    return 0


def _proto_option(k: Kernel, s: Socket, level: int, name: int, val: int, n: int) -> int:
    """IPPROTO_TCP/IP/IPV6/UDP options of a TCP or UDP socket (TCP_NODELAY, ...): kept
    and read back, without effect on the loopback network."""
    if not isinstance(s, InetSocket) or level not in PROTO_LEVELS:
        raise GuestError(errno.EOPNOTSUPP)
    if n < 0:
        raise GuestError(errno.EINVAL)
    if n < 4:
        raise GuestError(errno.EINVAL)
    s.options[(level, name)] = k.mem.read(val, min(n, 256))
    return 0


def sys_getsockopt(k: Kernel, lwp: Lwp, fd: int, level: int, name: int, val: int, lenp: int) -> int:
    s = _sock(lwp, fd)
    level, name = i32(level), i32(name)
    have = i32(k.mem.read_u32(lenp))
    if have < 0:
        raise GuestError(errno.EINVAL)
    ints = {
        SO_TYPE: s.stype,
        SO_ERROR: s.so_error,
        SO_SNDBUF: s.sndbuf,
        SO_RCVBUF: s.rcvbuf,
        SO_DOMAIN: s.family,
        SO_PROTOCOL: s.protocol,
        SO_ACCEPTCONN: int(s.listening),
    }
    if level != SOL_SOCKET:
        if not isinstance(s, InetSocket) or level not in PROTO_LEVELS:
            raise GuestError(errno.EOPNOTSUPP)
        data = s.options.get((level, name), bytes(4))
    elif name in ints:
        data = struct.pack("<i", ints[name])
        if name == SO_ERROR:
            s.so_error = 0
    elif (level, name) in s.options:
        data = s.options[(level, name)]
    elif name == SO_LINGER:
        data = bytes(8)
    else:
        data = bytes(4)
    out = data[:have]
    k.mem.write(val, out)
    k.mem.write_u32(lenp, len(out))
    return 0
