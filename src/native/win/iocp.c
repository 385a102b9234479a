/*
 * iocp.c -- the Windows backend: the real I/O completion port.
 *
 * What the kernel gives: completion, natively.  A socket associated with
 * an I/O completion port (CreateIoCompletionPort) reports the end of every
 * overlapped operation as a packet {bytes, key, OVERLAPPED*} that
 * GetQueuedCompletionStatusEx hands back in batches.  Our op record begins
 * with its OVERLAPPED (iocp_native.h), so a packet's OVERLAPPED pointer *is*
 * the op; the completion key only tells our own wake-up packets apart.
 *
 * How ops map:
 *   ACCEPT    AcceptEx on a socket we create (same family/type/protocol as
 *             the listener), then SO_UPDATE_ACCEPT_CONTEXT and
 *             GetAcceptExSockaddrs for the peer address.  Multishot accept
 *             (which IOCP does not have) is emulated: after each success we
 *             deliver an IOCP_CF_MORE completion and issue AcceptEx again.
 *   CONNECT   ConnectEx, which insists on a bound socket: an unbound one is
 *             bound to the family's wildcard address first; then
 *             SO_UPDATE_CONNECT_CONTEXT so shutdown()/getpeername() work.
 *   RECV      WSARecv into a port buffer taken at submit (iocp__buffer_get):
 *             a one-shot recv pins op->len bytes while it waits.
 *   RECV + MULTISHOT (emulated; IOCP has no multishot): a zero-byte
 *             WSARecv waits for the socket to become readable and pins
 *             nothing.  When it completes, the socket is read with
 *             overlapped WSARecvs into port buffers (first 4 KiB, after a
 *             full read sized by FIONREAD; a socket whose first reads
 *             fill 4 KiB sizes them all by FIONREAD, so a large arrival
 *             is one completion, until 16 small reads in a row: see
 *             iocp__ms_follow) that complete at once because
 *             the bytes are there -- so the caller's socket stays in
 *             blocking mode, untouched -- each delivered with MORE|BUFFER,
 *             until a short read says it is drained; then the zero-byte
 *             WSARecv goes out again.  End of stream (a 0-byte read), an
 *             error or a cancel is the final completion.  Buffers carry
 *             their size as buf_id and come back through release_buffer,
 *             so the bytes out are bounded (recv_pool_max): a read that
 *             would pass the bound waits on a starved list until a release.
 *             While armed, other recvs on the socket get IOCP_EBUSY.
 *   RECV_INTO WSARecv into the caller's pinned buffer.
 *   SEND      WSASend, issued again for the rest after a partial completion
 *             (rare on Windows, but allowed), so one completion reports the
 *             whole send or the bytes sent plus the error that stopped it.
 *             A silent send's full success is delivered IOCP_CF_SILENT;
 *             inline (skip mode) that is no packet at all.
 *   POLL      The AFD poll, as the Winsock select() is built: IOCTL_AFD_POLL
 *             through NtDeviceIoControlFile (looked up in ntdll at run time)
 *             on the socket itself, which must be its own base handle
 *             (SIO_BASE_HANDLE; not so behind a layered provider), with the
 *             op's OVERLAPPED as APC context and its Internal pair as the
 *             IO_STATUS_BLOCK, so the packet is the op and CancelIoEx on the
 *             socket cancels it.  AFD events map to IOCP_POLL_*: RECEIVE,
 *             ACCEPT, DISCONNECT -> IN; SEND -> OUT; ABORT -> ERR|HUP;
 *             CONNECT_FAIL -> ERR; LOCAL_CLOSE (socket closed) -> cancelled.
 *             One-shot is level triggered (the AFD poll completes at once
 *             when ready).  Multishot delivers with MORE and is armed again
 *             by the next poll(), before it waits (armed at once it would
 *             re-report a socket the caller is about to drain): a socket
 *             left ready is reported once per poll(); ERR or HUP ends it.
 *             Fallback where the AFD poll is out of reach (no ntdll entry
 *             point, a layered provider, the driver refusing the IOCTL):
 *             a zero-byte WSASend
 *             when OUT is wanted (completes when the socket takes data, in
 *             practice at once), else a zero-byte WSARecv (completes on
 *             data or end of stream); a broken connection is ERR|HUP, a
 *             socket it cannot poll (a listener, one not connected) an
 *             error (WSAENOTCONN).
 *             (Test knob: IOCP_WIN_TEST_POLL_FALLBACK=1 forces it.)
 *   POST      PostQueuedCompletionStatus with the op's OVERLAPPED; result is
 *             op->len (not the DWORD the packet can carry).
 *
 * Inline completion: a socket is set to FILE_SKIP_COMPLETION_PORT_ON_
 * SUCCESS when it is registered, if its provider hands out real kernel
 * handles (XP1_IFS_HANDLES in its WSAPROTOCOL_INFOW).  An overlapped call
 * that succeeds at once then queues no packet, so we finish the op right
 * there, under the lock, with iocp__deliver -- exactly once.  A non-IFS
 * layered service provider completes through its own machinery: it may
 * accept the mode and still post a packet for an inline success, so such a
 * socket (and one where setting the mode fails) is never put in that mode.
 * The decision is per socket, kept in its table entry; every issue of an
 * op reads its socket's entry, and on a socket without the mode an inline
 * success is treated like a pending op: its packet will come.  Failure
 * other than WSA_IO_PENDING never queues a packet, in either mode.
 * (Test knob: IOCP_WIN_TEST_NON_IFS=N, read when a port is created, treats
 * every Nth socket registered on it as non-IFS; 1 = all.)
 *
 * Errors come from the packet's NTSTATUS (OVERLAPPED.Internal), turned into
 * a Win32 error by GetOverlappedResult (which never touches the handle for
 * a finished op -- WSAGetOverlappedResult would, and fails with WSAENOTSOCK
 * once the socket is closed).  The network ones are then translated to the
 * WSA codes Winsock itself reports (64 -> WSAECONNRESET, 1225 ->
 * WSAECONNREFUSED, ...) because CPython maps WSA codes to the right OSError
 * subclasses and most Win32 network codes to plain OSError(EINVAL).
 *
 * Cancel and close: cancel marks the op (so a partial send or a multishot
 * accept is not issued again) and calls CancelIoEx on that OVERLAPPED.  The
 * kernel then completes it with ERROR_OPERATION_ABORTED (995), which we
 * deliver with IOCP_CF_CANCELLED; if the op finished first, CancelIoEx says
 * ERROR_NOT_FOUND and the real result arrives, which the contract allows.
 * Unregister cancels every op of the socket found on port->inflight (a
 * socket cannot leave a port; it stays associated until it is closed).
 * Handle values are reused: a socket closed without unregister leaves its
 * entry marked registered, and the next socket given that value is a new
 * one.  Register tells them apart by the association: the same open socket
 * cannot be associated twice (ERROR_INVALID_PARAMETER -> EEXIST), a new
 * one can.  Then the entry is taken over (its skip decision made afresh)
 * and the old socket's ops still on port->inflight are marked cancelled:
 * the kernel aborted them at close, and the mark keeps a partial send or a
 * multishot accept from being issued again on the new socket.
 * Closing a socket aborts its pending ops (995 on Windows; Wine 8 says
 * ERROR_HANDLES_CLOSED, 676, which we treat the same).  A failed or
 * cancelled AcceptEx closes the socket it made.
 *
 * The ready list and the bounded queue: poll() is told how many
 * completions it may deliver (`max`), but one packet of a multishot recv
 * can mean many reads.  Every packet of a GQCSEx batch may deliver one
 * completion, so a multishot recv reads on only while room is left for
 * the rest of the batch (iocp__room); past that, or when work is found
 * outside poll() (a submit whose zero-byte recv completed inline, a
 * cancel of a parked op), or a multishot poll was delivered, the op is
 * parked on the ready list, port->kick is set, and the next poll() runs
 * the list before it waits (and waits with a zero timeout if that
 * delivered something) -- nothing in the kernel while parked, so cancel
 * just marks it.
 *
 * Threads: the only lock is the core's (iocp__lock around delivery in
 * poll(), held by the core around submit/cancel/register); on a
 * single-issuer port the core makes it a no-op and nothing here assumes
 * more: all backend state is touched from the owner thread, except wake()
 * and release_buffer's wake packet, which are PostQueuedCompletionStatus
 * and safe from any thread.
 *
 * Wake-ups are packets with an internal key and no OVERLAPPED; they never
 * surface.  One GetQueuedCompletionStatusEx batch may hold wake packets that
 * were meant for other waiting threads; only one thread polls at a time
 * (the core elects it), so the others sleep on the core's condition
 * variable, not in the kernel, and swallowing them all is right.
 */
#ifndef _WIN32_WINNT
#define _WIN32_WINNT 0x0600   /* GQCSEx, CancelIoEx, SetFileCompletion... */
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../iocp_internal.h"

#include <mswsock.h>

#ifndef FILE_SKIP_COMPLETION_PORT_ON_SUCCESS
#define FILE_SKIP_COMPLETION_PORT_ON_SUCCESS 0x1
#endif
#ifndef FILE_SKIP_SET_EVENT_ON_HANDLE
#define FILE_SKIP_SET_EVENT_ON_HANDLE 0x2
#endif
#ifndef WSA_FLAG_NO_HANDLE_INHERIT
#define WSA_FLAG_NO_HANDLE_INHERIT 0x80
#endif
#ifndef ERROR_HANDLES_CLOSED
#define ERROR_HANDLES_CLOSED 676L
#endif

#define IOCP__WIN_BATCH 256
#define IOCP__KEY_OP   ((ULONG_PTR)0)   /* packets carrying an iocp_op */
#define IOCP__KEY_WAKE ((ULONG_PTR)1)   /* internal wake-ups */

/* op->state bits. */
#define IOCP__WST_CANCEL 0x1   /* cancel requested: do not issue again */
#define IOCP__WST_ZERO   0x2   /* multishot recv: zero-byte WSARecv in the kernel */
#define IOCP__WST_DATA   0x4   /* multishot recv: WSARecv into a port buffer in the kernel */
#define IOCP__WST_PARKED 0x8   /* on the ready list: nothing in the kernel */
#define IOCP__WST_FRESH  0x10  /* multishot recv: readable, nothing read since */
#define IOCP__WST_AFD    0x20  /* poll: the step in the kernel is an AFD poll */
#define IOCP__WST_STARVED 0x80 /* multishot recv: on the starved list, waiting
                                  for buffers to come back (recv_pool_max) */

/* Default bound of the bytes multishot recvs may hold in handed-out
 * buffers (iocp_port_options.recv_pool_max). */
#define IOCP__MS_POOL_MAX ((size_t)64 << 20)

/* Multishot recv: bytes per completion when op->len is 0, and the size of
 * the first read after the socket became readable (no FIONREAD for it: a
 * small message fits whole, end of stream reads 0, and only a longer
 * arrival pays for FIONREAD to size the rest). */
#define IOCP__MS_DEFAULT_LEN (64 * 1024)
#define IOCP__MS_FIRST_LEN 4096

/* A socket whose first read fills IOCP__MS_FIRST_LEN sizes its reads by
 * FIONREAD from the start, until this many reads in a row of at most
 * IOCP__MS_SMALL_READ bytes (hysteresis, as io_uring's group switch). */
#define IOCP__MS_DOWN_RUN 16u
#define IOCP__MS_SMALL_READ 2048

/*
 * The AFD poll (see the note at the top).  Our own names for the layout
 * the AFD driver reads: the same on every Windows since NT, and what Wine
 * implements.
 */
#define IOCP__IOCTL_AFD_POLL 0x00012024u
#define IOCP__AFD_RECEIVE      0x0001u
#define IOCP__AFD_SEND         0x0004u
#define IOCP__AFD_DISCONNECT   0x0008u
#define IOCP__AFD_ABORT        0x0010u
#define IOCP__AFD_LOCAL_CLOSE  0x0020u
#define IOCP__AFD_ACCEPT       0x0080u
#define IOCP__AFD_CONNECT_FAIL 0x0100u
#define IOCP__STATUS_PENDING   0x00000103L

struct iocp__afd_poll_info {
    LARGE_INTEGER timeout;
    ULONG nhandles;
    ULONG exclusive;
    struct {
        HANDLE handle;
        ULONG events;
        LONG status;
    } h[1];
};

/* NTSTATUS NtDeviceIoControlFile(...) and RtlNtStatusToDosError, looked
 * up in ntdll at run time so no build links ntdll's import library.  The
 * IO_STATUS_BLOCK we pass is the OVERLAPPED's Internal/InternalHigh pair,
 * laid out the same, so GetOverlappedResult reads the outcome as usual. */
typedef LONG (WINAPI *iocp__nt_ioctl_fn)(HANDLE, HANDLE, void *, void *, void *, ULONG,
                                          void *, ULONG, void *, ULONG);
typedef ULONG (WINAPI *iocp__nt_to_dos_fn)(LONG);

/* One registered socket.  Chained hash table keyed by SOCKET. */
struct iocp__sockent {
    SOCKET s;
    unsigned char registered;  /* between register and unregister */
    unsigned char skip;        /* FILE_SKIP_COMPLETION_PORT_ON_SUCCESS set */
    unsigned char afd;         /* poll: 0 not known yet, 1 AFD poll, 2 fallback */
    iocp_op *ms_recv;          /* the armed multishot recv, or NULL */
    /* Multishot recv sizing (iocp__ms_follow): 1 once a first read of
     * IOCP__MS_FIRST_LEN came back full, so each arrival is sized by
     * FIONREAD at once (one completion, not a 4 KiB one then the rest);
     * 0 again after IOCP__MS_DOWN_RUN small reads in a row (ms_small). */
    unsigned char ms_large;
    unsigned short ms_small;
    struct iocp__sockent *next;
};

#define IOCP__SOCK_BUCKETS 1024

/* Extension functions, per address family (they belong to the provider). */
struct iocp__ext {
    int family;
    LPFN_ACCEPTEX acceptex;
    LPFN_CONNECTEX connectex;
    LPFN_GETACCEPTEXSOCKADDRS getsockaddrs;
};

struct iocp__win {
    HANDLE port;
    struct iocp__sockent *buckets[IOCP__SOCK_BUCKETS];
    struct iocp__ext ext[4];
    int next_ext;
    unsigned test_non_ifs;     /* IOCP_WIN_TEST_NON_IFS: every Nth socket */
    unsigned nregistered;      /* sockets registered so far (for the knob) */
    int test_poll_fallback;    /* IOCP_WIN_TEST_POLL_FALLBACK=1: never AFD */
    /* Multishot recv and poll ops with nothing in the kernel, waiting for
     * poll() to run them (linked by fd_next): out of room in the last
     * batch, or re-armed at the next poll.  Lock held to change; poll()
     * reads `nready` unlocked only to choose a zero timeout (a park made
     * by another thread also sets port->kick, whose wake packet ends the
     * wait, so a stale read loses nothing). */
    iocp_op *ready_head, *ready_tail;
    volatile LONG nready;
    iocp__nt_ioctl_fn nt_ioctl;       /* NULL: no AFD poll, fallback only */
    iocp__nt_to_dos_fn nt_to_dos;
    int afd_broken;                   /* the AFD poll was refused once */
    int64_t limit;                    /* see iocp__room; 0 outside poll() */
    /* Bytes of multishot-recv buffers handed out (in the kernel or with
     * the caller) and their bound; recvs that would pass it wait on the
     * starved list (linked by fd_next, not counted in nready, so poll()
     * does not spin) until release_buffer gives bytes back. */
    size_t ms_bytes, ms_max;
    iocp_op *starved_head;
    /* Set when a multishot accept was issued again and went pending
     * inside poll(): its packet may be queued already (see
     * iocp__win_poll's second look).  Lock held. */
    int repoll;
};

/* ---- registered sockets --------------------------------------------- */

static unsigned iocp__sock_hash(SOCKET s)
{
    /* Handle values are multiples of 4. */
    unsigned long long v = (unsigned long long)s >> 2;
    v ^= v >> 17;
    return (unsigned)(v * 0x9E3779B1u) & (IOCP__SOCK_BUCKETS - 1);
}

static struct iocp__sockent *iocp__sock_find(struct iocp__win *w, SOCKET s, int create)
{
    unsigned h = iocp__sock_hash(s);
    struct iocp__sockent *e;

    for (e = w->buckets[h]; e; e = e->next)
        if (e->s == s)
            return e;
    if (!create)
        return NULL;
    e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->s = s;
    e->next = w->buckets[h];
    w->buckets[h] = e;
    return e;
}

/* ---- errors ----------------------------------------------------------- */

/* Win32 network errors -> the WSA codes Winsock reports for them. */
static int iocp__wsa_error(DWORD err)
{
    switch (err) {
    case ERROR_NETNAME_DELETED:          return WSAECONNRESET;   /* 64 */
    case ERROR_CONNECTION_REFUSED:       return WSAECONNREFUSED; /* 1225 */
    case ERROR_CONNECTION_ABORTED:       return WSAECONNABORTED; /* 1236 */
    case ERROR_NETWORK_UNREACHABLE:      return WSAENETUNREACH;  /* 1231 */
    case ERROR_HOST_UNREACHABLE:         return WSAEHOSTUNREACH; /* 1232 */
    case ERROR_PORT_UNREACHABLE:         return WSAECONNRESET;   /* 1234 */
    case ERROR_SEM_TIMEOUT:              return WSAETIMEDOUT;    /* 121 */
    case ERROR_CONNECTION_INVALID:       return WSAENOTCONN;     /* 1229 */
    case ERROR_ADDRESS_ALREADY_ASSOCIATED: return WSAEADDRINUSE; /* 1227 */
    case ERROR_HANDLES_CLOSED:           return ERROR_OPERATION_ABORTED; /* Wine */
    default:                             return (int)err;
    }
}

/* The outcome of a finished overlapped op: 0 or a (WSA) error. */
static int iocp__ov_error(iocp_op *op, DWORD *bytes)
{
    DWORD n = 0;

    if (GetOverlappedResult((HANDLE)op->sock, &op->ov, &n, FALSE)) {
        *bytes = n;
        return 0;
    }
    *bytes = n;
    return iocp__wsa_error(GetLastError());
}

/* ---- extension functions --------------------------------------------- */

static void *iocp__ext_fn(SOCKET s, GUID guid)
{
    void *fn = NULL;
    DWORD n = 0;

    if (WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &guid, sizeof(guid),
                 &fn, sizeof(fn), &n, NULL, NULL) != 0)
        return NULL;
    return fn;
}

/* Extension functions for `family`, looked up once through socket `s`. */
static struct iocp__ext *iocp__ext_get(struct iocp__win *w, SOCKET s, int family, int *err)
{
    GUID g_accept = WSAID_ACCEPTEX, g_connect = WSAID_CONNECTEX,
         g_addrs = WSAID_GETACCEPTEXSOCKADDRS;
    struct iocp__ext *x;
    int i;

    for (i = 0; i < w->next_ext; i++)
        if (w->ext[i].family == family)
            return &w->ext[i];
    if (w->next_ext == (int)(sizeof(w->ext) / sizeof(w->ext[0]))) {
        *err = WSAEAFNOSUPPORT;
        return NULL;
    }
    x = &w->ext[w->next_ext];
    x->acceptex = (LPFN_ACCEPTEX)iocp__ext_fn(s, g_accept);
    x->connectex = (LPFN_CONNECTEX)iocp__ext_fn(s, g_connect);
    x->getsockaddrs = (LPFN_GETACCEPTEXSOCKADDRS)iocp__ext_fn(s, g_addrs);
    if (!x->acceptex || !x->connectex || !x->getsockaddrs) {
        *err = WSAGetLastError();
        if (*err == 0)
            *err = WSAEOPNOTSUPP;
        return NULL;
    }
    x->family = family;
    w->next_ext++;
    return x;
}

/* ---- issuing ---------------------------------------------------------- */

enum { IOCP__PENDING = 1, IOCP__INLINE = 2 };

/*
 * Starts the kernel side of op's next step.  Returns IOCP__PENDING (a
 * packet will come), IOCP__INLINE (finished now, no packet: *bytes holds
 * the count) or a negative error (finished now with that error, no packet).
 * Lock held.
 */
static int iocp__issue(iocp_port *p, iocp_op *op, const struct iocp__sockent *se, DWORD *bytes)
{
    struct iocp__win *w = p->be;
    struct iocp__ext *x;
    DWORD flags = 0;
    int r, err = 0;

    *bytes = 0;
    memset(&op->ov, 0, sizeof(op->ov));
    switch (op->kind) {
    case IOCP_OP_ACCEPT: {
        WSAPROTOCOL_INFOW info;
        int ilen = sizeof(info);
        SOCKET a;

        if (getsockopt(op->sock, SOL_SOCKET, SO_PROTOCOL_INFOW, (char *)&info, &ilen) != 0)
            return -WSAGetLastError();
        x = iocp__ext_get(w, op->sock, info.iAddressFamily, &err);
        if (!x)
            return -err;
        a = WSASocketW(info.iAddressFamily, info.iSocketType, info.iProtocol, NULL, 0,
                       WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT);
        if (a == INVALID_SOCKET && WSAGetLastError() == WSAEINVAL)
            /* Before Windows 7 SP1 the no-inherit flag is unknown. */
            a = WSASocketW(info.iAddressFamily, info.iSocketType, info.iProtocol, NULL, 0,
                           WSA_FLAG_OVERLAPPED);
        if (a == INVALID_SOCKET)
            return -WSAGetLastError();
        op->aux_sock = a;
        if (x->acceptex(op->sock, a, op->accept_addrs, 0, IOCP_ACCEPT_ADDR_SPACE,
                        IOCP_ACCEPT_ADDR_SPACE, bytes, &op->ov))
            return se->skip ? IOCP__INLINE : IOCP__PENDING;
        err = WSAGetLastError();
        break;
    }
    case IOCP_OP_CONNECT: {
        struct sockaddr_storage ss;
        int sl = sizeof(ss);

        x = iocp__ext_get(w, op->sock, op->addr.ss_family, &err);
        if (!x)
            return -err;
        if (getsockname(op->sock, (struct sockaddr *)&ss, &sl) != 0) {
            /* ConnectEx requires a bound socket; getsockname fails with
             * WSAEINVAL on an unbound one.  Bind to the wildcard. */
            memset(&ss, 0, sizeof(ss));
            ss.ss_family = op->addr.ss_family;
            sl = ss.ss_family == AF_INET6 ? (int)sizeof(struct sockaddr_in6)
                                          : (int)sizeof(struct sockaddr_in);
            if (bind(op->sock, (struct sockaddr *)&ss, sl) != 0)
                return -WSAGetLastError();
        }
        if (x->connectex(op->sock, (struct sockaddr *)&op->addr, op->addrlen, NULL, 0,
                         NULL, &op->ov))
            return se->skip ? IOCP__INLINE : IOCP__PENDING;
        err = WSAGetLastError();
        break;
    }
    case IOCP_OP_RECV:
    case IOCP_OP_RECV_INTO:
        if (op->kind == IOCP_OP_RECV) {
            if (!op->backend_data)
                op->backend_data = iocp__buffer_get(p, op->len);
            if (!op->backend_data)
                return IOCP_ENOMEM;
            op->wsabuf.buf = op->backend_data;
        } else {
            op->wsabuf.buf = op->buf;
        }
        op->wsabuf.len = op->len > 0x7fffffffu ? 0x7fffffffu : (ULONG)op->len;
        r = WSARecv(op->sock, &op->wsabuf, 1, bytes, &flags, &op->ov, NULL);
        if (r == 0)
            return se->skip ? IOCP__INLINE : IOCP__PENDING;
        err = WSAGetLastError();
        break;
    case IOCP_OP_SEND: {
        size_t left = op->len - op->done;
        if (op->iovcnt > 0) {
            /* Gathered: WSASend captures the WSABUF array before it
             * returns, so it can live on the stack; the segments
             * themselves stay pinned by the caller. */
            WSABUF bufs[IOCP_IOV_MAX];
            int i, nseg;
            iocp_iovec *v = iocp__iov_advance(op, 0, &nseg);
            for (i = 0; i < nseg; i++) {
                bufs[i].buf = (char *)v[i].base;
                bufs[i].len = v[i].len > 0x7fffffffu ? 0x7fffffffu : (ULONG)v[i].len;
            }
            r = WSASend(op->sock, bufs, (DWORD)nseg, bytes, 0, &op->ov, NULL);
        } else {
            op->wsabuf.buf = op->buf + op->done;
            op->wsabuf.len = left > 0x7fffffffu ? 0x7fffffffu : (ULONG)left;
            r = WSASend(op->sock, &op->wsabuf, 1, bytes, 0, &op->ov, NULL);
        }
        if (r == 0)
            return se->skip ? IOCP__INLINE : IOCP__PENDING;
        err = WSAGetLastError();
        break;
    }
    default:
        return IOCP_EINVAL;
    }
    if (err == WSA_IO_PENDING)
        return IOCP__PENDING;
    return -err;
}

/* ---- finishing -------------------------------------------------------- */

static void iocp__close_aux(iocp_op *op)
{
    if (op->aux_sock != INVALID_SOCKET) {
        closesocket(op->aux_sock);
        op->aux_sock = INVALID_SOCKET;
    }
}

static void iocp__drop_buffer(iocp_port *p, iocp_op *op)
{
    if (op->backend_data) {
        iocp__buffer_put(p, op->backend_data);
        op->backend_data = NULL;
    }
}

/* ---- multishot recv and poll ------------------------------------------ */

/*
 * Room left in the batch poll() is reaping: how many more completions it
 * may deliver before it would hand out more than it was told.  Outside
 * poll() there is none (limit 0), so work found there waits on the ready
 * list.  Lock held.
 */
static inline int iocp__room(iocp_port *p)
{
    struct iocp__win *w = p->be;

    return w->limit > (int64_t)(p->qlen + p->ovflen);
}

/* Puts `op` (nothing of it in the kernel) on the ready list for the next
 * poll(), and has a poller asleep in the kernel woken for it. */
static void iocp__park(iocp_port *p, iocp_op *op)
{
    struct iocp__win *w = p->be;

    if (op->state & IOCP__WST_PARKED)
        return;
    op->state |= IOCP__WST_PARKED;
    op->fd_next = NULL;
    if (w->ready_tail)
        w->ready_tail->fd_next = op;
    else
        w->ready_head = op;
    w->ready_tail = op;
    w->nready++;
    p->kick = 1;
}

/* A port buffer of `size` bytes for a multishot recv's next read, counted
 * against the bound; NULL with *err 0 when over it (wait for releases),
 * with *err IOCP_ENOMEM when memory is out. */
static char *iocp__ms_buf_take(iocp_port *p, iocp_op *op, size_t size, int *err)
{
    struct iocp__win *w = p->be;
    char *buf;

    *err = 0;
    /* Over the bound, wait -- unless nothing is out at all, so a bound
     * smaller than one read still makes progress. */
    if (w->ms_bytes > 0 && w->ms_bytes + size > w->ms_max)
        return NULL;
    buf = iocp__buffer_get(p, size);
    if (!buf) {
        *err = IOCP_ENOMEM;
        return NULL;
    }
    w->ms_bytes += size;
    op->backend_data = buf;
    op->wsabuf.buf = buf;
    op->wsabuf.len = (ULONG)size;
    return buf;
}

/* Gives back the op's unused read buffer (end of stream, error, cancel). */
static void iocp__ms_buf_drop(iocp_port *p, iocp_op *op)
{
    struct iocp__win *w = p->be;

    if (op->backend_data) {
        iocp__buffer_put(p, op->backend_data);
        op->backend_data = NULL;
        w->ms_bytes -= op->wsabuf.len;
    }
}

/* Follows the socket's arrival sizes (see iocp__sockent.ms_large) after a
 * read of `bytes` into a buffer of op->wsabuf.len. */
static void iocp__ms_follow(iocp_port *p, iocp_op *op, DWORD bytes)
{
    struct iocp__sockent *se = iocp__sock_find(p->be, op->sock, 0);

    if (!se)
        return;
    if (!se->ms_large) {
        if (op->wsabuf.len == IOCP__MS_FIRST_LEN && bytes == IOCP__MS_FIRST_LEN) {
            se->ms_large = 1;
            se->ms_small = 0;
        }
    } else if (bytes <= IOCP__MS_SMALL_READ) {
        if (++se->ms_small >= IOCP__MS_DOWN_RUN) {
            se->ms_large = 0;
            se->ms_small = 0;
        }
    } else {
        se->ms_small = 0;
    }
}

/* Hands the filled read buffer to the caller: buf_id carries its size so
 * release_buffer can return it to the bound. */
static void iocp__ms_buf_deliver(iocp_port *p, iocp_op *op, DWORD bytes)
{
    char *buf = op->backend_data;

    iocp__ms_follow(p, op, bytes);
    op->backend_data = NULL;
    iocp__deliver(p, op, (int64_t)bytes, 0, IOCP_CF_MORE | IOCP_CF_BUFFER, buf,
                  (uint32_t)op->wsabuf.len);
}

static void iocp__starve(iocp_port *p, iocp_op *op)
{
    struct iocp__win *w = p->be;

    op->state |= IOCP__WST_STARVED;
    op->fd_next = w->starved_head;
    w->starved_head = op;
}

/* Takes `op` off the starved list and onto the ready list. */
static void iocp__unstarve(iocp_port *p, iocp_op *op)
{
    struct iocp__win *w = p->be;
    iocp_op **pp;

    for (pp = &w->starved_head; *pp; pp = &(*pp)->fd_next) {
        if (*pp == op) {
            *pp = op->fd_next;
            break;
        }
    }
    op->state &= ~IOCP__WST_STARVED;
    iocp__park(p, op);
}

/*
 * backend->release_buffer: a multishot recv's buffer (buf_id = its size)
 * comes back.  Lock held (the core's).  When starved recvs can go on,
 * they move to the ready list and the poller is woken -- with a packet,
 * since this path does not pass the core's kick handling.
 */
static void iocp__win_release_buffer(iocp_port *p, char *data, uint32_t buf_id)
{
    struct iocp__win *w = p->be;

    p->live_buffers++;            /* the core counted it back already */
    iocp__buffer_put(p, data);
    w->ms_bytes -= buf_id;
    if (w->starved_head && w->ms_bytes < w->ms_max) {
        while (w->starved_head)
            iocp__unstarve(p, w->starved_head);
        PostQueuedCompletionStatus(w->port, 0, IOCP__KEY_WAKE, NULL);
    }
}

/* The final completion of a multishot recv or a poll: frees what the op
 * holds (port buffer, AFD poll block) and lets the socket take another
 * recv.  Lock held. */
static void iocp__ms_end(iocp_port *p, iocp_op *op, int64_t result, unsigned flags)
{
    struct iocp__sockent *se = iocp__sock_find(p->be, op->sock, 0);

    if (se && se->ms_recv == op)
        se->ms_recv = NULL;
    if (op->kind == IOCP_OP_POLL) {
        free(op->backend_data);
        op->backend_data = NULL;
    } else {
        iocp__ms_buf_drop(p, op);
    }
    op->state &= IOCP__WST_CANCEL;
    iocp__deliver(p, op, result, 0, flags, NULL, 0);
}

/* Ends a multishot recv or a poll with (WSA or Win32) error `err`: as
 * cancelled if it was asked to stop or its socket was closed under it. */
static void iocp__ms_fail(iocp_port *p, iocp_op *op, int err)
{
    if (err == ERROR_OPERATION_ABORTED || err == ERROR_HANDLES_CLOSED || err == WSAENOTSOCK ||
        (op->state & IOCP__WST_CANCEL))
        iocp__ms_end(p, op, IOCP_ECANCELED, IOCP_CF_CANCELLED);
    else
        iocp__ms_end(p, op, -(int64_t)err, 0);
}

/* What a zero-length WSABUF points at: never written (the op may be a
 * short record, which has no accept_addrs to point into). */
static char iocp__no_bytes[1];

/* A zero-byte WSARecv: completes when data, end of stream or an error is
 * there, and pins no buffer meanwhile.  `buf` points at iocp__no_bytes
 * only because a WSABUF wants an address; nothing is written there. */
static int iocp__issue_zero_recv(iocp_op *op, const struct iocp__sockent *se)
{
    DWORD bytes = 0, flags = 0;
    int err;

    memset(&op->ov, 0, sizeof(op->ov));
    op->wsabuf.buf = iocp__no_bytes;
    op->wsabuf.len = 0;
    if (WSARecv(op->sock, &op->wsabuf, 1, &bytes, &flags, &op->ov, NULL) == 0)
        return se->skip ? IOCP__INLINE : IOCP__PENDING;
    err = WSAGetLastError();
    return err == WSA_IO_PENDING ? IOCP__PENDING : -err;
}

/*
 * Runs a multishot recv whose socket is readable (IOCP__WST_FRESH) or was
 * being read: takes what is there in port buffers sized by FIONREAD, one
 * completion (MORE | BUFFER) per read, until the socket is drained (then
 * a zero-byte WSARecv is posted again, so the idle socket pins nothing),
 * a read goes pending (its packet continues), the op ends, or the batch
 * has no room (parked for the next poll).  A readable socket that holds 0
 * bytes is at end of stream, has an error, or lost a race with another
 * reader: a small read tells which.  The socket stays in blocking mode
 * (the caller's); every read is an overlapped WSARecv for bytes FIONREAD
 * said are there, which completes at once.  Lock held.
 */
static void iocp__ms_recv_pump(iocp_port *p, iocp_op *op)
{
    struct iocp__win *w = p->be;
    size_t cap = op->len ? op->len : IOCP__MS_DEFAULT_LEN;
    int drained = 0;

    if (cap > 0x40000000u)
        cap = 0x40000000u;
    for (;;) {
        struct iocp__sockent *se = iocp__sock_find(w, op->sock, 0);
        u_long avail = 0;
        size_t size;
        DWORD bytes = 0, flags = 0;
        char *buf;
        int r, err;

        if (!iocp__room(p)) {
            iocp__park(p, op);
            return;
        }
        if ((op->state & IOCP__WST_CANCEL) || !se || !se->registered) {
            iocp__ms_end(p, op, IOCP_ECANCELED, IOCP_CF_CANCELLED);
            return;
        }
        /* Just readable: a socket of small arrivals reads 4 KiB blind
         * (no FIONREAD); one of large arrivals (ms_large) asks first, so
         * the arrival comes whole in one read. */
        if (!drained && (!(op->state & IOCP__WST_FRESH) || se->ms_large) &&
            ioctlsocket(op->sock, FIONREAD, &avail) != 0) {
            iocp__ms_fail(p, op, WSAGetLastError());
            return;
        }
        if (avail == 0 && !(op->state & IOCP__WST_FRESH)) {
            r = iocp__issue_zero_recv(op, se);
            if (r == IOCP__PENDING) {
                op->state |= IOCP__WST_ZERO;
                return;
            }
            if (r != IOCP__INLINE) {
                iocp__ms_fail(p, op, -r);
                return;
            }
            op->state |= IOCP__WST_FRESH;   /* more came meanwhile */
            drained = 0;
            continue;
        }
        size = avail == 0 ? IOCP__MS_FIRST_LEN : (size_t)avail;
        if (size > cap)
            size = cap;
        buf = iocp__ms_buf_take(p, op, size, &err);
        if (!buf) {
            if (err)
                iocp__ms_end(p, op, err, 0);
            else
                iocp__starve(p, op);     /* release_buffer resumes it */
            return;
        }
        op->state &= ~IOCP__WST_FRESH;
        memset(&op->ov, 0, sizeof(op->ov));
        if (WSARecv(op->sock, &op->wsabuf, 1, &bytes, &flags, &op->ov, NULL) == 0) {
            if (!se->skip) {
                op->state |= IOCP__WST_DATA;   /* its packet will come */
                return;
            }
        } else {
            err = WSAGetLastError();
            if (err == WSA_IO_PENDING) {
                op->state |= IOCP__WST_DATA;
                return;
            }
            iocp__ms_fail(p, op, err);
            return;
        }
        if (bytes == 0) {
            iocp__ms_end(p, op, 0, 0);          /* end of stream (drops buf) */
            return;
        }
        iocp__ms_buf_deliver(p, op, bytes);
        /* Less than asked for: the socket was drained, go straight to the
         * zero-byte wait (it completes at once if more came). */
        drained = bytes < size;
    }
}

/* A multishot recv's step finished in the kernel.  Returns 2 when the
 * pump must go on, 0 when the op ended.  Lock held. */
static int iocp__ms_recv_done(iocp_port *p, iocp_op *op, DWORD bytes, int err)
{
    if (op->state & IOCP__WST_ZERO) {
        op->state &= ~IOCP__WST_ZERO;
        if (err) {
            iocp__ms_fail(p, op, err);
            return 0;
        }
        op->state |= IOCP__WST_FRESH;
        return 2;
    }
    op->state &= ~IOCP__WST_DATA;
    if (err) {
        iocp__ms_fail(p, op, err);
        return 0;
    }
    if (bytes == 0) {
        iocp__ms_end(p, op, 0, 0);
        return 0;
    }
    iocp__ms_buf_deliver(p, op, bytes);
    return 2;
}

/* AFD events to ask for, for IOCP_POLL_* `want` (errors always). */
static ULONG iocp__afd_events(unsigned want)
{
    ULONG ev = IOCP__AFD_ABORT | IOCP__AFD_CONNECT_FAIL | IOCP__AFD_LOCAL_CLOSE;

    if (want & IOCP_POLL_IN)
        ev |= IOCP__AFD_RECEIVE | IOCP__AFD_ACCEPT | IOCP__AFD_DISCONNECT;
    if (want & IOCP_POLL_OUT)
        ev |= IOCP__AFD_SEND;
    return ev;
}

/* AFD events seen -> IOCP_POLL_* (what poll(2) reports for the same
 * state: a peer's FIN makes the socket readable, a reset is an error and
 * a hang-up; ERR and HUP count whatever was asked). */
static unsigned iocp__afd_mask(ULONG ev, unsigned want)
{
    unsigned m = 0;

    if (ev & (IOCP__AFD_RECEIVE | IOCP__AFD_ACCEPT | IOCP__AFD_DISCONNECT))
        m |= IOCP_POLL_IN;
    if (ev & IOCP__AFD_SEND)
        m |= IOCP_POLL_OUT;
    if (ev & IOCP__AFD_ABORT)
        m |= IOCP_POLL_ERR | IOCP_POLL_HUP;
    if (ev & IOCP__AFD_CONNECT_FAIL)
        m |= IOCP_POLL_ERR;
    return m & (want | IOCP_POLL_ERR | IOCP_POLL_HUP);
}

/* Can `s` be polled through AFD?  Only if it is its own base handle (no
 * layered provider in between): the IOCTL goes to the socket itself, so
 * its packet comes to our port through the socket's association. */
static int iocp__afd_usable(const struct iocp__win *w, SOCKET s)
{
    SOCKET base = INVALID_SOCKET;
    DWORD n = 0;

    if (!w->nt_ioctl || w->afd_broken)
        return 0;
    if (WSAIoctl(s, SIO_BASE_HANDLE, NULL, 0, &base, sizeof(base), &n, NULL, NULL) != 0)
        return 0;
    return base == s;
}

/*
 * Starts a poll op's wait: an AFD poll (IOCTL_AFD_POLL on the socket,
 * with the op's OVERLAPPED as the APC context and its Internal fields as
 * the IO_STATUS_BLOCK, so the packet is the op like any other), or the
 * fallback: a zero-byte WSASend when OUT is wanted (it completes when the
 * socket takes data, which is at once unless the connection is not up),
 * else a zero-byte WSARecv (completes when data or end of stream is
 * there).  Returns like iocp__issue.  Lock held.
 */
static int iocp__issue_poll(iocp_port *p, iocp_op *op, struct iocp__sockent *se)
{
    struct iocp__win *w = p->be;
    unsigned want = (unsigned)op->len;
    DWORD bytes = 0, flags = 0;
    int r, err;

    memset(&op->ov, 0, sizeof(op->ov));
    op->state &= ~IOCP__WST_AFD;
    if (se->afd == 0)
        se->afd = iocp__afd_usable(w, op->sock) ? 1 : 2;
    if (se->afd == 1 && !w->afd_broken) {
        struct iocp__afd_poll_info *info = op->backend_data;
        LONG st;

        info->timeout.QuadPart = INT64_MAX;
        info->nhandles = 1;
        info->exclusive = 0;
        info->h[0].handle = (HANDLE)op->sock;
        info->h[0].events = iocp__afd_events(want);
        info->h[0].status = 0;
        st = w->nt_ioctl((HANDLE)op->sock, NULL, NULL, &op->ov, &op->ov,
                         IOCP__IOCTL_AFD_POLL, info, sizeof(*info), info, sizeof(*info));
        if (st == IOCP__STATUS_PENDING) {
            op->state |= IOCP__WST_AFD;
            return IOCP__PENDING;
        }
        if (st >= 0) {
            op->state |= IOCP__WST_AFD;
            return se->skip ? IOCP__INLINE : IOCP__PENDING;
        }
        err = (int)w->nt_to_dos(st);
        if (err != ERROR_INVALID_FUNCTION && err != ERROR_NOT_SUPPORTED &&
            err != ERROR_INVALID_PARAMETER && err != ERROR_CALL_NOT_IMPLEMENTED)
            return -iocp__wsa_error((DWORD)err);
        /* This Windows (or Wine) has no AFD poll: the fallback from now on. */
        w->afd_broken = 1;
        memset(&op->ov, 0, sizeof(op->ov));
    }
    {
        /* A zero-byte call cannot wait on a listener (Windows refuses it
         * with WSAENOTCONN; Wine leaves it pending forever): say so. */
        BOOL listening = FALSE;
        int llen = sizeof(listening);
        if (getsockopt(op->sock, SOL_SOCKET, SO_ACCEPTCONN, (char *)&listening, &llen) == 0 &&
            listening)
            return -WSAENOTCONN;
    }
    op->wsabuf.buf = iocp__no_bytes;
    op->wsabuf.len = 0;
    if (want & IOCP_POLL_OUT)
        r = WSASend(op->sock, &op->wsabuf, 1, &bytes, 0, &op->ov, NULL);
    else
        r = WSARecv(op->sock, &op->wsabuf, 1, &bytes, &flags, &op->ov, NULL);
    if (r == 0)
        return se->skip ? IOCP__INLINE : IOCP__PENDING;
    err = WSAGetLastError();
    return err == WSA_IO_PENDING ? IOCP__PENDING : -err;
}

/*
 * A poll op's wait finished (err 0: its result is in the op).  One-shot:
 * deliver the events and end.  Multishot: deliver with MORE and park; the
 * next poll() arms it again before it waits.  Not at once: the AFD poll
 * is level triggered, and armed before the caller has seen this
 * completion it would find the socket still ready and report it again,
 * spuriously, after the caller drained it.  Armed at the next poll() --
 * after the batch was dispatched -- a drained socket waits quietly and
 * one still ready is reported once per poll().  ERR or HUP ends a
 * multishot poll (the connection is gone, nothing new can be reported).
 * Lock held; returns 0.
 */
static int iocp__poll_done(iocp_port *p, iocp_op *op, int err)
{
    unsigned want = (unsigned)op->len, mask;

    if (err) {
        if ((op->state & IOCP__WST_AFD) || err == ERROR_OPERATION_ABORTED ||
            err == ERROR_HANDLES_CLOSED || err == WSAENOTSOCK || err == WSAENOTCONN ||
            err == WSAEINVAL || err == WSAEOPNOTSUPP || (op->state & IOCP__WST_CANCEL)) {
            /* Cancelled or closed, or a socket the fallback cannot poll (a
             * listener, one not connected yet): an error, not events. */
            iocp__ms_fail(p, op, err);
        } else {
            /* The fallback's zero-byte call failed: the connection broke. */
            iocp__ms_end(p, op, IOCP_POLL_ERR | IOCP_POLL_HUP, 0);
        }
        return 0;
    }
    if (op->state & IOCP__WST_AFD) {
        const struct iocp__afd_poll_info *info = op->backend_data;
        ULONG ev = info->nhandles > 0 ? info->h[0].events : 0;

        if (ev & IOCP__AFD_LOCAL_CLOSE) {
            iocp__ms_end(p, op, IOCP_ECANCELED, IOCP_CF_CANCELLED);
            return 0;
        }
        mask = iocp__afd_mask(ev, want);
    } else {
        mask = (want & IOCP_POLL_OUT) ? IOCP_POLL_OUT : IOCP_POLL_IN;
    }
    if (mask == 0) {
        /* Nothing asked for happened (cannot normally be): wait again,
         * from the next poll() so this never spins here. */
        iocp__park(p, op);
        return 0;
    }
    if (!(op->flags & IOCP_OPF_MULTISHOT) || (mask & (IOCP_POLL_ERR | IOCP_POLL_HUP))) {
        iocp__ms_end(p, op, (int64_t)mask, 0);
        return 0;
    }
    iocp__deliver(p, op, (int64_t)mask, 0, IOCP_CF_MORE, NULL, 0);
    iocp__park(p, op);
    return 0;
}

/* Runs a parked poll op: arms its wait again.  Lock held. */
static void iocp__poll_pump(iocp_port *p, iocp_op *op)
{
    struct iocp__sockent *se = iocp__sock_find(p->be, op->sock, 0);
    int r;

    if (!iocp__room(p)) {
        iocp__park(p, op);
        return;
    }
    if ((op->state & IOCP__WST_CANCEL) || !se || !se->registered) {
        iocp__ms_end(p, op, IOCP_ECANCELED, IOCP_CF_CANCELLED);
        return;
    }
    r = iocp__issue_poll(p, op, se);
    if (r == IOCP__PENDING)
        return;
    iocp__poll_done(p, op, r == IOCP__INLINE ? 0 : -r);
}

static void iocp__pump(iocp_port *p, iocp_op *op)
{
    if (op->kind == IOCP_OP_POLL)
        iocp__poll_pump(p, op);
    else
        iocp__ms_recv_pump(p, op);
}

/* Runs the ops parked on the ready list (in order; those the batch has no
 * room for are parked again, still in order).  Lock held, inside poll(). */
static void iocp__run_ready(iocp_port *p)
{
    struct iocp__win *w = p->be;
    iocp_op *op = w->ready_head, *next;

    w->ready_head = w->ready_tail = NULL;
    w->nready = 0;
    for (; op; op = next) {
        next = op->fd_next;
        op->fd_next = NULL;
        op->state &= ~IOCP__WST_PARKED;
        iocp__pump(p, op);
    }
}

/*
 * A step of `op` ended with (bytes, err): deliver, or return 1 if the op
 * must be issued again (rest of a partial send, next multishot accept, an
 * accept whose connection died in the backlog), 2 if a multishot recv
 * must read on (iocp__pump).  Lock held.
 */
static int iocp__finish(iocp_port *p, iocp_op *op, DWORD bytes, int err)
{
    int cancel_req = (op->state & IOCP__WST_CANCEL) != 0;
    int cancelled;

    if (err == ERROR_HANDLES_CLOSED)
        err = ERROR_OPERATION_ABORTED;     /* Wine's word for "closed" */
    cancelled = err == ERROR_OPERATION_ABORTED || (err != 0 && cancel_req);
    if (op->kind == IOCP_OP_POLL)
        return iocp__poll_done(p, op, err);
    if (op->kind == IOCP_OP_RECV && (op->flags & IOCP_OPF_MULTISHOT))
        return iocp__ms_recv_done(p, op, bytes, err);

    switch (op->kind) {
    case IOCP_OP_ACCEPT:
        if (err == 0) {
            SOCKET a = op->aux_sock;
            struct sockaddr *local = NULL, *remote = NULL;
            int llen = 0, rlen = 0;
            struct iocp__ext *x;
            WSAPROTOCOL_INFOW info;
            int ilen = sizeof(info), e2 = 0;

            /* Without it the accepted socket knows no addresses and
             * shutdown() fails. */
            if (setsockopt(a, SOL_SOCKET, SO_UPDATE_ACCEPT_CONTEXT,
                           (char *)&op->sock, sizeof(op->sock)) != 0) {
                err = WSAGetLastError();
                iocp__close_aux(op);
                goto accept_failed;
            }
            if (getsockopt(op->sock, SOL_SOCKET, SO_PROTOCOL_INFOW, (char *)&info, &ilen) == 0 &&
                (x = iocp__ext_get(p->be, op->sock, info.iAddressFamily, &e2)) != NULL) {
                x->getsockaddrs(op->accept_addrs, 0, IOCP_ACCEPT_ADDR_SPACE,
                                IOCP_ACCEPT_ADDR_SPACE, &local, &llen, &remote, &rlen);
            }
            if (remote && rlen > 0 && (size_t)rlen <= sizeof(op->addr)) {
                memcpy(&op->addr, remote, (size_t)rlen);
                op->addrlen = rlen;
            } else {
                int sl = sizeof(op->addr);
                if (getpeername(a, (struct sockaddr *)&op->addr, &sl) == 0)
                    op->addrlen = sl;
                else
                    op->addrlen = 0;
            }
            op->aux_sock = INVALID_SOCKET;  /* the caller's now */
            if (op->flags & IOCP_OPF_MULTISHOT) {
                iocp__deliver(p, op, (int64_t)a, 0, IOCP_CF_MORE, NULL, 0);
                if (!cancel_req)
                    return 1;
                iocp__deliver(p, op, IOCP_ECANCELED, 0, IOCP_CF_CANCELLED, NULL, 0);
                return 0;
            }
            iocp__deliver(p, op, (int64_t)a, 0, 0, NULL, 0);
            return 0;
        }
        iocp__close_aux(op);
    accept_failed:
        if (cancelled) {
            iocp__deliver(p, op, IOCP_ECANCELED, 0, IOCP_CF_CANCELLED, NULL, 0);
            return 0;
        }
        /* A connection reset while in the backlog is not the listener's
         * error (epoll's ECONNABORTED): accept the next one. */
        if (err == WSAECONNRESET || err == WSAECONNABORTED)
            return 1;
        iocp__deliver(p, op, -(int64_t)err, 0, 0, NULL, 0);
        return 0;

    case IOCP_OP_CONNECT:
        if (err == 0 &&
            setsockopt(op->sock, SOL_SOCKET, SO_UPDATE_CONNECT_CONTEXT, NULL, 0) != 0)
            err = WSAGetLastError();
        if (err == 0)
            iocp__deliver(p, op, 0, 0, 0, NULL, 0);
        else if (cancelled)
            iocp__deliver(p, op, IOCP_ECANCELED, 0, IOCP_CF_CANCELLED, NULL, 0);
        else
            iocp__deliver(p, op, -(int64_t)err, 0, 0, NULL, 0);
        return 0;

    case IOCP_OP_RECV:
        if (err == 0 && bytes > 0) {
            char *buf = op->backend_data;
            op->backend_data = NULL;
            iocp__deliver(p, op, (int64_t)bytes, 0, IOCP_CF_BUFFER, buf, 0);
            return 0;
        }
        iocp__drop_buffer(p, op);
        /* fall through */
    case IOCP_OP_RECV_INTO:
        if (err == 0)
            iocp__deliver(p, op, (int64_t)bytes, 0, 0, NULL, 0);
        else if (cancelled)
            iocp__deliver(p, op, IOCP_ECANCELED, 0, IOCP_CF_CANCELLED, NULL, 0);
        else
            iocp__deliver(p, op, -(int64_t)err, 0, 0, NULL, 0);
        return 0;

    case IOCP_OP_SEND:
        op->done += bytes;
        if (op->iovcnt > 0) {
            int nseg;
            iocp__iov_advance(op, bytes, &nseg);
        }
        if (err == 0) {
            if (op->done < op->len && bytes > 0 && !cancel_req)
                return 1;
            if (op->done < op->len && cancel_req)
                iocp__deliver(p, op, (int64_t)op->done, IOCP_ECANCELED, IOCP_CF_CANCELLED,
                              NULL, 0);
            else if (op->done == op->len && (op->flags & IOCP_OPF_SILENT))
                /* All of it went: the caller releases the record and tells
                 * nobody.  Inline on a skip-mode socket this is no packet
                 * at all, just this queue entry. */
                iocp__deliver(p, op, (int64_t)op->done, 0, IOCP_CF_SILENT, NULL, 0);
            else
                iocp__deliver(p, op, (int64_t)op->done, 0, 0, NULL, 0);
        } else if (cancelled) {
            if (op->done > 0)
                iocp__deliver(p, op, (int64_t)op->done, IOCP_ECANCELED, IOCP_CF_CANCELLED,
                              NULL, 0);
            else
                iocp__deliver(p, op, IOCP_ECANCELED, 0, IOCP_CF_CANCELLED, NULL, 0);
        } else if (op->done > 0) {
            iocp__deliver(p, op, (int64_t)op->done, -(int64_t)err, 0, NULL, 0);
        } else {
            iocp__deliver(p, op, -(int64_t)err, 0, 0, NULL, 0);
        }
        return 0;

    case IOCP_OP_POST:
        iocp__deliver(p, op, (int64_t)op->len, 0, 0, NULL, 0);
        return 0;

    default:
        iocp__deliver(p, op, IOCP_EINVAL, 0, 0, NULL, 0);
        return 0;
    }
}

/*
 * Drives op from a finished step until it is pending in the kernel again
 * or finally delivered.  Inline completions loop here instead of waiting
 * for a packet that will never come.  Lock held.
 */
static void iocp__advance(iocp_port *p, iocp_op *op, DWORD bytes, int err)
{
    struct iocp__win *w = p->be;
    struct iocp__sockent *se;
    int r;

    while ((r = iocp__finish(p, op, bytes, err)) != 0) {
        if (r == 2) {
            iocp__pump(p, op);
            return;
        }
        se = iocp__sock_find(w, op->sock, 0);
        if (!se || !se->registered) {
            /* Unregistered between steps: stop as cancelled. */
            op->state |= IOCP__WST_CANCEL;
            bytes = 0;
            err = ERROR_OPERATION_ABORTED;
            continue;
        }
        r = op->kind == IOCP_OP_POLL ? iocp__issue_poll(p, op, se)
                                     : iocp__issue(p, op, se, &bytes);
        if (r == IOCP__PENDING) {
            if (op->kind == IOCP_OP_ACCEPT)
                w->repoll = 1;
            return;
        }
        err = r == IOCP__INLINE ? 0 : -r;
    }
}

/* ---- backend interface ------------------------------------------------ */

static int iocp__win_probe(char *features, size_t len)
{
    HANDLE h = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 0);

    if (!h)
        return -(int)GetLastError();
    CloseHandle(h);
    if (features && len)
        snprintf(features, len, "skip-completion-on-success acceptex connectex "
                                "batched-dequeue multishot-recv-emulated afd-poll "
                                "silent-send");
    return 0;
}

static int iocp__win_init(iocp_port *p, const iocp_port_options *opts)
{
    struct iocp__win *w;
    WSADATA wd;
    int r;

    /* Reference-counted; Python's socket module has called it already,
     * a C program may not have. */
    r = WSAStartup(MAKEWORD(2, 2), &wd);
    if (r != 0)
        return -r;
    w = calloc(1, sizeof(*w));
    if (!w) {
        WSACleanup();
        return IOCP_ENOMEM;
    }
    /* Concurrency 0: the core limits dispatching threads itself, and only
     * one thread at a time waits in the kernel. */
    w->port = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 0);
    if (!w->port) {
        r = -(int)GetLastError();
        free(w);
        WSACleanup();
        return r;
    }
    {
        /* The test knob (see the note at the top).  GetEnvironmentVariable,
         * not getenv: the C runtime this is linked with may not be the one
         * whose environment the caller (CPython: the UCRT) changed. */
        char v[16];
        DWORD n = GetEnvironmentVariableA("IOCP_WIN_TEST_NON_IFS", v, sizeof(v));
        if (n > 0 && n < sizeof(v))
            w->test_non_ifs = (unsigned)strtoul(v, NULL, 10);
        n = GetEnvironmentVariableA("IOCP_WIN_TEST_POLL_FALLBACK", v, sizeof(v));
        if (n > 0 && n < sizeof(v))
            w->test_poll_fallback = strtoul(v, NULL, 10) != 0;
    }
    {
        /* The AFD poll's entry points (see the note at the top).  The
         * cast through a plain function type is how a FARPROC becomes a
         * typed pointer without -Wcast-function-type. */
        HMODULE nt = GetModuleHandleW(L"ntdll.dll");
        if (nt) {
            w->nt_ioctl = (iocp__nt_ioctl_fn)(void (*)(void))GetProcAddress(
                nt, "NtDeviceIoControlFile");
            w->nt_to_dos = (iocp__nt_to_dos_fn)(void (*)(void))GetProcAddress(
                nt, "RtlNtStatusToDosError");
        }
        if (!w->nt_to_dos)
            w->nt_ioctl = NULL;
    }
    w->ms_max = opts && opts->recv_pool_max ? opts->recv_pool_max : IOCP__MS_POOL_MAX;
    p->be = w;
    return 0;
}

static void iocp__win_destroy(iocp_port *p)
{
    struct iocp__win *w = p->be;
    int i;

    CloseHandle(w->port);
    for (i = 0; i < IOCP__SOCK_BUCKETS; i++) {
        while (w->buckets[i]) {
            struct iocp__sockent *e = w->buckets[i];
            w->buckets[i] = e->next;
            free(e);
        }
    }
    free(w);
    p->be = NULL;
    WSACleanup();
}

/*
 * May `sock` skip the port on inline success?  Only if its provider's
 * handles are IFS handles: a non-IFS layered provider can post a packet
 * for an inline success whatever the mode says (it may even accept the
 * mode), and we would then complete the op twice.  When in doubt (the
 * protocol info cannot be read), no.
 */
static int iocp__skip_allowed(struct iocp__win *w, SOCKET sock)
{
    WSAPROTOCOL_INFOW info;
    int ilen = sizeof(info);
    unsigned n = w->nregistered++;

    if (w->test_non_ifs > 0 && n % w->test_non_ifs == 0)
        return 0;
    if (getsockopt(sock, SOL_SOCKET, SO_PROTOCOL_INFOW, (char *)&info, &ilen) != 0)
        return 0;
    return (info.dwServiceFlags1 & XP1_IFS_HANDLES) != 0;
}

static int iocp__win_register(iocp_port *p, iocp_socket_t sock)
{
    struct iocp__win *w = p->be;
    struct iocp__sockent *se = iocp__sock_find(w, sock, 0);
    iocp_op *op;

    if (!CreateIoCompletionPort((HANDLE)sock, w->port, IOCP__KEY_OP, 0)) {
        DWORD err = GetLastError();
        /* ERROR_INVALID_PARAMETER: this open handle is associated already.
         * A handle cannot leave a port, so after unregister the same open
         * socket comes back this way; that is fine when the association
         * is ours (we know the handle), and a double register otherwise. */
        if (!(se && err == ERROR_INVALID_PARAMETER))
            return -(int)err;
        if (se->registered)
            return IOCP_EEXIST;
        se->registered = 1;
        return 0;
    }
    if (se && se->registered) {
        /* Associated just now, yet the value is marked registered: the
         * socket we knew under it was closed without unregister and this
         * is a new one.  The old one's ops were aborted by the close (their
         * packets are on the way); make sure none is issued again.  One
         * with nothing in the kernel (parked, starved) would wait for no
         * packet: the ready list ends it. */
        for (op = p->inflight_head.next; op != &p->inflight_head; op = op->next) {
            if (op->kind != IOCP_OP_POST && op->sock == sock) {
                op->state |= IOCP__WST_CANCEL;
                if (op->state & IOCP__WST_STARVED)
                    iocp__unstarve(p, op);
                if (op->state & IOCP__WST_PARKED)
                    p->kick = 1;
            }
        }
    }
    if (!se) {
        se = iocp__sock_find(w, sock, 1);
        if (!se)
            return IOCP_ENOMEM;   /* associated anyway; harmless */
    }
    se->registered = 1;
    se->ms_recv = NULL;        /* a closed predecessor's op is not ours */
    se->ms_large = 0;
    se->ms_small = 0;
    se->afd = w->test_poll_fallback ? 2 : 0;
    se->skip = iocp__skip_allowed(w, sock) &&
               SetFileCompletionNotificationModes(
                   (HANDLE)sock,
                   FILE_SKIP_COMPLETION_PORT_ON_SUCCESS | FILE_SKIP_SET_EVENT_ON_HANDLE) != 0;
    return 0;
}

/*
 * Tests only (tests/native/driver.c): 1 if `sock`'s inline successes skip
 * the port, 0 if they wait for their packet, IOCP_ENOENT if unregistered.
 */
int iocp__win_test_skips(iocp_port *p, iocp_socket_t sock);
int iocp__win_test_skips(iocp_port *p, iocp_socket_t sock)
{
    struct iocp__sockent *se;
    int r;

    iocp__lock(p);
    se = iocp__sock_find(p->be, sock, 0);
    r = se && se->registered ? se->skip : IOCP_ENOENT;
    iocp__unlock(p);
    return r;
}

/*
 * Tests only (tests/native/win_fastpath.c): how `sock`'s poll ops run --
 * 1 the AFD poll, 2 the zero-byte fallback, 0 not decided yet (no poll op
 * so far), IOCP_ENOENT if unregistered.
 */
int iocp__win_test_afd(iocp_port *p, iocp_socket_t sock);
int iocp__win_test_afd(iocp_port *p, iocp_socket_t sock)
{
    struct iocp__sockent *se;
    int r;

    iocp__lock(p);
    se = iocp__sock_find(p->be, sock, 0);
    r = se && se->registered ? (se->afd == 1 && ((struct iocp__win *)p->be)->afd_broken ? 2
                                                                                : se->afd)
                             : IOCP_ENOENT;
    iocp__unlock(p);
    return r;
}

static int iocp__win_cancel(iocp_port *p, iocp_op *op);

static int iocp__win_unregister(iocp_port *p, iocp_socket_t sock)
{
    struct iocp__win *w = p->be;
    struct iocp__sockent *se = iocp__sock_find(w, sock, 0);
    iocp_op *op;

    if (!se || !se->registered)
        return IOCP_ENOENT;
    se->registered = 0;
    /* cancel() never delivers synchronously here (the kernel completes
     * the op later), so the list stays intact while we walk it. */
    for (op = p->inflight_head.next; op != &p->inflight_head; op = op->next)
        if (op->kind != IOCP_OP_POST && op->sock == sock)
            iocp__win_cancel(p, op);
    se->ms_recv = NULL;   /* its op ends cancelled; the socket is not ours now */
    return 0;
}

static int iocp__win_submit(iocp_port *p, iocp_op *op)
{
    struct iocp__win *w = p->be;
    struct iocp__sockent *se;
    DWORD bytes = 0;
    int r;

    op->state = 0;
    op->aux_sock = INVALID_SOCKET;
    op->backend_data = NULL;
    if (op->kind == IOCP_OP_POST) {
        memset(&op->ov, 0, sizeof(op->ov));
        if (!PostQueuedCompletionStatus(w->port, (DWORD)op->len, IOCP__KEY_OP, &op->ov))
            return -(int)GetLastError();
        return 0;
    }
    se = iocp__sock_find(w, op->sock, 0);
    if (!se || !se->registered)
        return IOCP_EBADF;
    if ((op->flags & IOCP_OPF_MULTISHOT) && op->kind != IOCP_OP_ACCEPT &&
        op->kind != IOCP_OP_RECV && op->kind != IOCP_OP_POLL)
        return IOCP_EINVAL;
    if (op->kind == IOCP_OP_RECV || op->kind == IOCP_OP_RECV_INTO) {
        /* A multishot recv owns the socket's incoming bytes. */
        if (se->ms_recv)
            return IOCP_EBUSY;
        if (op->flags & IOCP_OPF_MULTISHOT) {
            se->ms_recv = op;
            r = iocp__issue_zero_recv(op, se);
            if (r == IOCP__PENDING) {
                op->state |= IOCP__WST_ZERO;
            } else if (r == IOCP__INLINE) {
                /* Data is there; it is read (and delivered) by poll(),
                 * which knows how much room its batch has. */
                op->state |= IOCP__WST_FRESH;
                iocp__park(p, op);
            } else {
                iocp__ms_fail(p, op, -r);
            }
            return 0;
        }
    }
    if (op->kind == IOCP_OP_POLL) {
        if (op->len & ~(size_t)(IOCP_POLL_IN | IOCP_POLL_OUT | IOCP_POLL_ERR | IOCP_POLL_HUP))
            return IOCP_EINVAL;
        op->backend_data = calloc(1, sizeof(struct iocp__afd_poll_info));
        if (!op->backend_data)
            return IOCP_ENOMEM;
        r = iocp__issue_poll(p, op, se);
        if (r == IOCP__PENDING)
            return 0;
        iocp__advance(p, op, 0, r == IOCP__INLINE ? 0 : -r);
        return 0;
    }
    r = iocp__issue(p, op, se, &bytes);
    if (r == IOCP__PENDING)
        return 0;
    iocp__advance(p, op, bytes, r == IOCP__INLINE ? 0 : -r);
    return 0;
}

static int iocp__win_cancel(iocp_port *p, iocp_op *op)
{
    (void)p;
    if (op->kind == IOCP_OP_POST)
        return IOCP_ENOENT;   /* already queued; it arrives shortly */
    op->state |= IOCP__WST_CANCEL;
    if (op->state & IOCP__WST_STARVED)
        iocp__unstarve(p, op);   /* to the ready list: poll() ends it */
    if (op->state & IOCP__WST_PARKED) {
        /* Nothing in the kernel: the next poll() ends it (cancelled). */
        p->kick = 1;
        return 0;
    }
    if (!CancelIoEx((HANDLE)op->sock, &op->ov)) {
        DWORD err = GetLastError();
        /* ERROR_NOT_FOUND: the op finished and its packet is on the way;
         * the flag stops a partial send or multishot accept there.
         * ERROR_INVALID_HANDLE: the socket is closed, which aborted the
         * op already. */
        if (err != ERROR_NOT_FOUND && err != ERROR_INVALID_HANDLE)
            return -(int)err;
    }
    return 0;
}

static int iocp__win_poll(iocp_port *p, int max, int timeout_ms)
{
    struct iocp__win *w = p->be;
    OVERLAPPED_ENTRY ents[IOCP__WIN_BATCH];
    ULONG n = 0, i, batch;
    unsigned base;
    int delivered = 0;

    if (max < 1)
        max = 1;
    if (w->nready) {
        /* Parked work first: re-arming multishot polls and reading on
         * before the wait lets the wait sleep if all of it went back to
         * the kernel.  Only what was parked when this pass began runs
         * (iocp__run_ready detaches the list), so a socket that stays
         * ready is served once per poll(). */
        iocp__lock(p);
        base = p->qlen + p->ovflen;
        w->limit = (int64_t)base + max;
        iocp__run_ready(p);
        w->limit = 0;
        delivered = (int)(p->qlen + p->ovflen - base);
        iocp__unlock(p);
        if (delivered > 0 || w->nready)
            timeout_ms = 0;
        if (delivered >= max)
            return delivered;
    }
    /* A multishot accept issued again for the next connection of a burst
     * finds it waiting in the backlog: Windows may complete the AcceptEx
     * inline (handled in iocp__advance), Wine 8 always says pending but
     * has queued the packet already (measured: a GQCSEx with a zero
     * timeout right after the call returns it), and a non-IFS socket
     * queues it whatever happened.  Looking again, without waiting, while
     * room is left takes a burst in one poll() instead of one connection
     * per call.  Bounded: every round took packets and re-issued an
     * accept, and each round delivers at least one completion. */
    for (;;) {
        int round_delivered;

        batch = (ULONG)(max - delivered) > IOCP__WIN_BATCH ? IOCP__WIN_BATCH
                                                          : (ULONG)(max - delivered);
        if (!GetQueuedCompletionStatusEx(w->port, ents, batch, &n,
                                         timeout_ms < 0 ? INFINITE : (DWORD)timeout_ms,
                                         FALSE)) {
            DWORD err = GetLastError();
            if (err != WAIT_TIMEOUT)
                return delivered > 0 ? delivered : -(int)err;
            return delivered;
        }
        iocp__lock(p);
        w->repoll = 0;
        base = p->qlen + p->ovflen;
        for (i = 0; i < n; i++) {
            iocp_op *op;
            DWORD bytes;
            int err;

            if (ents[i].lpCompletionKey == IOCP__KEY_WAKE || !ents[i].lpOverlapped)
                continue;   /* a wake-up, possibly meant for another waiter */
            op = (iocp_op *)ents[i].lpOverlapped;
            if (op->kind == IOCP_OP_POST) {
                iocp__deliver(p, op, (int64_t)op->len, 0, 0, NULL, 0);
                continue;
            }
            /* Every packet left in the batch may deliver one completion: a
             * multishot recv reading on from this one keeps room for them. */
            w->limit = (int64_t)base + (max - delivered) - (int64_t)(n - i - 1);
            err = iocp__ov_error(op, &bytes);
            iocp__advance(p, op, bytes, err);
        }
        w->limit = 0;
        round_delivered = (int)(p->qlen + p->ovflen - base);
        delivered += round_delivered;
        if (!w->repoll || round_delivered <= 0 || delivered >= max) {
            w->repoll = 0;
            iocp__unlock(p);
            return delivered;
        }
        w->repoll = 0;
        iocp__unlock(p);
        timeout_ms = 0;
    }
}

static int iocp__win_wake(iocp_port *p)
{
    struct iocp__win *w = p->be;

    if (!PostQueuedCompletionStatus(w->port, 0, IOCP__KEY_WAKE, NULL))
        return -(int)GetLastError();
    return 0;
}

const iocp_backend iocp__backend_iocp = {
    .name = "iocp",
    .probe = iocp__win_probe,
    .init = iocp__win_init,
    .destroy = iocp__win_destroy,
    .register_socket = iocp__win_register,
    .unregister_socket = iocp__win_unregister,
    .submit = iocp__win_submit,
    .cancel = iocp__win_cancel,
    .poll = iocp__win_poll,
    .wake = iocp__win_wake,
    .release_buffer = iocp__win_release_buffer,  /* multishot recv buffers */
};
