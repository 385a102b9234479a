# Declarations of src/native/iocp_native.h: the only native header the
# Cython layer sees.  Fields not listed here exist but are backend-private.
from libc.stdint cimport int64_t, uint32_t

cdef extern from "iocp_native.h" nogil:
    ctypedef long long iocp_socket_t
    ctypedef int iocp_socklen_t
    cdef struct sockaddr_storage:
        unsigned short ss_family

    int IOCP_ECANCELED
    int IOCP_ETIMEDOUT
    int IOCP_EINTR
    int IOCP_EBADF
    int IOCP_EINVAL
    int IOCP_ENOENT
    int IOCP_EEXIST
    int IOCP_EFORKED
    int IOCP_EWRONGTHREAD
    int IOCP_EBUSY
    int IOCP_ENOSYS

    enum:
        IOCP_OP_NONE
        IOCP_OP_ACCEPT
        IOCP_OP_CONNECT
        IOCP_OP_RECV
        IOCP_OP_RECV_INTO
        IOCP_OP_SEND
        IOCP_OP_POST
        IOCP_OP_POLL

    unsigned IOCP_OPF_MULTISHOT
    unsigned IOCP_OPF_SILENT
    unsigned IOCP_CF_MORE
    unsigned IOCP_CF_CANCELLED
    unsigned IOCP_CF_BUFFER
    unsigned IOCP_CF_SILENT
    unsigned IOCP_POLL_IN
    unsigned IOCP_POLL_OUT
    unsigned IOCP_POLL_ERR
    unsigned IOCP_POLL_HUP

    ctypedef struct iocp_iovec:
        void *base
        size_t len

    int IOCP_IOV_MAX
    unsigned IOCP_QUEUE_CAPACITY_MAX

    ctypedef struct iocp_op:
        int kind
        unsigned flags
        iocp_socket_t sock
        char *buf
        size_t len
        iocp_iovec *iov
        int iovcnt
        void *user
        sockaddr_storage addr
        iocp_socklen_t addrlen

    ctypedef struct iocp_completion:
        iocp_op *op
        int64_t result
        int64_t error
        unsigned flags
        char *data
        uint32_t buf_id

    ctypedef struct iocp_port:
        pass

    ctypedef struct iocp_port_options:
        const char *backend
        unsigned queue_capacity
        unsigned concurrency
        unsigned ring_entries
        int single_issuer
        int cooperative
        size_t recv_pool_max

    ctypedef struct iocp_port_stats:
        int64_t live_ops
        int64_t inflight
        int64_t live_buffers
        int64_t queued
        int64_t queue_capacity
        int64_t queue_peak
        int64_t completions

    int iocp_port_create(const iocp_port_options *opts, iocp_port **out)
    void iocp_port_destroy(iocp_port *port)
    const char *iocp_port_backend(const iocp_port *port)
    int iocp_port_forked(const iocp_port *port)
    int64_t iocp_port_owner_pid(const iocp_port *port)
    int iocp_register(iocp_port *port, iocp_socket_t sock)
    int iocp_unregister(iocp_port *port, iocp_socket_t sock)
    iocp_op *iocp_op_alloc(iocp_port *port)
    iocp_op *iocp_op_alloc_short(iocp_port *port)
    void iocp_op_free(iocp_port *port, iocp_op *op)
    int iocp_submit(iocp_port *port, iocp_op *op)
    int iocp_cancel(iocp_port *port, iocp_op *op)
    int iocp_cancel_all(iocp_port *port)
    int iocp_port_wait(iocp_port *port, iocp_completion *out, int max, int timeout_ms)
    int iocp_port_wait_since(iocp_port *port, iocp_completion *out, int max,
                             int timeout_ms, unsigned since)
    unsigned iocp_port_wake_gen(iocp_port *port)
    void iocp_port_dispatch_done(iocp_port *port)
    int iocp_port_run_once(iocp_port *port, iocp_completion *out, int max,
                           int timeout_ms, unsigned since)
    void iocp_port_release_batch(iocp_port *port, iocp_completion *batch, int n)
    int iocp_port_wake(iocp_port *port)
    void iocp_port_begin_close(iocp_port *port)
    void iocp_buffer_release(iocp_port *port, char *data, uint32_t buf_id)
    void iocp_port_get_stats(iocp_port *port, iocp_port_stats *st)
    int iocp_backend_count()
    const char *iocp_backend_name(int i)
    int iocp_backend_probe(int i, char *features, size_t features_len)

    int iocp_sockaddr_inet(int family, const char *host, int port, uint32_t flowinfo,
                           uint32_t scope_id, sockaddr_storage *out,
                           iocp_socklen_t *outlen)
    int iocp_sockaddr_unix(const char *path, size_t len, sockaddr_storage *out,
                           iocp_socklen_t *outlen)
    int iocp_sockaddr_parse(const sockaddr_storage *ss, iocp_socklen_t len,
                            char *host, size_t hostlen, int *port, uint32_t *flowinfo,
                            uint32_t *scope_id)
    int iocp_socket_peer(iocp_socket_t sock, sockaddr_storage *out, iocp_socklen_t *outlen)
    int iocp_socket_close(iocp_socket_t sock)
    void iocp_error_message(int code, char *buf, size_t len)
