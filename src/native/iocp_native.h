/*
 * iocp_native.h -- the only header the Cython layer sees.
 *
 * The model is the Windows I/O completion port.  A port owns a set of
 * registered sockets; the caller posts operations (accept, connect, recv,
 * send, user posts), each described by an iocp_op record taken from the
 * port's pool; the backend (IOCP, io_uring or the epoll emulation) performs
 * them and turns every outcome into an iocp_completion.  Completions travel
 * through a bounded queue to whoever calls iocp_port_wait().
 *
 * Ownership rule: from iocp_submit() until the completion that carries the
 * op without IOCP_CF_MORE has been handed out by iocp_port_wait(), the op
 * record and any buffer it points to belong to the backend (and the kernel).
 * Only after that may the caller free the record (iocp_op_free) and unpin
 * the buffer.
 *
 * Every function returns >= 0 on success or a negative error code:
 * -errno on POSIX, -(Win32/WSA error) on Windows.  Nothing sets errno for
 * the caller.
 */
#ifndef IOCP_NATIVE_H
#define IOCP_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  include <winsock2.h>
#  include <ws2tcpip.h>
#  include <windows.h>
typedef SOCKET iocp_socket_t;
typedef int iocp_socklen_t;
#  define IOCP_INVALID_SOCKET ((iocp_socket_t)INVALID_SOCKET)
#  define IOCP_ECANCELED   (-(int)ERROR_OPERATION_ABORTED)
#  define IOCP_ETIMEDOUT   (-(int)WAIT_TIMEOUT)
#  define IOCP_EINTR       (-(int)WSAEINTR)
#  define IOCP_EBADF       (-(int)WSAEBADF)
#  define IOCP_EINVAL      (-(int)WSAEINVAL)
#  define IOCP_ENOMEM      (-(int)ERROR_NOT_ENOUGH_MEMORY)
#  define IOCP_ENOENT      (-(int)ERROR_NOT_FOUND)
#  define IOCP_EEXIST      (-(int)ERROR_ALREADY_EXISTS)
#  define IOCP_ESHUTDOWN   (-(int)WSAESHUTDOWN)
#  define IOCP_ENOSYS      (-(int)ERROR_NOT_SUPPORTED)
#  define IOCP_EBUSY       (-(int)ERROR_BUSY)
#else
#  include <errno.h>
#  include <sys/socket.h>
typedef int iocp_socket_t;
typedef socklen_t iocp_socklen_t;
#  define IOCP_INVALID_SOCKET (-1)
#  define IOCP_ECANCELED   (-ECANCELED)
#  define IOCP_ETIMEDOUT   (-ETIMEDOUT)
#  define IOCP_EINTR       (-EINTR)
#  define IOCP_EBADF       (-EBADF)
#  define IOCP_EINVAL      (-EINVAL)
#  define IOCP_ENOMEM      (-ENOMEM)
#  define IOCP_ENOENT      (-ENOENT)
#  define IOCP_EEXIST      (-EEXIST)
#  define IOCP_ESHUTDOWN   (-ESHUTDOWN)
#  define IOCP_ENOSYS      (-ENOSYS)
#  define IOCP_EBUSY       (-EBUSY)
#endif

/*
 * The port was created by another process (this one is a fork() child of
 * it) and refuses to work here.  Outside every errno and Win32 range (bit
 * 29 is the Win32 "customer" bit).
 */
#define IOCP_EFORKED (-0x20000001)

/*
 * A single-issuer port (iocp_port_options.single_issuer) was used from a
 * thread other than its owner (the first thread that used it).  Only
 * iocp_port_wake (and so stop/post in the Cython layer), the stats and
 * destroy-after-drain may be called from another thread.
 */
#define IOCP_EWRONGTHREAD (-0x20000002)

#ifdef __cplusplus
extern "C" {
#endif

/* Operation kinds. */
enum iocp_op_kind {
    IOCP_OP_NONE = 0,
    IOCP_OP_ACCEPT = 1,     /* result: accepted socket; addr: peer address   */
    IOCP_OP_CONNECT = 2,    /* result: 0; addr: target (set by the caller)   */
    IOCP_OP_RECV = 3,       /* port-owned buffer chosen when data arrives;
                               result: bytes; completion.data: the buffer    */
    IOCP_OP_RECV_INTO = 4,  /* caller's pinned buffer; result: bytes         */
    IOCP_OP_SEND = 5,       /* caller's pinned buffer, or iovcnt > 0 pinned
                               segments (gathered, WSASend/sendmsg); completes
                               when all `len` bytes are sent or an error stops
                               it; result: bytes sent, error in
                               completion.error if any                       */
    IOCP_OP_POST = 6,       /* user packet; result: the nbytes given         */
    IOCP_OP_POLL = 7        /* readiness of a registered socket: `len` holds
                               the IOCP_POLL_* events wanted; result: the
                               IOCP_POLL_* events seen (ERR/HUP always count) */
};

/*
 * Op flags set by the caller before iocp_submit().
 *
 * IOCP_OPF_MULTISHOT
 *   accept: keep accepting until cancelled.
 *   recv:   one armed op completes once per arrival, each completion with
 *           IOCP_CF_MORE | IOCP_CF_BUFFER (`result` bytes in a port buffer;
 *           `len` caps the bytes per completion, 0 = the backend's default).
 *           The final completion (no MORE) is EOF (result 0), an error or a
 *           cancel.  Buffers come from a pool that grows with load up to a
 *           bound; an armed recv on an idle socket pins no buffer.  Running
 *           out of buffers never reaches the caller (the backend waits for
 *           buffers and re-arms).  While it is armed, other recv/recv_into
 *           on that socket are refused with IOCP_EBUSY.
 *   poll:   a completion (with MORE) when armed if the socket is ready, then
 *           one per readiness event the kernel reports (edge semantics: a
 *           reader that does not drain the socket may not hear again until
 *           more data comes).  Without the flag a poll is one-shot and level
 *           triggered: it completes at once if the socket is ready.
 * IOCP_OPF_SILENT
 *   send (plain or gathered): a success is handed out flagged IOCP_CF_SILENT
 *   so the caller releases the record and tells nobody; a failure, short
 *   send or cancel completes as usual.  Per-socket order still holds.  On
 *   io_uring consecutive silent sends of a socket may go out as one linked
 *   chain whose members skip their CQE (IOSQE_CQE_SKIP_SUCCESS); on epoll
 *   and IOCP an inline success posts no packet.
 */
#define IOCP_OPF_MULTISHOT 0x1u
#define IOCP_OPF_SILENT    0x2u

/* Completion flags. */
#define IOCP_CF_MORE      0x1u  /* multishot: the op stays in flight        */
#define IOCP_CF_CANCELLED 0x2u  /* the op was cancelled (result is error)   */
#define IOCP_CF_BUFFER    0x4u  /* data is a port buffer: iocp_buffer_release */
#define IOCP_CF_SILENT    0x8u  /* a silent op's success: release, tell no one */

/* Poll events (the values of POSIX POLLIN, POLLOUT, POLLERR, POLLHUP). */
#define IOCP_POLL_IN  0x1u
#define IOCP_POLL_OUT 0x4u
#define IOCP_POLL_ERR 0x8u
#define IOCP_POLL_HUP 0x10u

/* One segment of a gathered send.  Same layout as POSIX struct iovec. */
typedef struct iocp_iovec {
    void *base;
    size_t len;
} iocp_iovec;

/* Most segments one gathered send takes (POSIX IOV_MAX). */
#define IOCP_IOV_MAX 1024

/* Space AcceptEx needs for the two addresses it writes. */
#define IOCP_ACCEPT_ADDR_SPACE (sizeof(struct sockaddr_storage) + 16)

/*
 * The overlapped record.  On Windows it begins with the OVERLAPPED so the
 * pointer GetQueuedCompletionStatusEx returns is the record itself (the
 * MYOV pattern).  Fields below "backend private" belong to the backend
 * while the op is in flight.
 */
typedef struct iocp_op {
#ifdef _WIN32
    OVERLAPPED ov;                    /* must stay first */
#endif
    /* Set by the caller. */
    int kind;                         /* enum iocp_op_kind */
    unsigned flags;                   /* IOCP_OPF_* */
    iocp_socket_t sock;               /* the socket it operates on */
    char *buf;                        /* RECV_INTO / SEND: pinned buffer */
    size_t len;                       /* buffer length / RECV size / POST nbytes;
                                         gathered SEND: total of the segments */
    iocp_iovec *iov;                  /* gathered SEND: segments, or NULL.  The
                                         array is scratch the backend may
                                         advance in place past sent bytes. */
    int iovcnt;
    void *user;                       /* opaque to C: the Python Operation */

    /* Backend private. */
    size_t done;                      /* bytes already moved (partial send) */
    iocp_socket_t aux_sock;           /* Windows: socket made for AcceptEx */
    struct iocp_op *next, *prev;      /* in-flight list / backend queues */
    struct iocp_op *fd_next;          /* backend per-socket queue */
    struct iocp_op *fifo_next;        /* io_uring: per-socket FIFO (fd_next
                                         links its SQ backlogs) */
    void *backend_data;               /* e.g. Windows recv buffer */
    int state;                        /* backend state machine */
    int inflight;                     /* 1 from submit until final completion */
    unsigned char short_record;       /* from iocp_op_alloc_short (pool.c) */
#ifdef _WIN32
    WSABUF wsabuf;
#endif

    /* The tail: not in a short record (iocp_op_alloc_short), which only
     * RECV, RECV_INTO, POLL and POST ops may use -- no backend touches
     * these fields for them.  An idle connection's armed recv is a short
     * record: 120 bytes instead of 312 on Linux. */
    struct sockaddr_storage addr;     /* CONNECT target; ACCEPT peer (set by
                                         the caller / the backend) */
    iocp_socklen_t addrlen;
#ifdef _WIN32
    char accept_addrs[2 * IOCP_ACCEPT_ADDR_SPACE];
#else
    struct msghdr msg;                /* io_uring SENDMSG: read at submission */
#endif
} iocp_op;

/* Bytes of a short record (the fields before the tail). */
#define IOCP_OP_SHORT_SIZE offsetof(iocp_op, addr)

/* One completion, as handed to the caller of iocp_port_wait(). */
typedef struct iocp_completion {
    iocp_op *op;        /* the record (final completion: caller frees it) */
    int64_t result;     /* >= 0: bytes, socket or nbytes; < 0: error      */
    int64_t error;      /* SEND only: error that stopped a partial send   */
    unsigned flags;     /* IOCP_CF_* */
    char *data;         /* RECV: port buffer holding `result` bytes        */
    uint32_t buf_id;    /* backend buffer id, passed back on release       */
} iocp_completion;

typedef struct iocp_port iocp_port;

/*
 * Largest bounded-queue capacity a port accepts (iocp_port_create returns
 * IOCP_EINVAL above it): the queue is indexed with unsigned ints and
 * reaped with an int count, and 16 M records (about 640 MiB) is far past
 * any useful batch depth.
 */
#define IOCP_QUEUE_CAPACITY_MAX (1u << 24)

typedef struct iocp_port_options {
    const char *backend;     /* "epoll", "io_uring", "iocp" or NULL (best)   */
    unsigned queue_capacity; /* bounded completion queue; 0 = default 1024   */
    unsigned concurrency;    /* dispatching threads at once; 0 = CPU count   */
    unsigned ring_entries;   /* io_uring SQ size; 0 = default                */
    /*
     * 1: only one thread (the first that submits or waits) ever uses the
     * port -- an event loop.  No mutex on that path; io_uring sets up with
     * SINGLE_ISSUER | DEFER_TASKRUN (COOP_TASKRUN where DEFER is missing)
     * and a registered ring fd where the kernel has them.  Any other thread
     * gets IOCP_EWRONGTHREAD, except from iocp_port_wake and
     * iocp_port_get_stats, which stay thread-safe.
     */
    int single_issuer;
    /*
     * 1: every op is started by a thread that also waits on the port (one
     * loop thread; a server whose other threads only start ops and sleep).
     * io_uring then sets up with COOP_TASKRUN | TASKRUN_FLAG: a completion
     * the kernel finishes in task work never interrupts its submitter with
     * an IPI; the submitter runs it when it next enters the kernel or
     * sleeps, so a submitter spinning in user code delays it by up to a
     * scheduler tick.  Implied by single_issuer; epoll and IOCP ignore it.
     */
    int cooperative;
    /* Most port-owned receive buffers a multishot recv pool may grow to,
     * in bytes; 0 = the default (64 MiB). */
    size_t recv_pool_max;
} iocp_port_options;

/* Port life cycle. */
int iocp_port_create(const iocp_port_options *opts, iocp_port **out);
/* Frees the port; every op must have completed (see iocp_port_inflight).
 * In a fork() child: frees only the child's copy (never touches the
 * kernel objects it shares with the parent), whatever is in flight. */
void iocp_port_destroy(iocp_port *port);
const char *iocp_port_backend(const iocp_port *port);
/*
 * fork(): 1 if this process is not the one that created the port (a child
 * of fork()).  Such a port refuses every operation with IOCP_EFORKED; only
 * iocp_port_forked, iocp_port_owner_pid, iocp_port_get_stats and
 * iocp_port_destroy may be called (no lock, no syscall on shared objects).
 */
int iocp_port_forked(const iocp_port *port);
int64_t iocp_port_owner_pid(const iocp_port *port);

/* Sockets. */
int iocp_register(iocp_port *port, iocp_socket_t sock);
/* Cancels the socket's pending ops; their completions still arrive. */
int iocp_unregister(iocp_port *port, iocp_socket_t sock);

/* Op records: pooled, so steady-state submission allocates nothing. */
iocp_op *iocp_op_alloc(iocp_port *port);
/* A short record: no addr, addrlen, msg or accept_addrs (see iocp_op),
 * for RECV, RECV_INTO, POLL and POST ops only.  Freed by iocp_op_free. */
iocp_op *iocp_op_alloc_short(iocp_port *port);
void iocp_op_free(iocp_port *port, iocp_op *op);

/* Starts an op (the caller filled kind, sock, buf, len, addr, user). */
int iocp_submit(iocp_port *port, iocp_op *op);
/*
 * Asks for an op to stop.  Returns 0 if the request was made (the op then
 * completes, cancelled or -- if it raced -- with its real result) or
 * IOCP_ENOENT if the op is not in flight.
 */
int iocp_cancel(iocp_port *port, iocp_op *op);
/* Cancels every op in flight (used by close). Returns how many. */
int iocp_cancel_all(iocp_port *port);

/*
 * Takes up to `max` completions.  timeout_ms < 0 waits forever, 0 polls.
 * Returns the number taken (0 on timeout), IOCP_EINTR when a signal
 * interrupted the wait, or another negative error.  Must be called without
 * any lock the callers' callbacks need (Cython: without the GIL).
 * A successful call with n > 0 counts the caller as a dispatching thread
 * until it calls iocp_port_dispatch_done().
 */
int iocp_port_wait(iocp_port *port, iocp_completion *out, int max, int timeout_ms);
/*
 * The same, but returns 0 at once if iocp_port_wake() was called since the
 * caller read `since` from iocp_port_wake_gen().  A loop reads the
 * generation once when it starts, so a wake that lands between two waits
 * (the caller not yet inside the second) is not lost.
 */
int iocp_port_wait_since(iocp_port *port, iocp_completion *out, int max,
                         int timeout_ms, unsigned since);
unsigned iocp_port_wake_gen(iocp_port *port);
void iocp_port_dispatch_done(iocp_port *port);
/*
 * One event-loop turn: ends the caller's previous dispatch, if it has one
 * (what iocp_port_dispatch_done does, folded in so the submissions held
 * back during that batch go out with the same kernel entry that waits),
 * then waits once as iocp_port_wait_since does.  No posted packet and no
 * stop() are needed to return: it returns after one batch or the timeout.
 */
int iocp_port_run_once(iocp_port *port, iocp_completion *out, int max,
                       int timeout_ms, unsigned since);
/*
 * Frees what the final completions of a converted batch still hold (op
 * records; port buffers of completions flagged IOCP_CF_BUFFER whose data
 * the caller has copied out) with one lock acquisition.  Entries whose op
 * is NULL are skipped (the caller already released them).
 */
void iocp_port_release_batch(iocp_port *port, iocp_completion *batch, int n);
/* Wakes every thread blocked in iocp_port_wait (which returns 0). */
int iocp_port_wake(iocp_port *port);
/*
 * Starts closing: wakes every waiter, and from now on waits ignore the
 * concurrency cap, so a close() called from inside a callback (which holds
 * a dispatch slot) can still drain.
 */
void iocp_port_begin_close(iocp_port *port);

/* Returns a RECV completion's buffer to the port. */
void iocp_buffer_release(iocp_port *port, char *data, uint32_t buf_id);

/* Introspection. */
typedef struct iocp_port_stats {
    int64_t live_ops;        /* op records allocated and not freed */
    int64_t inflight;        /* ops submitted and not finally completed */
    int64_t live_buffers;    /* port buffers handed out and not released */
    int64_t queued;          /* completions in the bounded queue */
    int64_t queue_capacity;
    int64_t queue_peak;      /* highest queue length seen */
    int64_t completions;     /* completions handed out so far */
} iocp_port_stats;
void iocp_port_get_stats(iocp_port *port, iocp_port_stats *st);

/*
 * Backends compiled into this build, with their feature words, e.g.
 * "io_uring: multishot-accept provided-buffers".  probe() returns 0 when the
 * backend can run here, else a negative error.
 */
int iocp_backend_count(void);
const char *iocp_backend_name(int i);
int iocp_backend_probe(int i, char *features, size_t features_len);

/*
 * Addresses (addr.c).  iocp_sockaddr_inet takes a numeric host only.
 * iocp_sockaddr_parse returns the family (0 for an AF_INET/AF_INET6
 * address shorter than its structure); for AF_UNIX it copies the path
 * into host and stores its length in *port.  It never reads more than
 * sizeof(struct sockaddr_storage), whatever `len` says.
 */
int iocp_sockaddr_inet(int family, const char *host, int port, uint32_t flowinfo,
                       uint32_t scope_id, struct sockaddr_storage *out,
                       iocp_socklen_t *outlen);
int iocp_sockaddr_unix(const char *path, size_t len, struct sockaddr_storage *out,
                       iocp_socklen_t *outlen);
int iocp_sockaddr_parse(const struct sockaddr_storage *ss, iocp_socklen_t len,
                        char *host, size_t hostlen, int *port, uint32_t *flowinfo,
                        uint32_t *scope_id);
/* The peer's address (getpeername) into *out, its length in *outlen. */
int iocp_socket_peer(iocp_socket_t sock, struct sockaddr_storage *out,
                     iocp_socklen_t *outlen);
/*
 * Closes a socket the caller owns (an accepted one nobody will use).  Plain
 * C, so the Cython layer can call it where nothing may raise.
 */
int iocp_socket_close(iocp_socket_t sock);
/* Text for a negative error code (used on Windows; POSIX has strerror). */
void iocp_error_message(int code, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif /* IOCP_NATIVE_H */
