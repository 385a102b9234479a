# Included by iocp_core.pyx: the stream connection core.
#
# A Stream is one connected stream socket (TCP, Unix) driven by the port's
# dispatch with no Operation, Completion or bound method per message:
#
# - Its native op records point back at the Stream (``op.user``), not at an
#   Operation.  CompletionPort._convert sees that by the record's type and
#   hands the native completion to Stream._native (phase 1: no user code,
#   the port buffer is copied into a bytes object, send records are freed),
#   which appends ``stream, payload`` pairs to the batch's list; phase 2
#   (_dispatch) calls Stream._event(payload) in batch order, which calls the
#   protocol.
# - Reading is ONE multishot recv, armed by start() and re-armed only after
#   pause_reading() cancelled it (or a final completion ended it early).
# - write() queues bytes by reference (other buffers are copied into bytes)
#   in a Python list and puts the stream on the port's flush list; the port
#   flushes that list right before each native wait (and on port.flush()):
#   everything queued goes out as ONE send (one segment) or gathered send
#   (up to IOCP_IOV_MAX segments; more are joined first).
# - Sends are silent (IOCP_OPF_SILENT: the backend hands their success back
#   flagged, and a wait does not return for such successes alone) while the
#   unconfirmed bytes stay at or below the high-water mark.  Past it -- and
#   whenever someone waits on the write side (paused writer, close(),
#   write_eof()) -- the send is a normal one, a *fence*: its completion is
#   news (it ends a wait) and, sends of a socket completing in order, proves
#   every earlier send finished.  At most one fence is in flight; while one
#   is, writes queue in C.  When the queue is empty and someone waits on
#   sends that are all silent, the fence is a zero-byte send.
# - Exactly one connection_lost, from _finalize(), which runs from the flush
#   once no record of the stream is in flight any more (so the descriptor is
#   closed only when the kernel is done with it and a reused descriptor can
#   never meet one of this stream's ops).
#
# Every record in flight owns one reference to its Stream (taken before
# iocp_submit, dropped in _native on the final completion), as records own
# their Operation; the port's _streams set owns one until _finalize.

cdef enum:
    _ST_OPEN = 0        # reading and writing
    _ST_CLOSING = 1     # close(): no more reading; flushing, then finalize
    _ST_ABORTING = 2    # abort()/error: records cancelled; finalize when back
    _ST_LOST = 3        # connection_lost was called; nothing left

# Phase-2 payloads other than bytes (data) and exceptions (connection lost).
cdef object _EV_WRITE = object()       # a send finished: flow control, close
cdef object _EV_EOF = object()         # the peer closed its side
cdef object _EV_RECV_ENDED = object()  # the recv ended with no EOF (cancel)

cdef char _empty_byte[1]

# One byte per flag: an idle connection keeps a Stream, and thirteen 4-byte
# bints would cost it 39 bytes.
cdef extern from "<stdbool.h>":
    ctypedef bint _flag "bool"

# Room kept in the Stream for the peer's address: sockaddr_in6 (28 bytes)
# holds every AF_INET and AF_INET6 peer.
cdef enum:
    _PEER_RAW = 28


cdef struct _sendrec:
    # One send in flight.  `keep` owns the bytes (or list of bytes) the
    # record points into until its completion.
    iocp_op *op
    PyObject *keep
    size_t nbytes
    bint fence
    bint counted        # nbytes still counted in Stream._unconfirmed
    _sendrec *next


cdef object _LIMIT_DEFAULT = object()


cdef extern from *:
    """
    /* The clock of time.monotonic(), in nanoseconds, read from C:
       iocp.server's last_activity is compared with time.monotonic()
       values.  Seconds are made only when someone reads the stamp.  The
       port reads it once per batch (CompletionPort._batch_ns) and the
       streams stamp deliveries and sends with that. */
    static inline int64_t iocp__stream_clock_ns(void)
    {
    #if PY_VERSION_HEX >= 0x030D0000
        PyTime_t t;
        if (PyTime_MonotonicRaw(&t) < 0)
            return 0;
        return (int64_t)t;
    #else
        return (int64_t)_PyTime_GetMonotonicClock();
    #endif
    }
    """
    int64_t iocp__stream_clock_ns() nogil


cdef inline object _bound(object protocol, str name):
    fn = getattr(protocol, name, None)
    return fn if callable(fn) else None


cdef object _method(object protocol, str name, _flag *unbound):
    """``protocol.name`` to keep for the calls of every message: its
    class's plain function (``*unbound`` set: called with the protocol
    first) where that is what the attribute binds, so an idle connection
    keeps no bound method of its own; else the callable itself."""
    fn = getattr(protocol, name, None)
    unbound[0] = False
    if fn is None or not callable(fn):
        return None
    if type(fn) is _MethodType and fn.__self__ is protocol:
        func = fn.__func__
        if getattr(type(protocol), name, None) is func:
            unbound[0] = True
            return func
    return fn


cdef extern from *:
    """
    /* fn([self_,] [conn,] arg): a protocol's data method, kept unbound
       (self_ is the protocol) or bound (self_ NULL); conn NULL: none. */
    static PyObject *iocp__stream_call(PyObject *fn, PyObject *self_, PyObject *conn,
                                       PyObject *arg)
    {
        PyObject *stack[4];
        size_t n = 1;

        if (self_)
            stack[n++] = self_;
        if (conn)
            stack[n++] = conn;
        stack[n++] = arg;
        return PyObject_Vectorcall(fn, stack + 1, (n - 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                   NULL);
    }
    """
    object iocp__stream_call(object fn, PyObject *self_, PyObject *conn, object arg)


# The last address tuple seen, handed out again when a new one is equal:
# every connection a listener accepts has the same sockname, and an idle
# connection should not hold its own copy of it.
cdef object _last_addr = None


cdef object _shared_addr(object addr):
    global _last_addr
    if addr is not None and type(addr) is tuple and addr == _last_addr:
        return _last_addr
    if type(addr) is tuple:
        _last_addr = addr
    return addr


@cython.final
@cython.auto_pickle(False)
@cython.binding(False)     # plain method descriptors: the transport stores the
                           # bound methods, whose call is then a C call
cdef class Stream:
    """The connection core: one connected stream socket (TCP or Unix) whose
    reads and writes the port's dispatch drives in C.

    ``Stream(port, sock, protocol, *, conn=None, write_high_water=65536,
    write_low_water=None, on_lost=None, on_error=None, extra=None,
    events=None, owner=None, buffered=True)``

    ``extra``: a dict of the creator's extra info, asked first by
    ``get_extra_info``; "socket", "sockname" and "peername" are the
    stream's own (the addresses read once, at the start).

    The stream takes the socket over: it registers it with ``port`` (unless
    it already is), and unregisters and closes it before it calls
    ``connection_lost``.  Call ``start()`` to begin reading.

    ``protocol`` is asyncio-style: ``data_received(data)`` or, when it has
    both ``get_buffer`` and ``buffer_updated`` (``asyncio.BufferedProtocol``),
    ``get_buffer(n)`` / ``buffer_updated(nbytes)`` (unless ``buffered`` is
    false); ``eof_received()``
    (a false result closes the stream), ``pause_writing()``,
    ``resume_writing()``, ``connection_lost(exc)`` -- all optional but the
    data methods.  With ``conn`` not None every one of them gets ``conn``
    first (``data_received(conn, data)``: iocp.server style).  The stream
    does not call ``connection_made``.  ``events``, if given, is where the
    rare ones (``eof_received``, ``pause_writing``, ``resume_writing``,
    ``connection_lost``) are looked up instead of the protocol.

    ``on_lost``, if given, is called as ``on_lost(fn, *args)`` in place of
    ``fn(*args)`` for connection_lost (e.g. ``loop.call_soon``).  With
    ``owner`` not None the hooks -- ``on_lost``, ``on_error`` and
    bind_server's ``foreign`` and ``over`` -- get ``owner`` first, so they
    can be functions every stream shares rather than bound methods kept
    per connection.  Protocol
    exceptions go to ``on_error(exc)`` if set, else to the port's
    ``exception_handler(exc, stream)`` (None: logged), and abort the stream
    (``connection_lost(exc)``); those of ``pause_writing``/``resume_writing``
    are only reported, as asyncio does.

    A stream is used by one thread at a time: the one that dispatches its
    port.
    """
    cdef CompletionPort _port
    cdef object _sock
    cdef iocp_socket_t _fd
    cdef object _protocol
    cdef object _conn
    cdef object _events           # None: the rare callbacks are the protocol's
    cdef object _owner            # None, or the hooks' first argument
    cdef object _on_lost
    cdef public object on_error
    """None, or ``on_error(exc)`` called with a protocol's exception (in
    place of the port's exception_handler)."""
    # cached protocol methods (set_protocol)
    cdef object _data_received
    cdef object _get_buffer
    cdef object _buffer_updated
    cdef object _extra            # None, or the creator's own extra dict
    cdef object _sockname         # read at the start (equal ones shared)
    cdef object _peername         # non-inet peers: read at the start
    # reading
    cdef iocp_op *_recv_op        # the armed multishot recv, or NULL
    cdef list _held               # data received while paused, in order
    # writing
    cdef object _wq               # queued, not yet submitted: None, one bytes
                                  # or a list of bytes (none kept per idle stream)
    cdef size_t _wq_bytes
    cdef _sendrec *_sq_head       # sends in flight, in submission order
    cdef _sendrec *_sq_tail
    cdef size_t _unconfirmed      # bytes submitted, not yet known sent
    cdef size_t _high
    cdef size_t _low
    cdef object _drain_cb         # when_drained(): called once all is written
    cdef object _lost_exc
    cdef Py_ssize_t _writes_after_lost
    # iocp.server's counters (C fields its Connection reads; no Python
    # per message): bytes delivered to data_received, bytes taken by
    # write() minus those dropped unsent, the clock of the last delivery
    # or completed send.
    cdef unsigned long long _bytes_in
    cdef unsigned long long _bytes_taken
    cdef int64_t _last_activity   # ns, time.monotonic()'s clock
    # iocp.server's send (bind_server / server_write)
    cdef object _srv_cell         # [ident of the dispatching thread or None]
    cdef object _srv_foreign      # foreign(data): a call from another thread
    cdef object _srv_over         # over(): the write would pass the limit
    cdef size_t _srv_limit        # 0: no limit
    # the small fields last, packed (an idle connection keeps its Stream)
    cdef int _state
    cdef uint32_t _n_sends        # counters for stats()
    cdef uint32_t _n_fences
    cdef uint32_t _n_recv_arms
    cdef _flag _buffered
    cdef _flag _started
    cdef _flag _registered        # we unregister the socket at the end
    cdef _flag _in_flush          # on the port's flush list
    cdef _flag _recv_cancelling
    cdef _flag _reading_paused
    cdef _flag _eof_seen
    cdef _flag _held_eof          # EOF arrived while paused (after _held)
    cdef _flag _fence_out
    cdef _flag _write_paused      # pause_writing() was called
    cdef _flag _eof_wanted        # write_eof() called
    cdef _flag _shut_wr           # shutdown(SHUT_WR) done
    cdef _flag _drop_writes       # close() with nothing queued: writes dropped
    cdef _flag _unbuffered        # buffered=False: data_received even so
    cdef _flag _dr_unbound        # _data_received is the class's function
    cdef _flag _gb_unbound        # ... _get_buffer
    cdef _flag _bu_unbound        # ... _buffer_updated
    # inet peers: the address kept raw, no tuple per idle connection
    cdef unsigned char _peer_len
    cdef unsigned char _peer_raw[_PEER_RAW]
    cdef object __weakref__

    def __cinit__(self):
        self._recv_op = NULL
        self._sq_head = NULL
        self._sq_tail = NULL
        self._state = _ST_LOST     # until __init__ succeeds: every method is safe

    def __init__(self, CompletionPort port not None, sock, protocol, *, conn=None,
                 write_high_water=65536, write_low_water=None, on_lost=None,
                 on_error=None, dict extra=None, events=None, owner=None,
                 bint buffered=True):
        cdef long long fd
        if self._port is not None:
            raise RuntimeError("Stream.__init__ called twice")
        if not isinstance(sock, _socket.socket):
            raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
        if sock.type != _socket.SOCK_STREAM:
            raise ValueError("a Stream needs a SOCK_STREAM socket")
        if protocol is None:
            raise TypeError("protocol must not be None")
        if on_lost is not None and not callable(on_lost):
            raise TypeError("on_lost must be callable or None")
        if on_error is not None and not callable(on_error):
            raise TypeError("on_error must be callable or None")
        self._conn = conn
        self._events = events
        self._owner = owner
        self._unbuffered = not buffered
        self._set_protocol(protocol)
        self._set_limits(write_high_water, write_low_water)
        port._check_open()
        fd = _sock_fd(sock)
        if fd < 0:
            raise OSError(_errno.EBADF, "the socket is closed")
        entry = port._registered.get(fd)
        if entry is None or _reg_sock(entry) is not sock:
            port.register(sock)
        self._port = port
        self._sock = sock
        self._fd = <iocp_socket_t>fd
        self._registered = True
        self._on_lost = on_lost
        self.on_error = on_error
        self._extra = extra
        self._read_addresses(sock)
        self._state = _ST_OPEN
        self._last_activity = iocp__stream_clock_ns()
        port._streams.add(self)

    def __dealloc__(self):
        # Records in flight own a reference, so none is left here; only
        # never-submitted state can remain.
        cdef _sendrec *r = self._sq_head
        cdef _sendrec *nx
        while r != NULL:
            nx = r.next
            if r.keep != NULL:
                Py_DECREF(<object>r.keep)
            PyMem_Free(r)
            r = nx
        self._sq_head = NULL

    # ---- protocol ---------------------------------------------------------

    cdef int _set_protocol(self, object protocol) except -1:
        cdef _flag gb_u, bu_u, dr_u
        gb = _method(protocol, "get_buffer", &gb_u)
        bu = _method(protocol, "buffer_updated", &bu_u)
        dr = _method(protocol, "data_received", &dr_u)
        if gb is not None and bu is not None and not self._unbuffered:
            self._buffered = True
        elif dr is not None:
            self._buffered = False
        else:
            raise TypeError(
                f"protocol {type(protocol).__name__} has neither data_received() nor "
                f"get_buffer()/buffer_updated()")
        self._protocol = protocol
        self._data_received = dr
        self._get_buffer = gb
        self._buffer_updated = bu
        self._dr_unbound = dr_u
        self._gb_unbound = gb_u
        self._bu_unbound = bu_u
        # The rare callbacks (eof, flow control, lost) are looked up when
        # called: four bound methods fewer per idle connection.
        return 0

    cdef inline object _rare(self):
        """Where eof_received, pause/resume_writing and connection_lost are
        looked up."""
        return self._protocol if self._events is None else self._events

    def set_protocol(self, protocol, *, bint unpause=False) -> None:
        """Switches the protocol (asyncio's Transport.set_protocol).  Once
        connection_lost was called there is nothing left to call: ignored.

        The write side's paused state carries over, as in asyncio (the
        sendfile fallback's protocol waits for the resume_writing() the
        paused writer was owed).  ``unpause=True`` starts the new protocol
        unpaused instead, without calling anything: for one that must not
        get a resume_writing() it never asked for (start_tls's
        SSLProtocol asserts on it); its next write above the high-water
        mark pauses it."""
        if self._state == _ST_LOST:
            return
        self._set_protocol(protocol)
        if unpause:
            self._write_paused = False

    def get_protocol(self):
        """The current protocol (None once connection_lost was called)."""
        return self._protocol

    cdef int _report(self, object exc) except -1:
        """A protocol callback raised: tell on_error or the port."""
        hook = self.on_error
        if hook is not None:
            try:
                if self._owner is None:
                    hook(exc)
                else:
                    hook(self._owner, exc)
            except Exception:
                _log.exception("iocp: Stream.on_error raised")
            return 0
        self._port._handle_exception(exc, self)
        return 0

    cdef int _protocol_error(self, object exc) except -1:
        self._report(exc)
        self._lose(exc)
        return 0

    # ---- limits -----------------------------------------------------------

    cdef int _set_limits(self, object high, object low) except -1:
        cdef Py_ssize_t h, l
        if high is not None and (not isinstance(high, int) or isinstance(high, bool)):
            raise TypeError(f"high must be an int or None, not {type(high).__name__}")
        if low is not None and (not isinstance(low, int) or isinstance(low, bool)):
            raise TypeError(f"low must be an int or None, not {type(low).__name__}")
        if high is None:
            high = 65536 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        h = high
        l = low
        self._high = <size_t>h
        self._low = <size_t>l
        return 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        """Sets the write buffer's high- and low-water marks (asyncio's
        rules: high defaults to 64 KiB or 4 * low, low to high // 4)."""
        self._set_limits(high, low)
        self._maybe_pause()
        if self._write_paused and self._state <= _ST_CLOSING:
            self._schedule()       # a fence may be needed to hear of drain

    def get_write_buffer_limits(self) -> tuple:
        """(low, high), as asyncio returns them."""
        return (self._low, self._high)

    def get_write_buffer_size(self) -> int:
        """Bytes queued plus bytes sent but not yet known to be written."""
        return self._wq_bytes + self._unconfirmed

    cdef inline size_t _size(self) noexcept:
        return self._wq_bytes + self._unconfirmed

    cdef int _maybe_pause(self) except -1:
        if self._write_paused or self._size() <= self._high or self._state > _ST_CLOSING:
            return 0
        self._write_paused = True
        fn = _bound(self._rare(), "pause_writing")
        if fn is not None:
            try:
                if self._conn is None:
                    fn()
                else:
                    fn(self._conn)
            except Exception as exc:
                self._report(exc)
        return 0

    def when_drained(self, callback) -> bool:
        """Calls ``callback()`` once every byte written so far is known to
        be sent (a fence confirms the silent sends), or when the connection
        is lost first.  Returns True, without keeping the callback, if that
        is already so.  One callback at a time: a new one replaces it."""
        if self._size() == 0 or self._state > _ST_CLOSING:
            return True
        self._drain_cb = callback
        self._schedule()
        return False

    cdef int _call_drained(self) except -1:
        fn = self._drain_cb
        self._drain_cb = None
        try:
            fn()
        except Exception as exc:
            self._report(exc)
        return 0

    cdef int _maybe_resume(self) except -1:
        if not self._write_paused or self._size() > self._low:
            return 0
        self._write_paused = False
        fn = _bound(self._rare(), "resume_writing")
        if fn is not None and self._state <= _ST_CLOSING:
            try:
                if self._conn is None:
                    fn()
                else:
                    fn(self._conn)
            except Exception as exc:
                self._report(exc)
        return 0

    # ---- state ------------------------------------------------------------

    def is_closing(self) -> bool:
        """True once close() or abort() was called or the connection was
        lost."""
        return self._state != _ST_OPEN

    def is_reading(self) -> bool:
        """True while open and not paused (as asyncio's transports answer:
        also before start(), which only arms the read)."""
        return self._state == _ST_OPEN and not self._reading_paused

    @property
    def writing_paused(self) -> bool:
        """True between pause_writing() and resume_writing()."""
        return self._write_paused

    def can_write_eof(self) -> bool:
        return True

    cdef int _read_addresses(self, object sock) except -1:
        """The local and peer addresses, read once at the start (they stay
        known after the close, as asyncio's transports keep them); where
        the creator's extra dict has them, not at all."""
        cdef sockaddr_storage ss
        cdef iocp_socklen_t sslen = 0
        extra = self._extra
        if extra is None or "sockname" not in extra:
            try:
                self._sockname = _shared_addr(sock.getsockname())
            except OSError:
                pass
        if extra is not None and "peername" in extra:
            return 0
        if iocp_socket_peer(self._fd, &ss, &sslen) < 0:
            return 0       # not connected (any more): no peer address
        if ss.ss_family in (_socket.AF_INET, _socket.AF_INET6) and 0 < sslen <= _PEER_RAW:
            memcpy(self._peer_raw, &ss, sslen)
            self._peer_len = <unsigned char>sslen
        else:
            self._peername = _parse_address(&ss, sslen)
        return 0

    cdef object _peer(self):
        cdef sockaddr_storage ss
        if self._peer_len == 0:
            return self._peername
        memset(&ss, 0, sizeof(ss))
        memcpy(&ss, self._peer_raw, self._peer_len)
        return _parse_address(&ss, self._peer_len)

    def get_extra_info(self, name, default=None):
        """"socket", "sockname" or "peername" (read when the stream was
        made; an inet peer's tuple is made anew on each call), or what the
        creator's ``extra`` holds; anything else gives `default`."""
        extra = self._extra
        if extra is not None:
            v = extra.get(name, _LIMIT_DEFAULT)
            if v is not _LIMIT_DEFAULT:
                return v
        if name == "peername":
            return self._peer()
        if name == "sockname":
            return self._sockname
        if name == "socket":
            return self._sock
        return default

    @property
    def socket(self):
        """The socket (closed once connection_lost was called)."""
        return self._sock

    @property
    def port(self):
        return self._port

    def stats(self) -> dict:
        """Counters for tests and diagnostics: sends and fences submitted,
        recv arms (these three counted modulo 2**32: 4 bytes each in every
        Stream), bytes queued and unconfirmed, sends in flight."""
        cdef Py_ssize_t n = 0
        cdef _sendrec *r = self._sq_head
        while r != NULL:
            n += 1
            r = r.next
        return {"sends": self._n_sends, "fences": self._n_fences,
                "recv_arms": self._n_recv_arms, "queued": self._wq_bytes,
                "unconfirmed": self._unconfirmed, "sends_in_flight": n,
                "recv_armed": self._recv_op != NULL,
                "state": ("open", "closing", "aborting", "lost")[self._state]}

    def __repr__(self) -> str:
        st = ("open", "closing", "aborting", "lost")[self._state]
        return f"<iocp.Stream {st} fd={self._fd} buffered={self._wq_bytes + self._unconfirmed}>"

    cdef inline int _schedule(self) except -1:
        if not self._in_flush:
            self._in_flush = True
            self._port._flush_list.append(self)
        return 0

    # ---- iocp.server ------------------------------------------------------

    @property
    def bytes_received(self) -> int:
        """Bytes delivered to the protocol so far."""
        return self._bytes_in

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the socket so far: what write() took, minus what
        is still queued or unconfirmed, minus what was dropped unsent."""
        return self._bytes_taken - self._size()

    @property
    def last_activity(self) -> float:
        """``time.monotonic()`` when data was last delivered or a send last
        completed (when the stream was made, before either), to the batch:
        the time the port took the batch of completions that brought it."""
        # As time.monotonic() turns its nanoseconds into seconds.
        if self._last_activity % 1000000000 == 0:
            return <double>(self._last_activity // 1000000000)
        return <double>self._last_activity / 1e9

    def bind_server(self, dispatcher, write_limit, foreign, over) -> None:
        """Makes server_write() iocp.server's Connection.send.

        ``dispatcher``: a list whose item 0 is the ident of the thread that
        dispatches the port, or None; ``write_limit``: the byte limit of
        the write buffer (0: none); ``foreign(data)``: called (with the
        data copied into bytes) instead of writing when the caller is not
        that thread; ``over()``: called instead of writing when the write
        would take the buffer past the limit."""
        if not isinstance(dispatcher, list) or not dispatcher:
            raise TypeError("dispatcher must be a non-empty list")
        if not callable(foreign) or not callable(over):
            raise TypeError("foreign and over must be callable")
        if write_limit < 0:
            raise ValueError("write_limit must be >= 0")
        self._srv_cell = dispatcher
        self._srv_limit = <size_t>write_limit
        self._srv_foreign = foreign
        self._srv_over = over

    def server_write(self, data) -> None:
        """iocp.server's send(): write() from the dispatching thread (others
        go to ``foreign``); dropped once closing or after write_eof();
        ``over()`` instead past the write limit (see bind_server)."""
        self._server_write(data, True)

    def server_write_here(self, data) -> None:
        """server_write() with no thread check: for a call posted to the
        port, run by whichever thread dispatches it."""
        self._server_write(data, False)

    cdef int _server_write(self, object data, bint check) except -1:
        cdef Py_ssize_t n
        cdef object who
        if not PyBytes_CheckExact(data):
            data = _copy_bytes(data)   # copied now: the caller may reuse it
        if check and self._srv_cell is not None:
            who = <object>PyList_GET_ITEM(self._srv_cell, 0)
            if who is None or <unsigned long>who != PyThread_get_thread_ident():
                if self._owner is None:
                    self._srv_foreign(data)
                else:
                    self._srv_foreign(self._owner, data)
                return 0
        if self._state != _ST_OPEN or self._eof_wanted:
            return 0
        n = PyBytes_GET_SIZE(data)
        if n == 0:
            return 0
        # Not paused means at most high-water bytes are buffered, so only a
        # paused stream or a write bigger than limit - high can pass it.
        if (self._srv_limit and (self._write_paused or <size_t>n + self._high > self._srv_limit)
                and self._size() + <size_t>n > self._srv_limit):
            if self._owner is None:
                self._srv_over()
            else:
                self._srv_over(self._owner)
            return 0
        # write()'s queueing (state and data checked above), in C.
        self._enqueue(data)
        self._wq_bytes += <size_t>n
        self._bytes_taken += <unsigned long long>n
        if not self._in_flush:
            self._in_flush = True
            self._port._flush_list.append(self)
        if not self._write_paused and self._wq_bytes + self._unconfirmed > self._high:
            self._maybe_pause()
        return 0

    # ---- reading ----------------------------------------------------------

    def start(self) -> None:
        """Begins reading: arms the multishot recv (once)."""
        if self._state != _ST_OPEN:
            raise RuntimeError("the stream is closing")
        if self._started:
            raise RuntimeError("the stream is already started")
        self._port._check_open()
        self._started = True
        if not self._reading_paused:
            self._arm_recv()

    cdef int _arm_recv(self) except -1:
        cdef iocp_op *op
        cdef int r
        if self._recv_op != NULL or self._eof_seen:
            return 0
        port = self._port
        if port._port == NULL or port._closing:
            return 0
        op = iocp_op_alloc_short(port._port)   # an idle connection keeps it
        if op == NULL:
            raise MemoryError()
        op.kind = IOCP_OP_RECV
        op.flags = IOCP_OPF_MULTISHOT
        op.sock = self._fd
        op.len = 0
        op.user = <void *>self
        Py_INCREF(self)            # owned by the record until its final completion
        r = iocp_submit(port._port, op)
        if r < 0:
            Py_DECREF(self)
            iocp_op_free(port._port, op)
            raise _oserror(r)
        self._recv_op = op
        self._recv_cancelling = False
        self._n_recv_arms += 1
        return 0

    cdef int _cancel_recv(self) except -1:
        if self._recv_op != NULL and not self._recv_cancelling:
            self._recv_cancelling = True
            if self._port._port != NULL:
                iocp_cancel(self._port._port, self._recv_op)
        return 0

    def pause_reading(self) -> None:
        """Stops data_received until resume_reading() (what arrives in
        between is held, then delivered in order)."""
        if self._state != _ST_OPEN or self._reading_paused:
            return
        self._reading_paused = True
        self._cancel_recv()

    def resume_reading(self) -> None:
        """Delivers what was held (from the port's next flush, so never
        inside this call) and reads again."""
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._state != _ST_OPEN:
            return
        if self._held or self._held_eof:
            self._schedule()
        if self._started and self._recv_op == NULL:
            try:
                self._arm_recv()
            except OSError as exc:
                self._lose(exc)
        # (a recv still being cancelled is re-armed when its end arrives)

    cdef int _deliver_data(self, object data) except -1:
        cdef Py_buffer view
        cdef Py_ssize_t off = 0, n, k
        self._bytes_in += <unsigned long long>PyBytes_GET_SIZE(data)
        self._last_activity = self._port._batch_ns
        # Local references: the call may switch the protocol.
        proto = self._protocol
        conn = self._conn
        cdef PyObject *conn_p = NULL if conn is None else <PyObject *>conn
        if not self._buffered:
            fn = self._data_received
            try:
                iocp__stream_call(fn, <PyObject *>proto if self._dr_unbound else NULL,
                                  conn_p, data)
            except Exception as exc:
                self._protocol_error(exc)
            return 0
        n = PyBytes_GET_SIZE(data)
        while off < n:
            try:
                fn = self._get_buffer
                buf = iocp__stream_call(fn, <PyObject *>proto if self._gb_unbound else NULL,
                                        conn_p, n - off)
                PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
                try:
                    k = view.len
                    if k > n - off:
                        k = n - off
                    if k > 0:
                        memcpy(view.buf, PyBytes_AS_STRING(data) + off, <size_t>k)
                finally:
                    PyBuffer_Release(&view)
                if k <= 0:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                off += k
                fn = self._buffer_updated
                iocp__stream_call(fn, <PyObject *>proto if self._bu_unbound else NULL,
                                  conn_p, k)
            except Exception as exc:
                self._protocol_error(exc)
                return 0
            if off < n and self._state == _ST_OPEN and self._reading_paused:
                # Paused half way: keep the rest, first in line.
                if self._held is None:
                    self._held = []
                self._held.insert(0, data[off:])
                return 0
            if self._state != _ST_OPEN:
                return 0
        return 0

    cdef int _deliver_eof(self) except -1:
        cdef object keep = None
        self._eof_seen = True
        fn = _bound(self._rare(), "eof_received")
        if fn is not None:
            try:
                keep = fn() if self._conn is None else fn(self._conn)
            except Exception as exc:
                self._protocol_error(exc)
                return 0
        if not keep and self._state == _ST_OPEN:
            self.close()
        return 0

    cdef Py_ssize_t _deliver_held(self) except -1:
        """Flush: delivers data held while paused, in order."""
        cdef Py_ssize_t ev = 0
        while self._held and self._state == _ST_OPEN and not self._reading_paused:
            data = self._held.pop(0)
            ev += 1
            self._deliver_data(data)
        if (self._held_eof and not self._held and self._state == _ST_OPEN and
                not self._reading_paused):
            self._held_eof = False
            ev += 1
            self._deliver_eof()
        return ev

    # ---- writing ----------------------------------------------------------

    def write(self, data) -> None:
        """Queues data (bytes by reference; other buffers are copied); it
        goes out with the port's next flush, gathered with every other
        write of this iteration into one send."""
        self._write(data)

    def writelines(self, list_of_data) -> None:
        """write() of each item, in order."""
        for data in list_of_data:
            self._write(data)

    cdef int _write(self, object data) except -1:
        cdef Py_ssize_t n
        if PyBytes_CheckExact(data):
            n = PyBytes_GET_SIZE(data)
        else:
            data = _copy_bytes(data)
            n = PyBytes_GET_SIZE(data)
        if n == 0:
            return 0
        if self._state > _ST_CLOSING or self._drop_writes:
            self._writes_after_lost += 1
            if self._writes_after_lost == 5:
                _log.warning("iocp: writes to a lost stream are dropped")
            return 0
        if self._eof_wanted:
            raise RuntimeError("cannot write() after write_eof()")
        self._enqueue(data)
        self._wq_bytes += <size_t>n
        self._bytes_taken += <unsigned long long>n
        if not self._in_flush:
            self._in_flush = True
            self._port._flush_list.append(self)
        if not self._write_paused and self._wq_bytes + self._unconfirmed > self._high:
            self._maybe_pause()
        return 0

    def write_eof(self) -> None:
        """Shuts the write side down (SHUT_WR) once everything queued is
        written."""
        if self._state != _ST_OPEN or self._eof_wanted:
            return
        self._eof_wanted = True
        self._schedule()

    cdef inline int _enqueue(self, object data) except -1:
        """Queues one non-empty bytes: the first alone, a list from the
        second on (most iterations write once per stream)."""
        wq = self._wq
        if wq is None:
            self._wq = data
        elif PyBytes_CheckExact(wq):
            self._wq = [wq, data]
        else:
            (<list>wq).append(data)
        return 0

    cdef int _submit_queued(self) except -1:
        """Flush: one send (or gathered send) with everything queued."""
        cdef object wq = self._wq
        cdef Py_ssize_t n, i, nseg
        cdef size_t total = self._wq_bytes
        cdef bint fence
        cdef _sendrec *rec
        cdef iocp_iovec *iov
        cdef iocp_op *op
        cdef object keep
        cdef object item
        cdef int r
        port = self._port
        if wq is None or port._port == NULL:
            return 0
        n = 1 if PyBytes_CheckExact(wq) else PyList_GET_SIZE(wq)
        fence = (self._state == _ST_CLOSING or self._eof_wanted or self._write_paused or
                 self._drain_cb is not None or self._unconfirmed + total > self._high)
        if n == 1:
            keep = wq
            nseg = 0
        elif n <= IOCP_IOV_MAX:
            keep = wq              # the list itself becomes the record's
            nseg = n
        else:
            keep = b"".join(wq)
            nseg = 0
        rec = <_sendrec *>PyMem_Malloc(sizeof(_sendrec) + <size_t>nseg * sizeof(iocp_iovec))
        if rec == NULL:
            raise MemoryError()
        op = iocp_op_alloc(port._port)
        if op == NULL:
            PyMem_Free(rec)
            raise MemoryError()
        op.kind = IOCP_OP_SEND
        op.flags = 0 if fence else IOCP_OPF_SILENT
        op.sock = self._fd
        op.user = <void *>self
        op.len = total
        if nseg == 0:
            op.buf = PyBytes_AS_STRING(keep)
            op.iov = NULL
            op.iovcnt = 0
        else:
            iov = <iocp_iovec *>(<char *>rec + sizeof(_sendrec))
            for i in range(nseg):
                item = <object>PyList_GET_ITEM(keep, i)
                iov[i].base = <void *>PyBytes_AS_STRING(item)
                iov[i].len = <size_t>PyBytes_GET_SIZE(item)
            op.buf = NULL
            op.iov = iov
            op.iovcnt = <int>nseg
        rec.op = op
        rec.keep = <PyObject *>keep
        rec.nbytes = total
        rec.fence = fence
        rec.counted = True
        rec.next = NULL
        Py_INCREF(keep)
        Py_INCREF(self)
        r = iocp_submit(port._port, op)
        self._wq = None
        self._wq_bytes = 0
        if r < 0:
            Py_DECREF(self)
            Py_DECREF(keep)
            iocp_op_free(port._port, op)
            PyMem_Free(rec)
            self._lose(_oserror(r))
            return 0
        self._link(rec)
        self._unconfirmed += total
        self._n_sends += 1
        if fence:
            self._fence_out = True
            self._n_fences += 1
        return 0

    cdef int _submit_fence0(self) except -1:
        """A zero-byte normal send: its completion wakes the loop once every
        earlier (silent) send of the socket is done."""
        cdef _sendrec *rec
        cdef iocp_op *op
        cdef int r
        port = self._port
        if port._port == NULL:
            return 0
        rec = <_sendrec *>PyMem_Malloc(sizeof(_sendrec))
        if rec == NULL:
            raise MemoryError()
        op = iocp_op_alloc(port._port)
        if op == NULL:
            PyMem_Free(rec)
            raise MemoryError()
        op.kind = IOCP_OP_SEND
        op.flags = 0
        op.sock = self._fd
        op.user = <void *>self
        op.buf = _empty_byte
        op.len = 0
        rec.op = op
        rec.keep = NULL
        rec.nbytes = 0
        rec.fence = True
        rec.counted = False
        rec.next = NULL
        Py_INCREF(self)
        r = iocp_submit(port._port, op)
        if r < 0:
            Py_DECREF(self)
            iocp_op_free(port._port, op)
            PyMem_Free(rec)
            self._lose(_oserror(r))
            return 0
        self._link(rec)
        self._fence_out = True
        self._n_fences += 1
        return 0

    cdef inline void _link(self, _sendrec *rec) noexcept:
        if self._sq_tail == NULL:
            self._sq_head = rec
        else:
            self._sq_tail.next = rec
        self._sq_tail = rec

    # ---- closing ----------------------------------------------------------

    def close(self) -> None:
        """Stops reading, writes what is queued, then closes the socket and
        calls connection_lost(None) (from the port's flush, never inside
        this call)."""
        if self._state != _ST_OPEN:
            return
        self._state = _ST_CLOSING
        self._held = None
        self._held_eof = False
        self._cancel_recv()
        if not self._wq_bytes and self._sq_head == NULL:
            # As asyncio's transports: closed with nothing left to write,
            # the connection counts as lost at once (later writes are
            # dropped) ...
            self._drop_writes = True
            if self._recv_op == NULL and self._on_lost is not None:
                # ... and with nothing in flight and connection_lost
                # deferred by on_lost, it is scheduled now, not a turn later.
                self._finalize()
                return
        self._schedule()

    def abort(self, exc=None) -> None:
        """Drops what is queued, cancels the stream's operations and calls
        connection_lost(exc) once they are back (the next loop turn).
        ``exc``: None or the exception connection_lost gets."""
        if exc is not None and not isinstance(exc, BaseException):
            raise TypeError(f"exc must be an exception or None, not {type(exc).__name__}")
        self._lose(exc)

    cdef int _lose(self, object exc) except -1:
        """abort() / a fatal error: connection_lost(exc) follows."""
        cdef _sendrec *r
        if self._state >= _ST_ABORTING:
            return 0
        self._state = _ST_ABORTING
        self._lost_exc = exc
        self._held = None
        self._held_eof = False
        self._wq = None
        self._bytes_taken -= self._wq_bytes    # never sent
        self._wq_bytes = 0
        self._cancel_recv()
        if self._port._port != NULL:
            r = self._sq_head
            while r != NULL:
                iocp_cancel(self._port._port, r.op)
                r = r.next
        self._schedule()
        return 0

    cdef Py_ssize_t _flush(self) except -1:
        """Run by the port's flush (before each native wait): delivers held
        data, submits the queue, finishes close/write_eof/abort.  Returns
        how many protocol events it delivered."""
        cdef Py_ssize_t ev = 0
        self._in_flush = False
        if self._state == _ST_OPEN and (self._held or self._held_eof):
            ev += self._deliver_held()
        if self._state == _ST_LOST:
            return ev
        if self._state <= _ST_CLOSING:
            if self._wq_bytes and not self._fence_out:
                self._submit_queued()
            if self._state <= _ST_CLOSING:
                if (not self._wq_bytes and self._sq_head != NULL and not self._fence_out and
                        (self._state == _ST_CLOSING or self._eof_wanted or self._write_paused or
                         self._drain_cb is not None)):
                    self._submit_fence0()
                if self._sq_head == NULL and not self._wq_bytes:
                    if self._eof_wanted and not self._shut_wr:
                        self._shut_wr = True
                        try:
                            self._sock.shutdown(_socket.SHUT_WR)
                        except OSError as exc:
                            self._lose(exc)
        if self._state == _ST_CLOSING:
            if self._sq_head == NULL and not self._wq_bytes:
                if self._recv_op == NULL:
                    ev += self._finalize()
                else:
                    self._cancel_recv()
        elif self._state == _ST_ABORTING:
            if self._sq_head == NULL and self._recv_op == NULL:
                ev += self._finalize()
        return ev

    cdef Py_ssize_t _finalize(self) except -1:
        """Nothing of the stream is in flight: close the socket, then the
        one connection_lost."""
        cdef CompletionPort port = self._port
        self._state = _ST_LOST
        port._streams.discard(self)
        if self._registered:
            self._registered = False
            port._drop_registration(self._sock, self._fd)
        try:
            self._sock.close()
        except OSError:
            pass
        exc = self._lost_exc
        self._lost_exc = None
        fn = _bound(self._rare(), "connection_lost")
        conn = self._conn
        self._protocol = None
        self._data_received = self._get_buffer = self._buffer_updated = None
        self._held = None
        if self._drain_cb is not None:
            self._call_drained()
        # The hooks usually belong to whoever holds this stream (a
        # transport): dropping them leaves no cycle, so refcounting alone
        # frees both once they are let go of.
        on_lost = self._on_lost
        self._on_lost = None
        self.on_error = None
        self._events = None
        if fn is None:
            return 1
        owner = self._owner
        self._owner = None
        try:
            if on_lost is not None:
                if owner is not None:
                    if conn is None:
                        on_lost(owner, fn, exc)
                    else:
                        on_lost(owner, fn, conn, exc)
                elif conn is None:
                    on_lost(fn, exc)
                else:
                    on_lost(fn, conn, exc)
            elif conn is None:
                fn(exc)
            else:
                fn(conn, exc)
        except Exception as err:
            self._report(err)
        return 1

    # ---- completions ------------------------------------------------------

    cdef int _native(self, iocp_completion *c, list out) except -1:
        """Phase 1 (inside _convert, no user code): one native completion of
        this stream's records.  Appends ``self, payload`` to `out` when the
        protocol must hear of it.  The batch gives the record and the port
        buffer back afterwards (iocp_port_release_batch)."""
        cdef bint final = (c.flags & IOCP_CF_MORE) == 0
        try:
            if c.op.kind == IOCP_OP_RECV:
                self._native_recv(c, final, out)
            else:
                self._native_send(c, out)
        finally:
            if final:
                Py_DECREF(self)    # the record's reference (the caller holds one)
        return 0

    cdef int _native_recv(self, iocp_completion *c, bint final, list out) except -1:
        if c.result > 0 and (c.flags & IOCP_CF_BUFFER):
            if self._state == _ST_OPEN:
                try:
                    data = PyBytes_FromStringAndSize(c.data, <Py_ssize_t>c.result)
                except MemoryError as exc:
                    data = exc         # delivered as the connection's loss
                out.append(self)
                out.append(data)
        if not final:
            return 0
        self._recv_op = NULL
        self._recv_cancelling = False
        if self._state != _ST_OPEN:
            self._schedule()
        elif c.flags & IOCP_CF_CANCELLED:
            out.append(self)
            out.append(_EV_RECV_ENDED)
        elif c.result == 0:
            out.append(self)
            out.append(_EV_EOF)
        elif c.result < 0:
            out.append(self)
            out.append(_oserror(c.result))
        else:
            out.append(self)
            out.append(_EV_RECV_ENDED)
        return 0

    cdef int _native_send(self, iocp_completion *c, list out) except -1:
        cdef _sendrec *rec = self._sq_head
        cdef _sendrec *prev = NULL
        cdef _sendrec *r
        cdef bint ok
        cdef PyObject *keep
        while rec != NULL and rec.op != c.op:
            prev = rec
            rec = rec.next
        if rec == NULL:
            return 0               # cannot happen: every send is linked
        if prev == NULL:
            self._sq_head = rec.next
        else:
            prev.next = rec.next
        if self._sq_tail == rec:
            self._sq_tail = prev
        ok = ((c.flags & IOCP_CF_SILENT) != 0 or
              (not (c.flags & IOCP_CF_CANCELLED) and c.result >= 0 and c.error == 0 and
               <size_t>c.result == rec.nbytes))
        if rec.counted:
            self._unconfirmed -= rec.nbytes
        if rec.fence:
            self._fence_out = False
            if ok and prev != NULL:
                # Every earlier send of the socket finished before it.
                r = self._sq_head
                while r != NULL:
                    if r.counted:
                        r.counted = False
                        self._unconfirmed -= r.nbytes
                    if r == prev:
                        break
                    r = r.next
        if ok:
            if rec.nbytes:
                self._last_activity = self._port._batch_ns
        elif (c.flags & IOCP_CF_CANCELLED) == 0 and c.result > 0 and <size_t>c.result < rec.nbytes:
            self._bytes_taken -= rec.nbytes - <size_t>c.result   # the unsent part
        else:
            self._bytes_taken -= rec.nbytes
        keep = rec.keep
        PyMem_Free(rec)
        if keep != NULL:
            Py_DECREF(<object>keep)
        if not ok:
            if self._state <= _ST_CLOSING:
                if c.error < 0:
                    err = _oserror(c.error)
                elif c.result < 0:
                    err = _oserror(c.result)
                else:
                    err = OSError(_errno.EPIPE, "send stopped short")
                out.append(self)
                out.append(err)
            else:
                self._schedule()
            return 0
        if (self._state != _ST_OPEN or self._write_paused or self._eof_wanted or
                self._drain_cb is not None):
            out.append(self)
            out.append(_EV_WRITE)
        elif self._wq_bytes and not self._fence_out:
            self._schedule()
        return 0

    cdef int _event(self, object ev) except -1:
        """Phase 2 (_dispatch, in batch order): tells the protocol."""
        if PyBytes_CheckExact(ev):
            if self._state != _ST_OPEN:
                return 0
            if self._reading_paused or self._held:
                if self._held is None:
                    self._held = []
                self._held.append(ev)
                if not self._reading_paused:
                    self._schedule()
                return 0
            return self._deliver_data(ev)
        if ev is _EV_WRITE:
            self._maybe_resume()
            if self._drain_cb is not None and self._size() == 0:
                self._call_drained()
            if self._state != _ST_OPEN or self._eof_wanted or self._wq_bytes:
                self._schedule()
            return 0
        if ev is _EV_EOF:
            if self._state != _ST_OPEN:
                return 0
            if self._reading_paused or self._held:
                self._held_eof = True
                if not self._reading_paused:
                    self._schedule()
                return 0
            return self._deliver_eof()
        if ev is _EV_RECV_ENDED:
            if self._state == _ST_OPEN and not self._reading_paused:
                try:
                    self._arm_recv()
                except OSError as exc:
                    self._lose(exc)
            elif self._state != _ST_OPEN:
                self._schedule()
            return 0
        self._lose(ev)             # an exception: the connection is lost
        return 0


cdef object _copy_bytes(object data):
    """bytes(data) for a bytes-like object (copied: the caller may reuse
    it); TypeError for anything else."""
    cdef Py_buffer view
    if not PyObject_CheckBuffer(data) or isinstance(data, str):
        raise TypeError(f"data must be a bytes-like object, not {type(data).__name__}")
    try:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    except BufferError:
        return memoryview(data).tobytes()   # not contiguous
    try:
        return PyBytes_FromStringAndSize(<char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


# ---- the hot methods of a transport that holds a Stream --------------------
#
# iocp.aio's TCPTransport must be an asyncio.Transport, a Python class whose
# instance layout a cdef class cannot share, so it holds its Stream in
# `_stream`.  These functions are its hottest methods: class attributes
# that bind as Python functions do (no bound method kept per transport),
# and whose call is one C call with no Python frame.

@cython.binding(True)
def stream_transport_write(self, data) -> None:
    """Transport.write(): the stream's write()."""
    (<Stream?>self._stream)._write(data)


@cython.binding(True)
def stream_transport_writelines(self, list_of_data) -> None:
    """Transport.writelines(): the stream's write() of each item."""
    cdef Stream stream = <Stream?>self._stream
    for data in list_of_data:
        stream._write(data)


@cython.binding(True)
def stream_transport_is_closing(self) -> bool:
    """Transport.is_closing(): the stream's."""
    return (<Stream?>self._stream)._state != _ST_OPEN


@cython.binding(True)
def stream_transport_get_write_buffer_size(self) -> int:
    """Transport.get_write_buffer_size(): bytes queued or not yet known
    sent."""
    return (<Stream?>self._stream)._size()


@cython.binding(True)
def stream_connection_send(self, data) -> None:
    """iocp.server's Connection.send() and write() on the stream core: the
    stream's server_write() (see Stream.bind_server)."""
    (<Stream?>self._stream)._server_write(data, True)

