# The hot paths of iocp.aio's event loop, in C: one loop iteration
# (aio_run_once), call_soon (aio_call_soon) and create_future
# (aio_create_future).  iocp.aio binds them as methods of its EventLoop.
#
# Why: the loop runs the stdlib's asyncio.Handle objects, and the stdlib
# runs each one through Handle._run, a Python frame, after a Python
# call_soon built it through a Python __init__.  An echo over asyncio
# streams makes one Handle, runs one and creates one Future per message;
# with cProfile those three came to a quarter of the loop's Python time
# (uvloop runs its own C handles).  The objects stay the stdlib's own
# asyncio.Handle and asyncio.Future: everything that inspects, cancels or
# formats them keeps working, and a handle of any other class is run
# through its own _run().
#
# Handle is a Python class with __slots__: its fields live at fixed
# offsets that the member descriptors of the class tell.  aio_setup()
# reads them once; the loop reads and writes a handle's fields there (as
# the member descriptors themselves do), which is what makes building and
# running one cheap.  Where a descriptor is not the plain object slot we
# expect (another interpreter, a changed class), aio_setup() leaves the
# fast path off and the loop keeps the stdlib's code.
#
# Semantics match BaseEventLoop._run_once: cancelled timers are purged
# (all of them once more than _MIN_SCHEDULED_TIMER_HANDLES are scheduled
# and more than _MIN_CANCELLED_TIMER_HANDLES_FRACTION of them are
# cancelled, else those at the head), the wait is 0 with callbacks ready
# or a stop requested, else until the earliest timer (at most
# MAXIMUM_SELECT_TIMEOUT), due timers (within the clock resolution) join
# the ready queue, and exactly the callbacks ready at that point run --
# not the ones they schedule.  In debug mode the stdlib's own _run_once
# runs instead (it times slow callbacks).

cdef extern from *:
    """
    #include <structmember.h>
    /* Offset of a __slots__ field from its member descriptor; -1 if the
       descriptor is not a plain, writable object slot. */
    static Py_ssize_t iocp__aio_slot_offset(PyObject *descr)
    {
        PyMemberDef *m;
        if (Py_TYPE(descr) != &PyMemberDescr_Type)
            return -1;
        m = ((PyMemberDescrObject *)descr)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY) || m->offset <= 0)
            return -1;
        return m->offset;
    }
    static inline PyObject *iocp__aio_slot_get(PyObject *o, Py_ssize_t off)
    {
        return *(PyObject **)((char *)o + off);   /* borrowed, may be NULL */
    }
    static inline void iocp__aio_slot_set(PyObject *o, Py_ssize_t off, PyObject *v)
    {
        PyObject **p = (PyObject **)((char *)o + off);
        PyObject *old = *p;
        Py_INCREF(v);
        *p = v;
        Py_XDECREF(old);
    }
    /* ctx.run(cb, *args) for up to 6 args without a tuple. */
    static PyObject *iocp__aio_ctx_run(PyObject *run, PyObject *ctx, PyObject *cb,
                                       PyObject *args)
    {
        PyObject *stack[8];
        Py_ssize_t i, n = PyTuple_GET_SIZE(args);
        if (n > 6) {
            PyObject *all = PyTuple_New(n + 2), *r;
            if (all == NULL)
                return NULL;
            Py_INCREF(ctx); PyTuple_SET_ITEM(all, 0, ctx);
            Py_INCREF(cb); PyTuple_SET_ITEM(all, 1, cb);
            for (i = 0; i < n; i++) {
                PyObject *a = PyTuple_GET_ITEM(args, i);
                Py_INCREF(a);
                PyTuple_SET_ITEM(all, i + 2, a);
            }
            r = PyObject_Call(run, all, NULL);
            Py_DECREF(all);
            return r;
        }
        stack[0] = ctx;
        stack[1] = cb;
        for (i = 0; i < n; i++)
            stack[i + 2] = PyTuple_GET_ITEM(args, i);
        return PyObject_Vectorcall(run, stack, (size_t)(n + 2), NULL);
    }
    """
    Py_ssize_t iocp__aio_slot_offset(object descr)
    PyObject *iocp__aio_slot_get(object o, Py_ssize_t off)
    void iocp__aio_slot_set(object o, Py_ssize_t off, object v)
    object iocp__aio_ctx_run(object run, object ctx, object cb, object args)


cdef extern from "Python.h":
    object PyContext_CopyCurrent()
    PyObject *PyDict_GetItemWithError(object d, object key) except? NULL


cdef bint _aio_ready = False          # aio_setup() found every slot
cdef object _aio_Handle = None        # asyncio.Handle
cdef object _aio_TimerHandle = None   # asyncio.TimerHandle
cdef object _aio_Future = None        # asyncio.Future (the C one)
cdef object _aio_ctx_run = None       # contextvars.Context.run, unbound
cdef object _aio_new = None           # object.__new__
cdef object _aio_heappop = None
cdef object _aio_heapify = None
cdef object _aio_base_run_once = None
cdef object _aio_base_call_soon = None
cdef object _aio_report = None        # (handle, exc): the stdlib's report of a failed callback
cdef object _aio_noop_process = None  # BaseProactorEventLoop._process_events: does nothing
cdef object _aio_Proactor = None      # iocp.aio's selector, whose select() is one port.run_once
cdef Py_ssize_t _aio_min_scheduled = 100
cdef double _aio_min_cancelled_fraction = 0.5
cdef double _aio_max_timeout = 24 * 3600
# Handle's slot offsets.
cdef Py_ssize_t _H_callback, _H_args, _H_cancelled, _H_loop, _H_tb, _H_repr, _H_context
cdef Py_ssize_t _T_when = -1, _T_scheduled = -1


def aio_setup(handle, timer_handle, future, base_run_once, base_call_soon, report,
              Py_ssize_t min_scheduled, double min_cancelled_fraction, double max_timeout,
              noop_process_events=None, proactor=None):
    """Called once by iocp.aio with the stdlib's classes and constants;
    returns whether the C fast path is on (else the loop keeps the
    stdlib's own code)."""
    global _aio_ready, _aio_Handle, _aio_TimerHandle, _aio_Future, _aio_ctx_run, _aio_new
    global _aio_heappop, _aio_heapify, _aio_base_run_once, _aio_base_call_soon, _aio_report
    global _aio_min_scheduled, _aio_min_cancelled_fraction, _aio_max_timeout, _aio_noop_process
    global _aio_Proactor
    global _H_callback, _H_args, _H_cancelled, _H_loop, _H_tb, _H_repr, _H_context
    global _T_when, _T_scheduled
    import contextvars
    import heapq
    _aio_Handle = handle
    _aio_TimerHandle = timer_handle
    _aio_Future = future
    _aio_ctx_run = contextvars.Context.run
    _aio_new = object.__new__
    _aio_heappop = heapq.heappop
    _aio_heapify = heapq.heapify
    _aio_base_run_once = base_run_once
    _aio_base_call_soon = base_call_soon
    _aio_report = report
    _aio_min_scheduled = min_scheduled
    _aio_min_cancelled_fraction = min_cancelled_fraction
    _aio_max_timeout = max_timeout
    _aio_noop_process = noop_process_events
    _aio_Proactor = proactor

    def offset(cls, name):
        return iocp__aio_slot_offset(cls.__dict__.get(name))

    _H_callback = offset(handle, "_callback")
    _H_args = offset(handle, "_args")
    _H_cancelled = offset(handle, "_cancelled")
    _H_loop = offset(handle, "_loop")
    _H_tb = offset(handle, "_source_traceback")
    _H_repr = offset(handle, "_repr")
    _H_context = offset(handle, "_context")
    _T_when = offset(timer_handle, "_when")
    _T_scheduled = offset(timer_handle, "_scheduled")
    _aio_ready = (min(_H_callback, _H_args, _H_cancelled, _H_loop, _H_tb, _H_repr,
                      _H_context, _T_when, _T_scheduled) > 0
                  and issubclass(timer_handle, handle)
                  and timer_handle._run is handle._run)
    return _aio_ready


cdef inline object _aio_field(object h, Py_ssize_t off, str name):
    """A handle's field: from its slot, or (unset) through getattr, which
    raises the AttributeError the stdlib would."""
    cdef PyObject *v = iocp__aio_slot_get(h, off)
    if v == NULL:
        return getattr(h, name)
    return <object>v


cdef int _aio_run_handle(object h) except -1:
    """Runs one ready handle as Handle._run does."""
    cdef object t = type(h)
    if t is not _aio_Handle and t is not _aio_TimerHandle:
        h._run()
        return 0
    try:
        iocp__aio_ctx_run(_aio_ctx_run, _aio_field(h, _H_context, "_context"),
                          _aio_field(h, _H_callback, "_callback"),
                          _aio_field(h, _H_args, "_args"))
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        _aio_report(h, exc)
    return 0


cdef inline bint _aio_cancelled(object h) except -1:
    cdef object t = type(h)
    if t is _aio_Handle or t is _aio_TimerHandle:
        return _aio_field(h, _H_cancelled, "_cancelled") is True
    return bool(h._cancelled)


cdef inline object _aio_attr(dict d, object loop, str name):
    """loop.<name> for a plain instance attribute of BaseEventLoop: from
    the instance dict (a getattr walks the loop class's long MRO first)."""
    cdef PyObject *v = PyDict_GetItemWithError(d, name)
    if v == NULL:
        return getattr(loop, name)
    return <object>v


cdef object _aio_select(object loop, dict d, object timeout):
    """loop._selector.select(timeout) then loop._process_events(): for
    iocp.aio's Proactor, its one port.run_once, called from here."""
    cdef dict sd
    sel = _aio_attr(d, loop, "_selector")
    if _aio_Proactor is not None and type(sel) is _aio_Proactor:
        sd = sel.__dict__
        if PyDict_GetItemWithError(sd, "select") == NULL:   # not wrapped
            port = _aio_attr(sd, sel, "_port")
            if port is None:
                raise RuntimeError("the event loop's completion port is closed")
            port.run_once(timeout, _aio_attr(sd, sel, "_on_post_handler"))
            events = []
        else:
            events = sel.select(timeout)
    else:
        events = sel.select(timeout)
    # The proactor loop's _process_events does nothing (its completions
    # ran inside select()): spare the call unless a class overrides it.
    if _aio_noop_process is None or type(loop)._process_events is not _aio_noop_process:
        loop._process_events(events)


def aio_run_once(loop):
    """One iteration of the loop (see the note at the top of aioloop.pxi)."""
    cdef list scheduled
    cdef dict d = loop.__dict__
    cdef Py_ssize_t n, i, ntodo
    cdef object h, timeout, ready, end_time
    if not _aio_ready or _aio_attr(d, loop, "_debug"):
        return _aio_base_run_once(loop)
    scheduled = _aio_attr(d, loop, "_scheduled")
    n = len(scheduled)
    if n > _aio_min_scheduled and loop._timer_cancelled_count / n > _aio_min_cancelled_fraction:
        kept = []
        for h in scheduled:
            if _aio_cancelled(h):
                h._scheduled = False
            else:
                kept.append(h)
        _aio_heapify(kept)
        loop._scheduled = scheduled = kept
        loop._timer_cancelled_count = 0
    else:
        while scheduled and _aio_cancelled(scheduled[0]):
            loop._timer_cancelled_count -= 1
            h = _aio_heappop(scheduled)
            h._scheduled = False
    ready = _aio_attr(d, loop, "_ready")
    timeout = None
    if ready or _aio_attr(d, loop, "_stopping"):
        timeout = 0
    elif scheduled:
        timeout = scheduled[0]._when - loop.time()
        if timeout > _aio_max_timeout:
            timeout = _aio_max_timeout
        elif timeout < 0:
            timeout = 0
    _aio_select(loop, d, timeout)
    if scheduled:
        end_time = loop.time() + loop._clock_resolution
        while scheduled:
            h = scheduled[0]
            if h._when >= end_time:
                break
            h = _aio_heappop(scheduled)
            h._scheduled = False
            ready.append(h)
    ntodo = len(ready)
    popleft = ready.popleft
    for i in range(ntodo):
        h = popleft()
        if not _aio_cancelled(h):
            _aio_run_handle(h)
    h = None


def aio_call_soon(loop, callback, *args, context=None):
    """loop.call_soon(): a stdlib asyncio.Handle, built in C."""
    if loop._closed:
        raise RuntimeError("Event loop is closed")
    if not _aio_ready or loop._debug:
        return _aio_base_call_soon(loop, callback, *args, context=context)
    if context is None:
        context = PyContext_CopyCurrent()
    h = _aio_new(_aio_Handle)
    iocp__aio_slot_set(h, _H_context, context)
    iocp__aio_slot_set(h, _H_loop, loop)
    iocp__aio_slot_set(h, _H_callback, callback)
    iocp__aio_slot_set(h, _H_args, args)
    iocp__aio_slot_set(h, _H_cancelled, False)
    iocp__aio_slot_set(h, _H_repr, None)
    iocp__aio_slot_set(h, _H_tb, None)
    loop._ready.append(h)
    return h


def aio_create_future(loop):
    """loop.create_future(): an asyncio.Future of this loop."""
    return _aio_Future(loop=loop)
