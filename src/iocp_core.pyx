# cython: language_level=3, embedsignature=True, freethreading_compatible=False
"""I/O completion ports: the Cython core (built as ``iocp._core``).

Everything here runs with the GIL held except the waits, which call
``iocp_port_wait`` inside ``with nogil``.  The native layer (src/native)
owns op records and buffers while the kernel may touch them; this layer
pins Python buffers (a Py_buffer export plus a strong reference, held by
the ``Operation``) from submission until the op's final completion has been
dequeued, and only then releases them.

Reference discipline: a submitted ``Operation`` carries one extra strong
reference owned by its native record (``op.user``), taken before
``iocp_submit`` and dropped when the final completion is turned into a
``Completion``.  So an op in flight can never be freed, whoever else lets go
of it, and its callback, socket and buffer stay alive with it.

The GIL is this module's lock (port tables, backlog, pin counts, the
foreign-post queue), so it is not free-threading compatible: the directive
above keeps Py_mod_gil at Py_MOD_GIL_USED, and a free-threaded CPython
turns the GIL back on when it imports the module.
"""

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_CheckBuffer,
                            PyObject_GetBuffer)
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                           PyBytes_GET_SIZE)
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport Py_TYPE, PyObject, PyTypeObject
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uint32_t
from libc.string cimport memcpy, memset

from native cimport *

cimport cython

import errno as _errno
import logging as _logging
import os as _os
import socket as _socket
import sys as _sys
import threading as _threading
from types import MethodType as _MethodType
from collections import deque as _deque

_log = _logging.getLogger("iocp")

# ---- reading a socket's descriptor without a method call ------------------
#
# Every op looks its socket's registration up by descriptor, and
# ``sock.fileno()`` through attribute lookup costs ~400 instructions: more
# than the rest of _new_op.  The fd is still read fresh from the socket
# for every op (a closed socket reads -1, so a cached fd can never point an
# op at a descriptor reused by someone else); only *how* it is read is
# cached: for an exact ``socket.socket`` whose type is unchanged since the
# lookup (same ``tp_version_tag``: any assignment to the class or a base
# gives it a new one), the C function behind ``_socket.socket.fileno`` is
# called directly.  ``socket.socket`` has ``__slots__``, so no instance can
# shadow the method.  Anything else takes the ordinary ``sock.fileno()``.
cdef extern from *:
    """
    static PyTypeObject *iocp__py_sock_type;   /* socket.socket */
    static unsigned int iocp__py_sock_tag;     /* its tp_version_tag; 0: none */
    static PyCFunction iocp__py_sock_fileno;   /* _socket.socket.fileno's C code */
    /* 1: the descriptor is read straight from the object (see
       iocp__fast_fd_probe); 0: through iocp__py_sock_fileno. */
    static int iocp__py_sock_direct;

    /* CPython's socket object keeps its descriptor (a SOCKET_T, which is
       what iocp_socket_t is on each platform) first after the object
       header.  That layout is not a public API, so it is only used once
       checked against fileno() on live sockets: an open one and a closed
       one (-1).  0 or 1 (layout confirmed); never raises. */
    static int iocp__fast_fd_probe(PyObject *sock, long long fd)
    {
        iocp_socket_t raw;
        if (Py_TYPE(sock) != iocp__py_sock_type ||
                Py_TYPE(sock)->tp_basicsize < (Py_ssize_t)(sizeof(PyObject) + sizeof(raw)))
            return 0;
        memcpy(&raw, (char *)sock + sizeof(PyObject), sizeof(raw));
        return (long long)raw == fd;
    }

    /* (Re)learns how socket.socket's fileno() resolves.  0, or -1 with an
       exception set. */
    static int iocp__fast_fd_learn(PyObject *type, PyObject *base)
    {
        PyObject *name, *found, *want;
        PyTypeObject *t = (PyTypeObject *)type;
        iocp__py_sock_tag = 0;
        name = PyUnicode_InternFromString("fileno");
        if (name == NULL)
            return -1;
        found = _PyType_Lookup(t, name);          /* borrowed; assigns a tag */
        want = PyDict_GetItemWithError(((PyTypeObject *)base)->tp_dict, name);
        Py_DECREF(name);
        if (want == NULL && PyErr_Occurred())
            return -1;
        if (found == NULL || found != want || !Py_IS_TYPE(found, &PyMethodDescr_Type))
            return 0;                             /* not the C method: no fast path */
        if (!(((PyMethodDescrObject *)found)->d_method->ml_flags & METH_NOARGS))
            return 0;
        iocp__py_sock_type = t;
        iocp__py_sock_fileno = ((PyMethodDescrObject *)found)->d_method->ml_meth;
        iocp__py_sock_tag = t->tp_version_tag;
        return 0;
    }

    /* 1 and *fd set if `sock` took the fast path; 0 if the caller must
       call sock.fileno(); -1 with an exception set. */
    static int iocp__fast_fd(PyObject *sock, long long *fd)
    {
        PyObject *r;
        if (Py_TYPE(sock) != iocp__py_sock_type || iocp__py_sock_tag == 0 ||
                iocp__py_sock_type->tp_version_tag != iocp__py_sock_tag)
            return 0;
        if (iocp__py_sock_direct) {
            iocp_socket_t raw;
            memcpy(&raw, (char *)sock + sizeof(PyObject), sizeof(raw));
            *fd = (long long)raw;
            return 1;
        }
        r = iocp__py_sock_fileno(sock, NULL);
        if (r == NULL)
            return -1;
        *fd = PyLong_AsLongLong(r);
        Py_DECREF(r);
        if (*fd == -1 && PyErr_Occurred())
            return -1;
        return 1;
    }

    /* 1 if a record's user pointer is an instance of exactly `t` (a
       final type): how dispatch tells a Stream's records from an
       Operation's without a reference count change. */
    static inline int iocp__user_is(void *user, PyTypeObject *t)
    {
        return user != NULL && Py_TYPE((PyObject *)user) == t;
    }
    """
    int iocp__user_is(void *user, PyTypeObject *t) noexcept
    int iocp__fast_fd_learn(object type, object base) except -1
    int iocp__fast_fd(object sock, long long *fd) except -1
    int iocp__fast_fd_probe(object sock, long long fd) noexcept
    int iocp__py_sock_direct


cdef object _SocketType = _socket.socket
iocp__fast_fd_learn(_SocketType, _SocketType.__mro__[1])


cdef int _probe_sock_layout() except -1:
    """Turns on the direct descriptor read if CPython's socket layout is
    the one expected (see iocp__fast_fd_probe), checked on sockets of
    three descriptors, one of them closed."""
    global iocp__py_sock_direct
    cdef bint ok = True
    socks = []
    try:
        for _ in range(3):
            socks.append(_SocketType(_socket.AF_INET, _socket.SOCK_STREAM))
        socks[1].close()
        for s in socks:
            ok = ok and iocp__fast_fd_probe(s, s.fileno())
    except OSError:
        ok = False
    finally:
        for s in socks:
            s.close()
    iocp__py_sock_direct = ok
    return 0


_probe_sock_layout()


cdef long long _sock_fd(object sock) except? -2:
    """The descriptor of a socket.socket (-1 once closed); TypeError for
    anything else.  See above for the fast path."""
    cdef long long fd
    if iocp__fast_fd(sock, &fd):
        return fd
    if not isinstance(sock, _SocketType):
        raise TypeError(f"expected a socket.socket, got {type(sock).__name__}")
    fd = sock.fileno()
    if type(sock) is _SocketType:
        # The class changed (or had no tag yet): relearn for next time.
        iocp__fast_fd_learn(_SocketType, _SocketType.__mro__[1])
    return fd

cdef enum:
    # Completions taken per wait (GetQueuedCompletionStatusEx-style).
    BATCH = 128
    # A wait on the main thread is cut into slices this long so Ctrl-C is
    # seen even where the kernel wait is not interrupted by signals
    # (Windows, or a thread waiting for another thread's poll).
    SIGNAL_SLICE_MS = 50
    # The longest single native wait (24 h).  A longer timeout -- up to
    # float('inf'), which means "forever" like None -- waits in slices of
    # this, so no timeout reaches the native int milliseconds overflowed.
    MAX_SLICE_MS = 86400000

cdef bint _WINDOWS = _sys.platform == "win32"

KIND_NAMES = ("none", "accept", "connect", "recv", "recv_into", "send", "post", "poll")

# Readiness events of CompletionPort.poll() (the POSIX poll() values).
POLLIN = IOCP_POLL_IN
POLLOUT = IOCP_POLL_OUT
POLLERR = IOCP_POLL_ERR
POLLHUP = IOCP_POLL_HUP

# The thread that receives signals, compared by ident on every wait (a
# cheap C comparison, where threading.current_thread() is a dict lookup).
# After fork() the forking thread is the child's main thread.
cdef unsigned long _main_ident = _threading.main_thread().ident


def _refresh_main_ident() -> None:
    global _main_ident
    _main_ident = _threading.main_thread().ident


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_refresh_main_ident)


cdef inline bint _on_main_thread() noexcept:
    return PyThread_get_thread_ident() == _main_ident
# Every backend the library has, whether or not this build or machine can
# run it: a name outside this is a ValueError, one inside that cannot run
# here an OSError.
KNOWN_BACKENDS = ("iocp", "io_uring", "epoll")


# --------------------------------------------------------------------------
# Errors

cdef object _oserror(int64_t code):
    """Turns a negative native error code into the matching OSError
    (RuntimeError for a port used in a fork() child)."""
    cdef char msg[256]
    cdef int c = <int>(-code)
    if code == IOCP_EFORKED:
        return _forked_error(-1)
    if code == IOCP_EWRONGTHREAD:
        return RuntimeError("this single-issuer completion port is owned by another "
                            "thread; only post(), stop() and stats() work from here")
    if _WINDOWS:
        iocp_error_message(c, msg, sizeof(msg))
        return OSError(None, msg.decode("utf-8", "replace"), None, c)
    return OSError(c, _os.strerror(c))


cdef object _forked_error(int64_t owner):
    """The error of a port inherited through fork(): a programming error,
    not an I/O failure, hence RuntimeError."""
    where = f"process {owner}" if owner >= 0 else "another process"
    return RuntimeError(
        f"this completion port was created in {where} and cannot be used after "
        f"fork(); create a new port in the child")


cdef int _check(int r) except -1:
    if r < 0:
        raise _oserror(r)
    return r


# --------------------------------------------------------------------------
# Timeouts

cdef double _timeout_seconds(object timeout) except? -2.0:
    """A timeout argument as seconds: -1.0 for "forever" (None or +inf),
    else a finite number >= 0.  NaN and negative values are refused."""
    cdef double t
    if timeout is None:
        return -1.0
    if isinstance(timeout, (str, bytes, bytearray)):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
    t = float(timeout)          # TypeError, or OverflowError for a huge int
    if t != t:
        raise ValueError("timeout must not be NaN")
    if t < 0:
        raise ValueError("timeout must be None or >= 0")
    if t == float("inf"):
        return -1.0
    return t


cdef inline int _slice_ms(double left) noexcept:
    """Milliseconds for a wait of `left` seconds, rounded up, capped at
    MAX_SLICE_MS (the caller loops until its deadline)."""
    if left <= 0.0:
        return 0
    if left >= MAX_SLICE_MS / 1000.0:
        return MAX_SLICE_MS
    return <int>(left * 1000.0 + 0.999)


# --------------------------------------------------------------------------
# Addresses

cdef int _fill_address(iocp_op *op, object sock, object address) except -1:
    """Stores `address` for a socket of sock.family into op->addr."""
    cdef bytes host_b
    cdef bytes path
    cdef int family = sock.family
    cdef int r
    if hasattr(_socket, "AF_UNIX") and family == _socket.AF_UNIX:
        if isinstance(address, str):
            path = _os.fsencode(address)
        elif isinstance(address, (bytes, bytearray)):
            path = bytes(address)
        else:
            raise TypeError("a Unix socket address is a str or bytes path")
        if len(path) == 0:
            raise ValueError("empty Unix socket path")
        r = iocp_sockaddr_unix(path, len(path), &op.addr, &op.addrlen)
        if r < 0:
            raise ValueError(f"Unix socket path too long ({len(path)} bytes)")
        return 0
    if family != _socket.AF_INET and family != _socket.AF_INET6:
        raise ValueError(f"unsupported address family {family!r}")
    if family == _socket.AF_INET:
        if not isinstance(address, tuple) or len(address) != 2:
            raise TypeError("an AF_INET address must be a (host, port) tuple")
    elif not isinstance(address, tuple) or not 2 <= len(address) <= 4:
        raise TypeError(
            "an AF_INET6 address must be a (host, port[, flowinfo[, scope_id]]) tuple")
    host, port = address[0], address[1]
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError("port must be an int")
    if not (0 <= port <= 65535):
        raise ValueError("port must be 0-65535")
    flowinfo = address[2] if len(address) > 2 else 0
    scope_id = address[3] if len(address) > 3 else 0
    for name, value, top in (("flowinfo", flowinfo, 0xFFFFF), ("scope_id", scope_id, 0xFFFFFFFF)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int")
        if not 0 <= value <= top:
            raise OverflowError(f"{name} must be 0-{top}")
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii")
    if not isinstance(host, str):
        raise TypeError("host must be a str")
    if "\0" in host:
        raise ValueError("host must not contain a NUL character")
    host_b = host.encode("idna") if host else (b"0.0.0.0" if family == _socket.AF_INET else b"::")
    r = iocp_sockaddr_inet(family, host_b, port, flowinfo, scope_id, &op.addr, &op.addrlen)
    if r < 0:
        # Not a numeric address: resolve it (blocking, like socket.connect).
        infos = _socket.getaddrinfo(host, port, family, _socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        resolved = infos[0][4]
        r = iocp_sockaddr_inet(family, resolved[0].encode("ascii"), port,
                               flowinfo, scope_id, &op.addr, &op.addrlen)
        if r < 0:
            raise OSError(f"cannot resolve {host!r}")
    return 0


cdef object _address_from(iocp_op *op):
    return _parse_address(&op.addr, op.addrlen)


def _test_parse_address(bytes raw, Py_ssize_t length):
    """For tests only: parses `raw` (copied into a zeroed sockaddr_storage,
    truncated to it) as an address the kernel said was `length` bytes."""
    cdef iocp_op scratch
    memset(&scratch.addr, 0, sizeof(scratch.addr))
    memcpy(&scratch.addr, <const char *>raw, min(<size_t>len(raw), sizeof(scratch.addr)))
    if length < 0 or length > 0x7FFFFFFF:
        raise OverflowError("length out of range")
    return _parse_address(&scratch.addr, <iocp_socklen_t>length)


cdef object _parse_address(sockaddr_storage *addr, iocp_socklen_t addrlen):
    cdef char host[512]
    cdef int port = 0
    cdef uint32_t flowinfo = 0, scope_id = 0
    cdef int family = iocp_sockaddr_parse(addr, addrlen, host, sizeof(host),
                                          &port, &flowinfo, &scope_id)
    if family == _socket.AF_INET:
        return (host.decode("ascii"), port)
    if family == _socket.AF_INET6:
        return (host.decode("ascii"), port, flowinfo, scope_id)
    if hasattr(_socket, "AF_UNIX") and family == _socket.AF_UNIX:
        raw = host[:port]
        if raw[:1] == b"\0":
            return raw
        return _os.fsdecode(raw)
    return None


# --------------------------------------------------------------------------
# Operation and Completion

# Operation and Completion describe native records, so only the port makes
# them: their __cinit__ refuses unless this C-level counter is non-zero,
# which only the two factories below make it, around the allocation.  It
# costs one C test per object on the hot path (no argument parsing), and
# Python code cannot reach it: `Completion()`, `Completion.__new__(...)`,
# a subclass (both are final) and unpickling (disabled) all raise
# TypeError.  A counter, not a flag: an allocation can run a GC finalizer
# that lets another thread in, and that thread's factory must not clear
# the permission this one still needs.  (Python code let in that way could
# build one with no operation; the properties cope with that.)
cdef Py_ssize_t _making = 0


cdef inline Operation _new_operation():
    global _making
    _making += 1
    try:
        return Operation.__new__(Operation)
    finally:
        _making -= 1


cdef inline Completion _new_completion():
    global _making
    _making += 1
    try:
        return Completion.__new__(Completion)
    finally:
        _making -= 1


@cython.final
@cython.auto_pickle(False)
@cython.freelist(256)
cdef class Operation:
    """One overlapped operation: the Python side of a native op record.

    Returned by the submitting methods of :class:`CompletionPort`.  It stays
    valid after completion (``done`` is then true); ``cancel()`` asks the
    backend to stop it.
    """
    cdef iocp_op *_op
    cdef CompletionPort _port
    cdef int _kind
    cdef readonly object socket
    """The socket the operation works on (None for posts)."""
    cdef readonly object key
    """The completion key: the socket's registration key, or the post key."""
    cdef readonly object callback
    """The function called with the Completion by ``run()`` (or None)."""
    cdef object _obj
    cdef Py_buffer _view
    cdef bint _pinned
    cdef bint _refpin               # _pinned by the reference in _obj alone (bytes)
    cdef bint _done
    cdef bint _multishot
    cdef bint _no_address       # accept: (conn, None), no peer read
    cdef Py_ssize_t _post_nbytes    # a post made off the owner thread (see post())
    cdef Py_buffer *_views          # gathered send: one pin per segment
    cdef Py_ssize_t _nviews
    cdef iocp_iovec *_iov

    def __cinit__(self):
        if _making == 0:
            raise TypeError("iocp.Operation objects are made by CompletionPort "
                            "methods (accept, recv, send, ...), not directly")
        self._op = NULL
        self._pinned = False
        self._refpin = False
        self._done = False
        self._views = NULL
        self._nviews = 0
        self._iov = NULL

    @property
    def kind(self) -> str:
        """"accept", "connect", "recv", "recv_into", "send", "post" or "poll"."""
        return KIND_NAMES[self._kind]

    @property
    def done(self) -> bool:
        """True once the final completion of the operation was dequeued."""
        return self._done

    def cancel(self) -> bool:
        """Asks for the operation to stop.

        Returns True if a cancel request was made: the operation then
        completes exactly once, either cancelled or -- if it raced with the
        kernel -- with its real result.  Returns False if it already
        finished (or the port is closed).
        """
        cdef int r
        if self._port is not None and self._port.single_issuer:
            self._port._check_owner()
        if self._done or self._op == NULL or self._port._port == NULL:
            return False
        r = iocp_cancel(self._port._port, self._op)
        if r == IOCP_EFORKED:
            raise _forked_error(iocp_port_owner_pid(self._port._port))
        return r == 0

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"<iocp.Operation {self.kind} {state}>"

    cdef void _unpin(self) noexcept:
        cdef Py_ssize_t i
        if self._pinned:
            if not self._refpin:
                PyBuffer_Release(&self._view)
            self._pinned = False
            self._refpin = False
            self._port._pinned -= 1
        if self._views != NULL:
            for i in range(self._nviews):
                PyBuffer_Release(&self._views[i])
            self._port._pinned -= self._nviews
            self._nviews = 0
            PyMem_Free(self._views)
            self._views = NULL
        if self._iov != NULL:
            PyMem_Free(self._iov)
            self._iov = NULL

    def __dealloc__(self):
        # Only reachable once the native record let go of its reference,
        # i.e. after the final completion; _unpin() already released all.
        cdef Py_ssize_t i
        if self._pinned and not self._refpin:
            PyBuffer_Release(&self._view)
        if self._views != NULL:
            for i in range(self._nviews):
                PyBuffer_Release(&self._views[i])
            PyMem_Free(self._views)
        if self._iov != NULL:
            PyMem_Free(self._iov)


@cython.final
@cython.auto_pickle(False)
@cython.freelist(256)
cdef class Completion:
    """One completed operation or posted packet (GetQueuedCompletionStatus).

    ``nbytes`` is the number of bytes transferred (for posts, the value given
    to ``post``); ``error`` is None or the OSError that ended the operation
    (a partial send reports both the bytes sent and the error); ``data``
    depends on the kind: ``(socket, address)`` for accept, ``bytes`` for
    recv (``b""`` means the peer closed its side), the caller's buffer for
    recv_into, the object given to ``post`` for posts, the int mask of
    events seen (``POLLIN | POLLOUT | POLLERR | POLLHUP``) for poll, None
    otherwise.  A multishot operation (accept, recv, poll) completes once
    per event with ``more`` true; its last completion has ``more`` false.
    """
    cdef readonly object key
    """The completion key (registration key of the socket, or post key)."""
    cdef readonly Operation operation
    """The Operation that completed."""
    cdef readonly Py_ssize_t nbytes
    """Bytes transferred (post: the nbytes given)."""
    cdef readonly object error
    """None, or the OSError that ended the operation."""
    cdef readonly object data
    """Kind-dependent payload; see the class docstring."""
    cdef readonly bint cancelled
    """True if the operation was cancelled before it could complete."""
    cdef readonly object more
    """True when a multishot operation (accept, recv, poll) stays armed
    after this completion; its final one has ``more`` false."""
    cdef object _failure        # exception that interrupted its conversion

    def __cinit__(self):
        if _making == 0:
            raise TypeError("iocp.Completion objects are made by the port "
                            "(run, get, get_many), not directly")
        self.more = False          # an object (see _expose_members), never None

    @property
    def kind(self) -> str:
        """The operation kind: "accept", "recv", ..., "post"."""
        # The port always sets `operation`; the check keeps a Completion
        # that somehow lacks one (see _making) from reading through None.
        return KIND_NAMES[self.operation._kind] if self.operation is not None else "none"

    @property
    def ok(self) -> bool:
        """True when the operation succeeded (no error)."""
        return self.error is None

    @property
    def eof(self) -> bool:
        """True for a successful zero-byte recv: the peer closed its side."""
        return (self.error is None and self.nbytes == 0 and
                self.operation is not None and
                (self.operation._kind == IOCP_OP_RECV or
                 self.operation._kind == IOCP_OP_RECV_INTO))

    def __repr__(self) -> str:
        extra = f" error={self.error!r}" if self.error is not None else ""
        return f"<iocp.Completion {self.kind} key={self.key!r} nbytes={self.nbytes}{extra}>"


# --------------------------------------------------------------------------
# Attribute reads the interpreter can specialise
#
# Cython exposes a ``cdef readonly object`` attribute as a getset property,
# which CPython's attribute cache cannot specialise: reading ``c.data`` in
# a callback costs ~120 instructions of generic lookup.  A member
# descriptor (T_OBJECT_EX, read-only) is read by the specialised
# LOAD_ATTR_SLOT at the cost of a load.  So the object attributes of
# Completion and Operation are re-exposed as members, at the same slots,
# with the same docstrings; writing them still raises AttributeError.  The
# slot offsets are found from an instance (a unique marker stored through
# the Cython attribute), not from Cython's private struct names.

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        const char *name
        int type
        Py_ssize_t offset
        int flags
        const char *doc
    int T_OBJECT_EX
    int READONLY

cdef extern from "Python.h":
    object PyDescr_NewMember(PyTypeObject *type, PyMemberDef *meth)
    void PyType_Modified(PyTypeObject *type)
    int PyDict_SetItemString(object d, const char *key, object val) except -1

cdef enum:
    _N_MEMBERS = 8

cdef PyMemberDef _members[_N_MEMBERS]
cdef list _member_keep = []      # names and docs the PyMemberDefs point into


cdef Py_ssize_t _slot_of(object obj, object marker) except -1:
    """Byte offset of the one object slot of `obj` that holds `marker`."""
    cdef PyObject **slots = <PyObject **><PyObject *>obj
    cdef Py_ssize_t i, found = -1
    cdef Py_ssize_t n = Py_TYPE(obj).tp_basicsize // <Py_ssize_t>sizeof(PyObject *)
    for i in range(n):
        if slots[i] == <PyObject *>marker:
            if found >= 0:
                raise RuntimeError("iocp: ambiguous attribute slot")
            found = i
    if found < 0:
        raise RuntimeError("iocp: attribute slot not found")
    return found * <Py_ssize_t>sizeof(PyObject *)


cdef int _expose_member(int k, type cls, str name, Py_ssize_t offset) except -1:
    old = cls.__dict__[name]
    name_b = name.encode()
    doc = old.__doc__
    doc_b = doc.encode() if doc else None
    _member_keep.append(name_b)
    _member_keep.append(doc_b)
    _members[k].name = name_b
    _members[k].type = T_OBJECT_EX
    _members[k].offset = offset
    _members[k].flags = READONLY
    _members[k].doc = <const char *>doc_b if doc_b is not None else NULL
    descr = PyDescr_NewMember(<PyTypeObject *>cls, &_members[k])
    PyDict_SetItemString(<object>(<PyTypeObject *>cls).tp_dict, _members[k].name, descr)
    PyType_Modified(<PyTypeObject *>cls)
    return 0


cdef int _expose_members() except -1:
    cdef Completion c = _new_completion()
    cdef Operation o = _new_operation()
    cdef int k = 0
    marker = object()
    for name in ("key", "operation", "error", "data", "more"):
        if name == "key":
            c.key = marker
        elif name == "operation":
            c.operation = o
        elif name == "error":
            c.error = marker
        elif name == "data":
            c.data = marker
        else:
            c.more = marker
        off = _slot_of(c, o if name == "operation" else marker)
        c.key = c.error = c.data = c.more = None
        c.operation = None
        _expose_member(k, Completion, name, off)
        k += 1
    for name in ("socket", "key", "callback"):
        if name == "socket":
            o.socket = marker
        elif name == "key":
            o.key = marker
        else:
            o.callback = marker
        off = _slot_of(o, marker)
        o.socket = o.key = o.callback = None
        _expose_member(k, Operation, name, off)
        k += 1
    return 0


_expose_members()


# --------------------------------------------------------------------------
# The port

cdef class Stream          # src/stream.pxi


# A port's registration entry is the socket itself, or (socket, key) when a
# key was given: an idle connection keeps no tuple of its own.
cdef inline object _reg_sock(object entry):
    return entry[0] if type(entry) is tuple else entry


cdef inline object _reg_key(object entry):
    return entry[1] if type(entry) is tuple else None


cdef class CompletionPort:
    """An I/O completion port.

    ``CompletionPort(concurrency=0, *, backend=None, queue_capacity=1024,
    ring_entries=0, single_issuer=False, cooperative=False)``

    ``concurrency`` caps how many threads dispatch completions at the same
    time (0: the number of CPUs), like the NumberOfConcurrentThreads of
    CreateIoCompletionPort.  ``backend`` picks "iocp", "io_uring" or
    "epoll" (default: the IOCP_BACKEND environment variable, else the best
    the platform offers).  ``queue_capacity`` bounds the queue between the
    kernel and Python dispatch: when it is full the port stops reaping and
    the kernel holds the rest, so memory stays bounded and nothing is lost.

    ``single_issuer=True`` makes a port for one thread -- an event loop:
    the first thread that registers, submits or waits owns it, the native
    layer skips its mutex and thread election where the backend allows it
    (epoll, IOCP; io_uring keeps the mutex until its wake-up is lock-free),
    and any other thread calling a
    method other than ``post``, ``stop``, ``stats``, ``closed``,
    ``pending`` and ``repr`` gets RuntimeError.  ``post`` and ``stop`` from
    another thread still work: they wake the owner, which runs the post.

    ``cooperative=True`` promises that every thread that starts an
    operation on the port also waits on it (a server with one loop
    thread), or else sleeps: on io_uring the kernel then finishes an
    operation when its starting thread next enters the kernel instead of
    interrupting that thread (COOP_TASKRUN), which spares an interrupt
    per completion.  A starting thread that spins in user code without
    system calls may delay its completions by up to a scheduler tick.
    Implied by ``single_issuer``; other backends ignore it.
    """
    cdef iocp_port *_port
    cdef dict _registered          # fd -> socket, or (socket, key) for a key
                                   # (see _reg_sock: no tuple per socket)
    cdef object _backlog           # Completions taken but not yet delivered
    cdef readonly str backend
    """The backend in use: "iocp", "io_uring" or "epoll"."""
    cdef public object exception_handler
    """Called as ``handler(exc, completion)`` when a callback raises; None logs."""
    cdef Py_ssize_t _pinned
    cdef Py_ssize_t _waiters        # threads inside a native wait
    cdef Py_ssize_t _holders        # threads holding dequeued native completions
    cdef bint _destroy_deferred     # close() left the final free to the last holder
    cdef unsigned long _stop_gen
    cdef bint _closing
    cdef dict _final_stats          # stats() as they were when close() ended
    cdef set _run_threads           # idents of threads inside run()
    cdef readonly bint single_issuer
    """True for a port only its owner thread may use (see the class doc)."""
    cdef readonly bint cooperative
    """True when made with ``cooperative=True`` or ``single_issuer=True``."""
    cdef bint _has_owner
    cdef unsigned long _owner       # single-issuer: ident of the owner thread
    cdef object _foreign            # single-issuer: posts made by other threads
    cdef Py_ssize_t _nforeign       # len(_foreign), tested on every wait
    cdef dict _ms_recv              # fd -> its armed multishot recv Operation
    cdef list _flush_list           # Streams with work for the next flush
    cdef set _streams               # live Streams (aborted by close())
    cdef Py_ssize_t _stream_events  # Stream events delivered so far
    cdef int64_t _batch_ns          # the clock when the batch being dispatched was taken
    cdef public bint return_on_stream_events
    """When true, run() returns after a batch (or flush) in which a Stream
    called its protocol -- for an event loop built on run(), whose
    protocols schedule work run() knows nothing of.  Default False."""

    def __cinit__(self, unsigned concurrency=0, *, backend=None,
                  unsigned queue_capacity=1024, unsigned ring_entries=0,
                  bint single_issuer=False, bint cooperative=False):
        cdef iocp_port_options opts
        cdef bytes name_b
        self._port = NULL
        memset(&opts, 0, sizeof(opts))
        if backend is None:
            backend = _os.environ.get("IOCP_BACKEND") or None
        if backend is not None:
            if not isinstance(backend, str):
                raise TypeError("backend must be a str or None")
            if backend not in KNOWN_BACKENDS:
                raise ValueError(
                    f"unknown backend {backend!r}; backends are {list(KNOWN_BACKENDS)}")
            if backend not in _backend_names():
                # A real backend, for another platform (iocp on Linux,
                # io_uring or epoll on Windows, io_uring left out of the
                # build): the same OSError as one the kernel refuses.
                raise OSError(_errno.ENOSYS,
                              f"backend {backend!r} cannot run here: this build "
                              f"has only {_backend_names()}")
            name_b = backend.encode("ascii")
            opts.backend = name_b
        if queue_capacity == 0:
            raise ValueError("queue_capacity must be positive")
        if queue_capacity > IOCP_QUEUE_CAPACITY_MAX:
            raise ValueError(f"queue_capacity must be at most {IOCP_QUEUE_CAPACITY_MAX}")
        opts.queue_capacity = queue_capacity
        opts.concurrency = concurrency
        opts.ring_entries = ring_entries
        opts.single_issuer = 1 if single_issuer else 0
        self.single_issuer = single_issuer
        opts.cooperative = 1 if (cooperative or single_issuer) else 0
        self.cooperative = cooperative or single_issuer
        self._has_owner = False
        self._owner = 0
        self._foreign = _deque()
        self._nforeign = 0
        self._ms_recv = {}
        self._flush_list = []
        r = iocp_port_create(&opts, &self._port)
        if r < 0:
            err = _oserror(r)
            if backend is not None:
                raise OSError(err.errno, f"backend {backend!r} cannot run here: {err.strerror}")
            raise err
        self.backend = iocp_port_backend(self._port).decode("ascii")
        self._registered = {}
        self._streams = set()
        self._run_threads = set()
        self._backlog = _deque()
        self.exception_handler = None

    def __dealloc__(self):
        cdef iocp_port_stats st
        if self._port != NULL:
            # Ops hold a reference to the port, so none is in flight here
            # unless the interpreter is tearing down; never free memory the
            # kernel may still write to.  A copy inherited through fork()
            # is always freed: that frees the child's memory only.
            iocp_port_get_stats(self._port, &st)
            if st.inflight == 0 or iocp_port_forked(self._port):
                iocp_port_destroy(self._port)
            self._port = NULL

    # ---- state ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once close() has begun."""
        return self._port == NULL or self._closing

    @property
    def pending(self) -> int:
        """Operations in flight (submitted, final completion not dequeued)."""
        return self.stats()["inflight"]

    def stats(self) -> dict:
        """Counters: live op records, ops in flight, port buffers, pinned
        Python buffers, queued completions, queue capacity and peak,
        completions handed out so far."""
        cdef iocp_port_stats st
        if self._port == NULL:
            # Closed: the counters as close() left them (a leak stays
            # visible), with the pin count still live.
            out = dict(self._final_stats or {})
            out["pinned_buffers"] = self._pinned
            out["backlog"] = len(self._backlog)
            return out
        iocp_port_get_stats(self._port, &st)
        return {"live_ops": st.live_ops, "inflight": st.inflight,
                "live_buffers": st.live_buffers, "pinned_buffers": self._pinned,
                "queued": st.queued, "queue_capacity": st.queue_capacity,
                "queue_peak": st.queue_peak, "completions": st.completions,
                "backlog": len(self._backlog)}

    cdef int _check_open(self) except -1:
        if self._port == NULL or self._closing:
            raise ValueError("I/O operation on a closed completion port")
        if iocp_port_forked(self._port):
            raise _forked_error(iocp_port_owner_pid(self._port))
        if self.single_issuer:
            self._check_owner()
        return 0

    cdef int _check_owner(self) except -1:
        """Single-issuer ports: the first thread that comes here owns the
        port; any other raises RuntimeError (the native layer refuses the
        same calls with IOCP_EWRONGTHREAD)."""
        cdef unsigned long me = PyThread_get_thread_ident()
        if not self._has_owner:
            self._owner = me
            self._has_owner = True
        elif self._owner != me:
            raise RuntimeError(
                f"this single-issuer completion port is owned by thread {self._owner} "
                f"and cannot be used from thread {me}; only post(), stop() and "
                f"stats() work from other threads")
        return 0

    cdef inline bint _foreign_thread(self) noexcept:
        """True on a single-issuer port that has an owner other than the
        calling thread."""
        return (self.single_issuer and self._has_owner and
                self._owner != PyThread_get_thread_ident())

    cdef int _drain_foreign(self) except -1:
        """Owner thread: submits the posts other threads queued (see
        post()), oldest first, so they complete in this thread's waits."""
        cdef Operation op
        while self._foreign:
            op = <Operation>self._foreign[0]
            op._op = iocp_op_alloc_short(self._port)   # a POST: no address tail
            if op._op == NULL:
                raise MemoryError()        # the rest wait for the next drain
            self._foreign.popleft()
            self._nforeign -= 1
            op._op.kind = IOCP_OP_POST
            op._op.user = <void *>op
            op._op.len = <size_t>op._post_nbytes
            self._submit(op)
        return 0

    # ---- sockets -------------------------------------------------------

    def register(self, sock, key=None) -> None:
        """Associates a socket with the port (CreateIoCompletionPort).

        The socket is made non-blocking.  Completions of its operations
        carry ``key``.  A socket must be registered before operations are
        posted on it; call ``unregister`` before closing it.
        """
        self._check_open()
        if not isinstance(sock, _socket.socket):
            raise TypeError(f"expected a socket.socket, got {type(sock).__name__}")
        fd = sock.fileno()
        if fd < 0:
            raise OSError(9, "cannot register a closed socket")
        old = self._registered.get(fd)
        if old is not None and _reg_sock(old).fileno() == fd:
            raise ValueError("socket is already registered with this port")
        sock.setblocking(False)
        _check(iocp_register(self._port, fd))
        self._registered[fd] = sock if key is None else (sock, key)

    def unregister(self, sock) -> None:
        """Forgets a socket, cancelling its pending operations.

        Their completions (cancelled, or successful if they raced) still
        arrive.  Works on a socket that was already closed.
        """
        self._check_open()
        if not isinstance(sock, _socket.socket):
            raise TypeError(f"expected a socket.socket, got {type(sock).__name__}")
        fd = sock.fileno()
        if fd < 0 or _reg_sock(self._registered.get(fd)) is not sock:
            for k, entry in self._registered.items():
                if _reg_sock(entry) is sock:
                    fd = k
                    break
            else:
                raise ValueError("socket is not registered with this port")
        del self._registered[fd]
        r = iocp_unregister(self._port, fd)
        if r < 0 and r != IOCP_ENOENT:
            raise _oserror(r)

    # ---- submitting ----------------------------------------------------

    cdef Operation _new_op(self, int kind, object sock, object callback):
        cdef Operation op
        cdef long long fd = -1
        self._check_open()
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable or None")
        op = _new_operation()
        op._port = self
        op._kind = kind
        op.callback = callback
        if kind != IOCP_OP_POST:
            fd = _sock_fd(sock)
            entry = self._registered.get(fd)
            if entry is None or fd < 0:
                raise ValueError("socket is not registered with this port")
            op.socket = sock
            op.key = _reg_key(entry)
        if (kind == IOCP_OP_RECV or kind == IOCP_OP_RECV_INTO or kind == IOCP_OP_POLL
                or kind == IOCP_OP_POST):
            op._op = iocp_op_alloc_short(self._port)   # no address tail
        else:
            op._op = iocp_op_alloc(self._port)
        if op._op == NULL:
            raise MemoryError()
        op._op.kind = kind
        op._op.user = <void *>op
        if kind != IOCP_OP_POST:
            op._op.sock = fd
        return op

    cdef Operation _submit(self, Operation op):
        cdef int r
        Py_INCREF(op)          # owned by the native record until completion
        r = iocp_submit(self._port, op._op)
        if r < 0:
            Py_DECREF(op)
            op._unpin()
            iocp_op_free(self._port, op._op)
            op._op = NULL
            op._done = True
            raise _oserror(r)
        return op

    cdef int _pin(self, Operation op, object data, int flags) except -1:
        if flags == PyBUF_SIMPLE and PyBytes_CheckExact(data):
            # bytes cannot change or move: the strong reference in _obj
            # pins it, with no buffer export to take and release.
            op._refpin = True
            op._pinned = True
            self._pinned += 1
            op._obj = data
            op._op.buf = PyBytes_AS_STRING(data)
            op._op.len = <size_t>PyBytes_GET_SIZE(data)
            return 0
        try:
            PyObject_GetBuffer(data, &op._view, flags)
        except BufferError:
            # As socket.recv_into does: a read-only buffer is a type error.
            raise TypeError(
                f"a writable bytes-like object is required, not {type(data).__name__}")
        op._pinned = True
        self._pinned += 1
        op._obj = data
        op._op.buf = <char *>op._view.buf
        op._op.len = <size_t>op._view.len
        return 0

    cdef int _discard(self, Operation op) except -1:
        op._unpin()
        iocp_op_free(self._port, op._op)
        op._op = NULL
        op._done = True
        return 0

    def accept(self, listen_sock, callback=None, *, bint multishot=False,
               bint address=True) -> Operation:
        """Accepts one connection (AcceptEx) on a registered listening socket.

        The completion's ``data`` is ``(conn, address)``; ``conn`` is a new
        socket, not yet registered.  With ``multishot=True`` the operation
        stays armed and completes once per connection (``completion.more``)
        until cancelled.  ``address=False`` gives ``(conn, None)``: for a
        caller that reads the peer itself (a multishot accept would
        otherwise ask the kernel for each connection's peer, as they share
        the record's address field).
        """
        cdef Operation op = self._new_op(IOCP_OP_ACCEPT, listen_sock, callback)
        op._no_address = not address
        if multishot:
            op._op.flags |= IOCP_OPF_MULTISHOT
            op._multishot = True
        return self._submit(op)

    def connect(self, sock, address, callback=None) -> Operation:
        """Connects a registered socket (ConnectEx): IPv4, IPv6 or Unix.

        Host names are resolved first (blocking, as ``socket.connect``).
        """
        cdef Operation op = self._new_op(IOCP_OP_CONNECT, sock, callback)
        try:
            _fill_address(op._op, sock, address)
        except BaseException:
            self._discard(op)
            raise
        return self._submit(op)

    cdef int _check_no_multishot_recv(self, Operation op) except -1:
        """A socket with an armed multishot recv takes no other recv: the
        bytes would be split between two operations in no useful order."""
        cdef Operation armed
        entry = self._ms_recv.get(op._op.sock)
        if entry is None:
            return 0
        armed = <Operation>entry
        if armed._done or armed.socket is not op.socket:
            # Finished, or an earlier socket's whose descriptor was reused.
            del self._ms_recv[op._op.sock]
            return 0
        self._discard(op)
        raise OSError(_errno.EBUSY, "a multishot recv is armed on this socket; "
                      "cancel it before another recv")

    def recv(self, sock, Py_ssize_t nbytes, callback=None, *,
             bint multishot=False) -> Operation:
        """Receives up to ``nbytes`` (WSARecv) into a buffer the port picks
        when data arrives; the completion's ``data`` is the bytes received
        and ``b""`` when the peer closed its side.

        With ``multishot=True`` the operation stays armed and completes
        once per arrival (``completion.more`` true, ``data`` the bytes, at
        most ``nbytes`` each; 0 means the backend's default size), in
        order, until end of file (``data == b""``), an error or a cancel
        ends it with a final completion (``more`` false).  An armed
        multishot recv pins no buffer while the socket is idle.  While it
        is armed, another recv or recv_into on the socket raises OSError
        (EBUSY)."""
        if nbytes < 0 or (nbytes == 0 and not multishot):
            raise ValueError("nbytes must be positive" if not multishot else
                             "nbytes must be >= 0 (0: the backend's default)")
        cdef Operation op = self._new_op(IOCP_OP_RECV, sock, callback)
        op._op.len = <size_t>nbytes
        if self._ms_recv:
            self._check_no_multishot_recv(op)
        if multishot:
            op._op.flags |= IOCP_OPF_MULTISHOT
            op._multishot = True
            self._submit(op)
            self._ms_recv[op._op.sock] = op
            return op
        return self._submit(op)

    def recv_into(self, sock, buffer, callback=None) -> Operation:
        """Receives into a writable buffer (bytearray, memoryview, array...).

        The buffer is pinned until the completion is dequeued; do not resize
        it meanwhile.  ``completion.nbytes`` tells how much was written.
        """
        cdef Operation op = self._new_op(IOCP_OP_RECV_INTO, sock, callback)
        try:
            self._pin(op, buffer, PyBUF_WRITABLE)
            if op._op.len == 0:
                raise ValueError("cannot receive into an empty buffer")
        except BaseException:
            self._discard(op)
            raise
        if self._ms_recv:
            self._check_no_multishot_recv(op)
        return self._submit(op)

    def send(self, sock, data, callback=None, *, bint silent=False) -> Operation:
        """Sends all of a bytes-like object (WSASend).

        The buffer is pinned until the completion is dequeued.  The op
        completes when every byte is sent, or when an error stops it: then
        ``completion.nbytes`` is what was sent and ``completion.error`` why
        it stopped.

        With ``silent=True`` a send that succeeds completes with no
        Completion and no callback (its record and pin are freed by the
        port); one that fails, stops short or is cancelled completes as
        usual.  Per-socket order is the same either way.
        """
        cdef Operation op = self._new_op(IOCP_OP_SEND, sock, callback)
        try:
            self._pin(op, data, PyBUF_SIMPLE)
        except BaseException:
            self._discard(op)
            raise
        if silent:
            op._op.flags |= IOCP_OPF_SILENT
        return self._submit(op)

    def sendmsg(self, sock, buffers, callback=None, *, bint silent=False) -> Operation:
        """Sends several bytes-like objects as one gathered send (WSASend
        with many WSABUFs, sendmsg), without joining them first.

        Every segment is pinned until the completion is dequeued.  Like
        ``send``, it completes when all bytes are sent or an error stops
        it; ``completion.nbytes`` is the total sent.  At most 1024 segments.
        ``silent=True`` works as for ``send``.
        """
        cdef Operation op
        cdef Py_ssize_t i, n
        cdef size_t total = 0
        seq = buffers if isinstance(buffers, (list, tuple)) else list(buffers)
        n = len(seq)
        if n == 0:
            raise ValueError("sendmsg needs at least one buffer")
        if n > IOCP_IOV_MAX:
            raise ValueError(f"at most {IOCP_IOV_MAX} buffers per sendmsg")
        op = self._new_op(IOCP_OP_SEND, sock, callback)
        try:
            op._views = <Py_buffer *>PyMem_Malloc(n * sizeof(Py_buffer))
            op._iov = <iocp_iovec *>PyMem_Malloc(n * sizeof(iocp_iovec))
            if op._views == NULL or op._iov == NULL:
                raise MemoryError()
            for i in range(n):
                PyObject_GetBuffer(seq[i], &op._views[i], PyBUF_SIMPLE)
                op._nviews += 1
                self._pinned += 1
                op._iov[i].base = op._views[i].buf
                op._iov[i].len = <size_t>op._views[i].len
                total += <size_t>op._views[i].len
        except BaseException:
            self._discard(op)
            raise
        op._obj = seq
        op._op.iov = op._iov
        op._op.iovcnt = <int>n
        op._op.len = total
        if silent:
            op._op.flags |= IOCP_OPF_SILENT
        return self._submit(op)

    def post(self, key=None, Py_ssize_t nbytes=0, obj=None, callback=None) -> Operation:
        """Queues a user packet (PostQueuedCompletionStatus).

        Thread-safe; wakes a waiting loop.  The completion carries ``key``,
        ``nbytes`` and ``data=obj``.  On a single-issuer port a post from a
        thread other than the owner is handed to the owner, which submits
        it on its next wait (so it completes on the owner's thread, after
        the owner's own earlier posts), and ``cancel()`` of it returns
        False until then.
        """
        cdef Operation op
        if nbytes < 0:
            raise ValueError("nbytes must not be negative")
        if self._foreign_thread():
            return self._post_foreign(key, nbytes, obj, callback)
        op = self._new_op(IOCP_OP_POST, None, callback)
        op.key = key
        op._obj = obj
        op._op.len = <size_t>nbytes
        return self._submit(op)

    cdef Operation _post_foreign(self, object key, Py_ssize_t nbytes, object obj,
                                 object callback):
        """post() from a thread that does not own a single-issuer port: no
        native call but the wake (the record pool and the queue are the
        owner's, unlocked).  The GIL orders this with the owner's drain;
        close() sets _closing before it drains, so nothing queued here is
        left behind."""
        cdef Operation op
        if self._port == NULL or self._closing:
            raise ValueError("I/O operation on a closed completion port")
        if iocp_port_forked(self._port):
            raise _forked_error(iocp_port_owner_pid(self._port))
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable or None")
        op = _new_operation()
        op._port = self
        op._kind = IOCP_OP_POST
        op.callback = callback
        op.key = key
        op._obj = obj
        op._post_nbytes = nbytes
        self._foreign.append(op)
        self._nforeign += 1
        _check(iocp_port_wake(self._port))
        return op

    def poll(self, sock, events, callback=None, *, bint multishot=False) -> Operation:
        """Completes when a registered socket is ready: ``events`` is
        ``POLLIN``, ``POLLOUT`` or both; ``completion.data`` is the mask of
        events seen (``POLLERR`` and ``POLLHUP`` are always reported).

        One-shot (the default) it completes at once if the socket is ready
        already.  With ``multishot=True`` it stays armed and completes once
        per readiness event (``completion.more``), edge-style: a reader that
        does not drain the socket may not hear again until more data comes.
        Cancel ends it."""
        cdef Operation op
        if not isinstance(events, int) or isinstance(events, bool):
            raise TypeError(f"events must be an int, not {type(events).__name__}")
        if events == 0 or events & ~(IOCP_POLL_IN | IOCP_POLL_OUT):
            raise ValueError("events must be POLLIN, POLLOUT or POLLIN | POLLOUT")
        op = self._new_op(IOCP_OP_POLL, sock, callback)
        op._op.len = <size_t>events
        if multishot:
            op._op.flags |= IOCP_OPF_MULTISHOT
            op._multishot = True
        return self._submit(op)

    # ---- completing ----------------------------------------------------

    cdef Completion _complete(self, iocp_completion *c):
        """Turns a native completion into a Completion and, if it is the
        op's last, releases the native record, the pin and the native
        reference.  Runs no user code.

        Native resources are released in a ``finally``, so nothing is
        leaked whatever is raised meanwhile (KeyboardInterrupt in
        ``socket.socket()``, MemoryError in a bytes copy).  If building the
        payload fails, the Completion still comes back, with ``data=None``,
        an OSError in ``error`` and the exception in ``_failure`` for
        _convert() to raise once the whole batch is converted.  Raises only
        if not even the Completion could be allocated.

        A silent send's success (IOCP_CF_SILENT) makes no Completion: its
        pin and reference are released and None comes back.

        The native record and port buffer stay in `c` for _convert() to
        hand back with the whole batch (iocp_port_release_batch: one lock
        for all); `op._op` is cleared here so nothing else touches it."""
        cdef Operation op = <Operation>c.op.user
        cdef Completion comp = None
        cdef int kind = op._kind
        cdef bint final = not (c.flags & IOCP_CF_MORE)
        cdef bint buffer = (c.flags & IOCP_CF_BUFFER) != 0
        cdef bint fd_owned = False   # the accepted fd is closed or in a socket
        if c.flags & IOCP_CF_SILENT:
            op._unpin()
            op._obj = None
            op._op = NULL
            op._done = True
            Py_DECREF(op)          # the native record's reference
            return None
        try:
            comp = _new_completion()
            comp.operation = op
            comp.key = op.key
            comp.cancelled = (c.flags & IOCP_CF_CANCELLED) != 0
            comp.more = True if not final else False
            try:
                if c.result < 0:
                    comp.nbytes = 0
                    comp.error = _oserror(c.result)
                else:
                    comp.nbytes = <Py_ssize_t>c.result
                    if c.error < 0:
                        comp.error = _oserror(c.error)
                if kind == IOCP_OP_RECV:
                    if buffer:
                        _test_fail_point()
                        comp.data = PyBytes_FromStringAndSize(c.data, <Py_ssize_t>c.result)
                    elif c.result >= 0:
                        comp.data = b""
                elif kind == IOCP_OP_ACCEPT:
                    if c.result >= 0:
                        comp.nbytes = 0
                        fd_owned = True
                        comp.data = self._accepted(op, c.result)
                elif kind == IOCP_OP_RECV_INTO or kind == IOCP_OP_POST:
                    comp.data = op._obj
                elif kind == IOCP_OP_POLL:
                    comp.nbytes = 0
                    if c.result >= 0:
                        comp.data = <int>c.result
            except BaseException as exc:
                comp._failure = exc
                comp.data = None
                comp.nbytes = 0
                comp.error = _lost_result(kind, exc)
        finally:
            # Cannot be skipped, and calls nothing that can raise.  The
            # buffer and the record go back with the batch (_convert).
            if kind == IOCP_OP_ACCEPT and c.result >= 0 and not fd_owned:
                iocp_socket_close(<iocp_socket_t>c.result)
            if final:
                if op._multishot and kind == IOCP_OP_RECV:
                    if self._ms_recv.get(op._op.sock) is op:
                        del self._ms_recv[op._op.sock]
                op._unpin()
                op._obj = None
                op._op = NULL
                op._done = True
                Py_DECREF(op)      # the native record's reference
        return comp

    cdef object _accepted(self, Operation op, int64_t fd):
        """(socket, address) for an accepted fd.  On every path, the fd ends
        up either in the returned socket or closed."""
        ls = op.socket
        try:
            _test_fail_point()
            conn = _socket.socket(ls.family, ls.type, ls.proto, fileno=fd)
        except BaseException:
            iocp_socket_close(<iocp_socket_t>fd)
            raise
        try:
            if op._no_address:
                return (conn, None)
            if op._multishot:
                # Every connection of a multishot accept shares the record's
                # address field, so by dispatch time it may hold a later peer.
                try:
                    return (conn, conn.getpeername())
                except OSError:
                    return (conn, None)   # the peer is already gone
            return (conn, _address_from(op._op))
        except BaseException:
            conn.close()
            raise

    cdef int _deliver(self, Completion comp, object handler) except -1:
        """Runs a completion's callback (or the run() handler).  Exceptions
        go to the exception handler; the loop goes on."""
        cb = comp.operation.callback
        if cb is None:
            cb = handler
        if cb is None:
            _log.warning("completion without callback or handler dropped: %r", comp)
            return 0
        try:
            cb(comp)
        except Exception as exc:
            self._handle_exception(exc, comp)
        return 0

    cdef int _handle_exception(self, object exc, object comp) except -1:
        handler = self.exception_handler
        if handler is not None:
            try:
                handler(exc, comp)
                return 0
            except Exception:
                _log.exception("exception handler raised")
        _log.error("callback for %r raised", comp, exc_info=exc)
        return 0

    cdef int _wait(self, iocp_completion *batch, int max, int timeout_ms,
                   unsigned wake_gen, bint once=False) except? -1:
        """One native wait, counted so close() knows when nobody waits.
        Returns 0 at once if stop() woke the port since `wake_gen`.
        `once`: iocp_port_run_once, which first ends this thread's previous
        dispatch (its held-back submissions go out with this wait)."""
        cdef int n = 0
        self._waiters += 1
        try:
            if timeout_ms == 0:
                # A poll never blocks (the port mutex is only ever held
                # briefly, by native code), so it keeps the GIL: releasing
                # it would let another thread take it for a whole switch
                # interval (5 ms) at every loop turn that has work queued.
                if once:
                    n = iocp_port_run_once(self._port, batch, max, 0, wake_gen)
                else:
                    n = iocp_port_wait_since(self._port, batch, max, 0, wake_gen)
            elif once:
                with nogil:
                    n = iocp_port_run_once(self._port, batch, max, timeout_ms, wake_gen)
            else:
                with nogil:
                    n = iocp_port_wait_since(self._port, batch, max, timeout_ms, wake_gen)
            if n > 0:
                # Until _convert() has turned them into Completions, these
                # records must outlive any close() on another thread.
                self._holders += 1
                # The streams' activity stamps: one clock read per batch,
                # not one per message.
                self._batch_ns = iocp__stream_clock_ns()
        finally:
            self._waiters -= 1
        if n == IOCP_EINTR:
            PyErr_CheckSignals()
            return 0
        if n < 0:
            raise _oserror(n)
        return n

    cdef object _convert(self, iocp_completion *batch, int n, list out):
        """Turns a dequeued batch into Completions appended to `out`, all
        before any callback runs (so no user code runs while native records
        are held), then gives up the holder count that _wait() took.

        Every record is converted and released even if converting one of
        them raises (KeyboardInterrupt, MemoryError): the first such
        exception is returned, for the caller to raise once the batch's
        Completions are safe (delivered or in the backlog).  The batch's
        native records and port buffers go back in one locked call."""
        cdef int i
        cdef Completion comp
        cdef Stream stream
        first = None
        try:
            for i in range(n):
                if iocp__user_is(batch[i].op.user, <PyTypeObject *>Stream):
                    # A Stream's record: no Completion; the stream appends
                    # (stream, payload) for _dispatch when there is news.
                    stream = <Stream>batch[i].op.user
                    try:
                        stream._native(&batch[i], out)
                    except BaseException as exc:
                        if first is None:
                            first = exc
                    continue
                try:
                    comp = self._complete(&batch[i])
                    if comp is None:
                        continue           # a silent success: nobody to tell
                    if comp._failure is not None:
                        if first is None:
                            first = comp._failure
                        comp._failure = None
                    out.append(comp)
                except BaseException as exc:
                    # Not even a Completion (out of memory): the record is
                    # released all the same, but its callback cannot be told.
                    if first is None:
                        first = exc
        finally:
            iocp_port_release_batch(self._port, batch, n)
            self._holders -= 1
            if self._destroy_deferred and self._holders == 0:
                self._finish_close()
        return first

    cdef int _split_stream_events(self, list got, list out) except -1:
        """get_many(): delivers the streams' (stream, payload) pairs of a
        converted batch, in order, and appends its Completions to `out`.
        If a stream's callback raises BaseException, the rest of the batch
        goes to the backlog."""
        cdef Py_ssize_t i = 0, m = len(got)
        try:
            while i < m:
                comp = got[i]
                i += 1
                if type(comp) is Stream:
                    i += 1
                    (<Stream>comp)._event(got[i - 1])
                else:
                    out.append(comp)
        except BaseException:
            self._backlog.extend(out)
            del out[:]
            for j in range(i, m):
                self._backlog.append(got[j])
            raise
        return 0

    cdef int _deliver_backlog_one(self, object handler) except -1:
        """Delivers the oldest backlog entry: a Completion, or a stream's
        (stream, payload) pair."""
        comp = self._backlog.popleft()
        if type(comp) is Stream:
            (<Stream>comp)._event(self._backlog.popleft())
        else:
            self._deliver(comp, handler)
        return 0

    cdef Py_ssize_t _flush(self) except -1:
        """Runs every Stream on the flush list (their queued writes go out
        as one send each; held data, write_eof, close and abort finish).
        Returns how many protocol events that delivered.  Rounds are
        bounded: what a round's callbacks add waits for the next flush
        after 16 rounds."""
        cdef Py_ssize_t ev = 0, i, m
        cdef int rounds = 0
        cdef Stream st
        if self._flush_list:
            self._batch_ns = iocp__stream_clock_ns()   # held data it delivers
        while self._flush_list and rounds < 16:
            rounds += 1
            todo = self._flush_list
            self._flush_list = []
            m = len(todo)
            i = 0
            try:
                while i < m:
                    st = <Stream>todo[i]
                    i += 1
                    ev += st._flush()
            except BaseException:
                # Those not reached keep their place for the next flush.
                for j in range(i, m):
                    self._flush_list.append(todo[j])
                raise
        return ev

    cdef int _drop_registration(self, object sock, long long fd) except -1:
        """A Stream's end: forgets its socket (no _check_open: also while
        closing)."""
        entry = self._registered.get(fd)
        if entry is not None and _reg_sock(entry) is sock:
            del self._registered[fd]
            if self._port != NULL:
                iocp_unregister(self._port, <iocp_socket_t>fd)
        return 0

    def flush(self) -> None:
        """Sends what the streams of this port have queued (and finishes
        their pending close/write_eof/abort) now, rather than right before
        the next wait, where run(), run_once(), get() and get_many() do it."""
        self._check_open()
        if self._flush_list:
            self._flush()

    def run(self, timeout=None, handler=None) -> int:
        """The completion loop: waits (GIL released), takes completions in
        batches and calls each operation's callback with its Completion.

        Completions of operations without a callback go to ``handler``.
        Returns the number dispatched when ``stop()`` or ``close()`` is
        called, or when ``timeout`` seconds pass (None or ``inf``: never;
        any finite timeout works, a long one waits in slices; negative or
        NaN raises ValueError).  Several threads may run the loop at once;
        ``concurrency`` caps how many dispatch together.
        """
        cdef unsigned long gen = self._stop_gen
        cdef unsigned wake_gen
        cdef bint main = _on_main_thread()
        self._check_open()
        me = PyThread_get_thread_ident()
        if me in self._run_threads:
            # The outer run() holds a dispatch slot: a nested loop could
            # wait forever for one (concurrency=1) and would reorder
            # completions under the outer batch.
            raise RuntimeError("run() called from a callback of run() on the same thread")
        cdef double timeout_s = _timeout_seconds(timeout)
        wake_gen = iocp_port_wake_gen(self._port)
        if gen != self._stop_gen:
            return 0
        self._run_threads.add(me)
        try:
            return self._run_loop(gen, wake_gen, main, timeout_s, handler)
        finally:
            self._run_threads.discard(me)

    cdef object _run_loop(self, unsigned long gen, unsigned wake_gen, bint main,
                          double timeout, object handler):
        """run() after its checks; `timeout` in seconds, < 0: forever.

        Each batch's dispatch is ended by the next wait itself
        (iocp_port_run_once), so what the callbacks submitted goes to the
        kernel with that wait; the last one is ended on the way out."""
        cdef iocp_completion batch[BATCH]
        cdef int n, slice_ms
        cdef Py_ssize_t dispatched = 0
        cdef double deadline = 0.0, left
        cdef bint holding = False      # this thread's last batch is not ended
        cdef Py_ssize_t k, before
        if timeout >= 0:
            deadline = _monotonic() + timeout
        try:
            while not self._closing and gen == self._stop_gen:
                if self._backlog:
                    self._deliver_backlog_one(handler)
                    dispatched += 1
                    continue
                if self._flush_list:
                    k = self._flush()
                    dispatched += k
                    if self._closing or gen != self._stop_gen:
                        break
                    if k and self.return_on_stream_events:
                        break
                if self._nforeign:
                    # Their wake changed the generation: wait on the new
                    # one (a stop() since then bumped _stop_gen first,
                    # seen above).
                    wake_gen = iocp_port_wake_gen(self._port)
                    self._drain_foreign()
                slice_ms = -1
                if timeout >= 0:
                    left = deadline - _monotonic()
                    if left <= 0:
                        break
                    slice_ms = _slice_ms(left)
                if main and (slice_ms < 0 or slice_ms > SIGNAL_SLICE_MS):
                    slice_ms = SIGNAL_SLICE_MS
                if self._flush_list:
                    slice_ms = 0       # the flush's round bound left work
                holding = False        # the wait ends it, whatever it returns
                n = self._wait(batch, BATCH, slice_ms, wake_gen, True)
                if n == 0:
                    if main:
                        PyErr_CheckSignals()
                    continue
                holding = True
                before = self._stream_events
                dispatched += self._dispatch(batch, n, handler, False)
                if self.return_on_stream_events and self._stream_events != before:
                    break
            # Writes the last callbacks queued start before run() returns.
            if self._flush_list and not self._closing and self._port != NULL:
                dispatched += self._flush()
        finally:
            # close() from a callback may have freed the port already.
            if holding and self._port != NULL:
                iocp_port_dispatch_done(self._port)
        return dispatched

    cdef Py_ssize_t _dispatch(self, iocp_completion *batch, int n,
                              object handler, bint end) except -1:
        """Converts a dequeued batch and runs its callbacks in order;
        `end`: then ends the dispatch (else the caller's next run_once
        wait, or its own dispatch_done, does).  Returns how many
        completions were dispatched."""
        cdef Py_ssize_t dispatched = 0
        cdef Py_ssize_t i = 0, m
        cdef object pending_exc = None
        comps = []
        try:
            # A conversion failure (Ctrl-C during socket.socket(), ...)
            # is raised like one from a callback: every converted
            # completion of the batch waits in the backlog.
            pending_exc = self._convert(batch, n, comps)
            m = len(comps)
            while i < m:
                comp = comps[i]
                i += 1
                if type(comp) is Stream:
                    # A stream's news: (stream, payload), in batch order.
                    ev = comps[i]
                    i += 1
                    if pending_exc is not None:
                        self._backlog.append(comp)
                        self._backlog.append(ev)
                        continue
                    try:
                        self._stream_events += 1
                        (<Stream>comp)._event(ev)
                        dispatched += 1
                    except BaseException as exc:
                        pending_exc = exc
                    continue
                if pending_exc is not None:
                    self._backlog.append(comp)
                    continue
                try:
                    self._deliver(comp, handler)
                    dispatched += 1
                except BaseException as exc:   # KeyboardInterrupt, SystemExit
                    pending_exc = exc
        finally:
            # close() from a callback may have freed the port already.
            if end and self._port != NULL:
                iocp_port_dispatch_done(self._port)
        if pending_exc is not None:
            raise pending_exc
        return dispatched

    def run_once(self, timeout=None, handler=None) -> int:
        """One turn of an event loop: submits what is queued, waits once
        (GIL released) for completions, dispatches that one batch (as
        ``run()`` does: callbacks, else ``handler``) and returns how many
        were dispatched.

        Returns 0 when ``timeout`` seconds pass with nothing to do (None or
        ``inf``: wait as long as it takes; 0: only take what is ready), or
        when ``stop()`` or ``close()`` is called meanwhile.  A batch of
        silent sends' successes only (nothing to dispatch) does not end it.  No posted
        packet or ``stop()`` is needed to make it return.  Completions left
        over from a batch whose callback raised are dispatched first, with
        no wait.

        Operations the callbacks submitted have been handed to the kernel
        when it returns.  (``run()`` saves that step: it hands them over
        with its next wait.)
        """
        cdef unsigned long gen = self._stop_gen
        cdef unsigned wake_gen
        cdef double timeout_s
        self._check_open()
        timeout_s = _timeout_seconds(timeout)
        me = PyThread_get_thread_ident()
        if me in self._run_threads:
            raise RuntimeError("run_once() called from a callback of run() or "
                               "run_once() on the same thread")
        wake_gen = iocp_port_wake_gen(self._port)
        self._run_threads.add(me)
        try:
            return self._run_once(gen, wake_gen, _on_main_thread(), timeout_s, handler)
        finally:
            self._run_threads.discard(me)

    cdef Py_ssize_t _run_once(self, unsigned long gen, unsigned wake_gen, bint main,
                              double timeout, object handler) except -1:
        """run_once() after its checks; `timeout` in seconds, < 0: forever."""
        cdef iocp_completion batch[BATCH]
        cdef int n, slice_ms
        cdef Py_ssize_t dispatched = 0
        cdef double deadline = 0.0
        if self._backlog:
            while self._backlog and not self._closing:
                self._deliver_backlog_one(handler)
                dispatched += 1
            return dispatched
        if timeout > 0:
            deadline = _monotonic() + timeout
        while not self._closing and gen == self._stop_gen:
            if self._nforeign:
                wake_gen = iocp_port_wake_gen(self._port)
                self._drain_foreign()
            if self._flush_list:
                # Streams' writes go out with this wait.  Events the flush
                # delivered (held data, connection_lost) count as this
                # turn's: take only what is ready, then return.
                dispatched += self._flush()
                if self._closing or gen != self._stop_gen:
                    break
                if dispatched > 0:
                    timeout = 0
            slice_ms = -1
            if timeout >= 0:
                slice_ms = _slice_ms(deadline - _monotonic()) if timeout > 0 else 0
            if main and (slice_ms < 0 or slice_ms > SIGNAL_SLICE_MS):
                slice_ms = SIGNAL_SLICE_MS
            if self._flush_list:
                slice_ms = 0           # the flush's round bound left work
            n = self._wait(batch, BATCH, slice_ms, wake_gen, True)
            if n > 0:
                # Ended before returning: what the callbacks submitted
                # (and the streams' writes, flushed here) has started by
                # then (io_uring: held-back SQEs go out), whatever the
                # caller does next.  run() folds this into its next wait
                # instead.
                try:
                    dispatched += self._dispatch(batch, n, handler, False)
                    if self._flush_list and not self._closing:
                        dispatched += self._flush()
                finally:
                    if self._port != NULL:
                        iocp_port_dispatch_done(self._port)
                if dispatched > 0 or self._backlog:
                    return dispatched
                # Only silent successes: nothing happened for the caller;
                # keep waiting (within the timeout).
                if timeout == 0 or (timeout > 0 and _monotonic() >= deadline):
                    break
                continue
            if main:
                PyErr_CheckSignals()
            if self._nforeign:
                continue               # woken by a post from another thread
            if timeout == 0 or (timeout > 0 and _monotonic() >= deadline):
                break
        return dispatched

    def stop(self) -> None:
        """Makes every running ``run()`` return after its current batch.

        Thread-safe (also from a callback or a signal handler).
        """
        self._stop_gen += 1
        if self._port != NULL:
            iocp_port_wake(self._port)

    def get(self, timeout=None):
        """Takes one completion (GetQueuedCompletionStatus), or None on
        timeout.  Does not call the operation's callback.  ``timeout`` in
        seconds; None (or ``inf``) waits forever, 0 polls; negative or NaN
        raises ValueError."""
        got = self.get_many(1, timeout)
        return got[0] if got else None

    def get_many(self, int max=BATCH, timeout=None):
        """Takes up to ``max`` completions (GetQueuedCompletionStatusEx),
        waiting up to ``timeout`` seconds for the first.  Returns [] on
        timeout.  Does not call callbacks."""
        cdef iocp_completion batch[BATCH]
        cdef int n, i, slice_ms
        cdef bint main = _on_main_thread()
        cdef double deadline = 0.0, left
        cdef double timeout_s
        self._check_open()
        if max <= 0:
            raise ValueError("max must be positive")
        if max > BATCH:
            max = BATCH
        timeout_s = _timeout_seconds(timeout)
        out = []
        while self._backlog and len(out) < max:
            comp = self._backlog.popleft()
            if type(comp) is Stream:
                (<Stream>comp)._event(self._backlog.popleft())
            else:
                out.append(comp)
        if out:
            return out
        if timeout_s >= 0:
            deadline = _monotonic() + timeout_s
        while not self._closing:
            if self._nforeign:
                self._drain_foreign()
            if self._flush_list:
                self._flush()
            slice_ms = -1
            if timeout_s >= 0:
                slice_ms = _slice_ms(deadline - _monotonic())
            if main and (slice_ms < 0 or slice_ms > SIGNAL_SLICE_MS):
                slice_ms = SIGNAL_SLICE_MS
            n = self._wait(batch, max, slice_ms, iocp_port_wake_gen(self._port))
            if n > 0:
                got = []
                try:
                    exc = self._convert(batch, n, got)
                finally:
                    if self._port != NULL:
                        iocp_port_dispatch_done(self._port)
                if exc is not None:
                    # Nothing taken is lost: the next get()/run() serves it.
                    self._backlog.extend(got)
                    raise exc
                # Streams are told here (they have no Completion to hand
                # out); the rest is returned.
                self._split_stream_events(got, out)
                if out:
                    return out
                if timeout_s >= 0 and _monotonic() >= deadline:
                    return out
                continue
            if main:
                PyErr_CheckSignals()
            if timeout_s >= 0 and _monotonic() >= deadline:
                return out
        return out

    # ---- closing -------------------------------------------------------

    def close(self) -> None:
        """Cancels every pending operation, delivers their completions
        (callbacks run; completions of ops without one are discarded), and
        frees the port.  Idempotent.  Other threads in ``run()`` return.
        """
        cdef iocp_completion batch[BATCH]
        cdef iocp_port_stats st
        cdef int n, i, idle = 0
        conv_exc = None
        if self._port == NULL or self._closing:
            return
        if self.single_issuer and not iocp_port_forked(self._port):
            self._check_owner()
        self._closing = True
        self._stop_gen += 1
        if iocp_port_forked(self._port):
            # A fork() child's copy: the ops in flight are the parent's, and
            # cancelling, draining or unregistering would act on the parent's
            # ring or epoll set.  Free the child's memory and nothing else
            # (the child's copies of in-flight Operations stay referenced).
            self._final_stats = self.stats()
            self._registered.clear()
            self._backlog.clear()
            iocp_port_destroy(self._port)
            self._port = NULL
            return
        iocp_port_begin_close(self._port)
        # Posts other threads queued before _closing was set: they are
        # delivered (callbacks run) like every other pending completion.
        self._drain_foreign()
        # Live streams are aborted: their records are cancelled with the
        # rest, and each gets its connection_lost(None) once they are back.
        for stream in list(self._streams):
            (<Stream>stream)._lose(None)
        iocp_cancel_all(self._port)
        while True:
            while self._backlog:
                comp = self._backlog.popleft()
                if type(comp) is Stream:
                    (<Stream>comp)._event(self._backlog.popleft())
                elif comp.operation.callback is not None:
                    self._deliver(comp, None)
            if self._flush_list:
                try:
                    self._flush()
                except BaseException as exc:
                    self._handle_exception(exc, None)
            iocp_port_get_stats(self._port, &st)
            if st.inflight == 0 and st.queued == 0 and not self._flush_list:
                break
            with nogil:
                n = iocp_port_wait(self._port, batch, BATCH, 100)
            if n <= 0:
                idle += 1
                if idle % 10 == 0:
                    iocp_cancel_all(self._port)   # ops submitted by racing threads
                if idle >= 600:
                    _log.error("iocp: %d operations never completed after cancel; "
                               "leaking the port rather than freeing memory the "
                               "kernel may still use", st.inflight)
                    self._final_stats = self.stats()
                    self._port = NULL
                    if conv_exc is not None:
                        raise conv_exc
                    return
                continue
            idle = 0
            self._holders += 1
            comps = []
            try:
                exc = self._convert(batch, n, comps)
                if exc is not None and conv_exc is None:
                    # Raised once the port is drained and freed: stopping
                    # here would leave ops in flight.
                    conv_exc = exc
                i = 0
                while i < len(comps):
                    comp = comps[i]
                    i += 1
                    if type(comp) is Stream:
                        i += 1
                        try:
                            (<Stream>comp)._event(comps[i - 1])
                        except BaseException as exc:
                            self._handle_exception(exc, None)
                    elif comp.operation.callback is not None:
                        try:
                            self._deliver(comp, None)
                        except BaseException as exc:
                            self._handle_exception(exc, comp)
            finally:
                iocp_port_dispatch_done(self._port)
        # Threads still inside a wait were woken above; let them leave, and
        # let threads converting a batch finish with its records.
        deadline = _monotonic() + 5.0
        while self._waiters > 0 or self._holders > 0:
            if _monotonic() > deadline:
                # Most likely this thread is itself mid-conversion (close()
                # from a finalizer): the last holder frees the port.
                self._destroy_deferred = True
                break
            iocp_port_wake(self._port)
            _sleep(0.001)
        else:
            self._finish_close()
        if conv_exc is not None:
            raise conv_exc

    cdef int _finish_close(self) except -1:
        """The last step of close(): nothing is in flight or held."""
        self._destroy_deferred = False
        for entry in list(self._registered.values()):
            fd = _reg_sock(entry).fileno()
            if fd >= 0:
                iocp_unregister(self._port, fd)
        self._registered.clear()
        self._final_stats = self.stats()
        iocp_port_destroy(self._port)
        self._port = NULL
        return 0

    def _test_native_entry_points(self) -> dict:
        """For tests only: what the native entry points return when called
        from this thread, bypassing this layer's own checks (single-issuer
        ports: IOCP_EWRONGTHREAD from a thread that does not own it).
        Every call is one that changes nothing on the owner's thread."""
        cdef iocp_completion batch[1]
        cdef iocp_op *rec
        if self._port == NULL:
            raise ValueError("closed")
        rec = iocp_op_alloc(self._port)
        out = {"op_alloc": 0 if rec != NULL else IOCP_EWRONGTHREAD}
        if rec != NULL:
            rec.kind = IOCP_OP_NONE        # refused by iocp_submit's checks
            out["submit"] = iocp_submit(self._port, rec)
            iocp_op_free(self._port, rec)
        else:
            out["submit"] = IOCP_EWRONGTHREAD
        out["register"] = iocp_register(self._port, <iocp_socket_t>-1)
        out["unregister"] = iocp_unregister(self._port, <iocp_socket_t>-1)
        out["cancel_all"] = iocp_cancel_all(self._port)
        out["wait"] = iocp_port_wait_since(self._port, batch, 1, 0,
                                           iocp_port_wake_gen(self._port) + 1)
        out["run_once"] = iocp_port_run_once(self._port, batch, 1, 0,
                                             iocp_port_wake_gen(self._port) + 1)
        out["wake"] = iocp_port_wake(self._port)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pending={self.pending}"
        return f"<iocp.CompletionPort backend={self.backend} {state}>"


# --------------------------------------------------------------------------
# Module helpers


cdef object _lost_result(int kind, object exc):
    """The error a completion carries when its payload could not be built
    (the accepted socket is closed, the received bytes are gone)."""
    if kind == IOCP_OP_ACCEPT:
        code = _errno.ECONNABORTED
    elif isinstance(exc, MemoryError):
        code = _errno.ENOMEM
    else:
        code = _errno.EINTR
    err = OSError(code, f"{_os.strerror(code)} (result lost: {type(exc).__name__})")
    err.__cause__ = exc
    return err


# Test hook (tests/test_bounds.py, M2): fail the k-th payload conversion.
cdef Py_ssize_t _fail_countdown = -1
cdef object _fail_exc = None


def _test_fail_conversion_after(Py_ssize_t n, exc_type=None):
    """For tests only: the payload conversion (accepted socket, received
    bytes) after the next `n` ones raises `exc_type`.  A negative `n` or
    ``exc_type=None`` disarms it."""
    global _fail_countdown, _fail_exc
    if exc_type is None or n < 0:
        _fail_countdown = -1
        _fail_exc = None
        return
    if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
        raise TypeError("exc_type must be an exception class")
    _fail_exc = exc_type
    _fail_countdown = n


cdef inline int _test_fail_point() except -1:
    global _fail_countdown, _fail_exc
    if _fail_countdown < 0:
        return 0
    if _fail_countdown > 0:
        _fail_countdown -= 1
        return 0
    _fail_countdown = -1
    exc, _fail_exc = _fail_exc, None
    raise exc()

from time import monotonic as _monotonic, sleep as _sleep


def _backend_names() -> list:
    return [iocp_backend_name(i).decode("ascii") for i in range(iocp_backend_count())]


def backends() -> dict:
    """The backends that can run on this machine, best first, each with the
    features it found: ``{"io_uring": ["nodrop", ...], "epoll": [...]}``."""
    cdef char features[512]
    out = {}
    for i in range(iocp_backend_count()):
        if iocp_backend_probe(i, features, sizeof(features)) == 0:
            out[iocp_backend_name(i).decode("ascii")] = features.decode("ascii").split()
    return out


include "stream.pxi"
include "aioloop.pxi"
