/*
 * sock.h -- what both Linux backends (epoll.c, uring.c) do the same way
 * with a socket: the per-descriptor table, preparing a socket at register,
 * telling how a non-blocking connect ended, and the result an op reports
 * when it stops early (error or cancel) after a partial send.
 *
 * Internal to src/native/linux; never included by Cython.
 */
#ifndef IOCP_LINUX_SOCK_H
#define IOCP_LINUX_SOCK_H

#include "../iocp_internal.h"

/*
 * Per-descriptor tables: an array of `elem`-byte entries indexed by fd,
 * grown on register (iocp__table_grow: powers of two, zeroed, overflow
 * safe) and looked up everywhere else.
 *
 * iocp__sock_table_at: the entry of `fd`, or NULL when the table does not
 * cover it (fd < 0 or past the end: such a descriptor was never
 * registered).
 */
static inline void *iocp__sock_table_at(void *table, int len, int fd, size_t elem)
{
    if (fd < 0 || fd >= len)
        return NULL;
    return (char *)table + (size_t)fd * elem;
}

/*
 * Makes the table cover `fd` and stores its entry in *entry.  Returns 0,
 * IOCP_EBADF (fd < 0) or IOCP_ENOMEM (the table stays as it was).
 */
static inline int iocp__sock_table_reserve(void **table, int *len, int fd, size_t elem,
                                           void **entry)
{
    int r = iocp__table_grow(table, len, fd, elem);

    if (r < 0)
        return r;
    *entry = (char *)*table + (size_t)fd * elem;
    return 0;
}

/*
 * The outcome of an op stopped early by `err` (a negative error, e.g.
 * IOCP_ECANCELED): a send that already moved bytes reports them as its
 * result with the error beside them (as WSASend does), any other op
 * reports the error as its result.
 */
static inline void iocp__sock_stop_result(const iocp_op *op, int err, int64_t *result,
                                          int64_t *error)
{
    if (op->kind == IOCP_OP_SEND && op->done > 0) {
        *result = (int64_t)op->done;
        *error = err;
    } else {
        *result = err;
        *error = 0;
    }
}

/* Delivers the op's final, cancelled completion (lock held). */
static inline void iocp__sock_deliver_cancelled(iocp_port *p, iocp_op *op)
{
    int64_t result, error;

    iocp__sock_stop_result(op, IOCP_ECANCELED, &result, &error);
    iocp__deliver(p, op, result, error, IOCP_CF_CANCELLED, NULL, 0);
}

/*
 * Prepares a socket for a port at register: checks that the descriptor is
 * open (a made-up fileno is -EBADF) and makes it non-blocking, which the
 * epoll emulation needs and callers of either backend may rely on.
 * Returns 0 or -errno.
 */
int iocp__sock_prepare(iocp_socket_t sock);

/*
 * After a non-blocking connect() reported writability: 0 if the handshake
 * succeeded, 1 if it is still going on (a spurious or early edge: wait
 * for the next one), or the negative error it ended with.  Reads
 * SO_ERROR, and confirms a 0 there with getpeername(), since writability
 * can be reported before the handshake has ended.
 */
int iocp__sock_connect_status(iocp_socket_t sock);

/*
 * 1 if `sock` is a TCP stream socket, 0 otherwise (or if it cannot tell).
 * On TCP a recv that returned fewer bytes than asked drained the receive
 * queue (at least up to an urgent mark), so the next arrival raises a
 * fresh edge; datagram, unix and other sockets make no such promise.
 */
int iocp__sock_is_tcp(iocp_socket_t sock);

#endif /* IOCP_LINUX_SOCK_H */
