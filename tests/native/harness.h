/*
 * harness.h -- what the native C tests share: the failure message and
 * CHECK, a monotonic clock, opening a port, waiting for completions within
 * a bound, loopback listeners, op records, and the leak check.  Included
 * by driver.c (every backend) and win_fastpath.c (the Windows backend).
 *
 * Header-only on purpose: each test program is one translation unit plus
 * the library sources, so run.sh and tests/wine/run.sh compile no extra
 * file.  The helpers are static inline so that a program which does not
 * use one of them is not warned about it (the builds use -Werror).
 */
#ifndef IOCP_TESTS_HARNESS_H
#define IOCP_TESTS_HARNESS_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iocp_native.h"

#ifdef _WIN32
#  define CLOSESOCK(s) closesocket(s)
static inline long long now_ms(void) { return (long long)GetTickCount64(); }
#else
#  include <arpa/inet.h>
#  include <netinet/in.h>
#  include <time.h>
#  include <unistd.h>
#  define CLOSESOCK(s) close(s)
static inline long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
#endif

#define WAIT_MS 20000   /* per expected completion; Wine is slow */

/* The backend port_open asks for (the runner sets it). */
static const char *g_backend;
/* Why the current test failed: set by CHECK, printed by the runner. */
static char g_why[512];

/* Formats into a copy first, so g_why itself may be an argument (a test
 * passing on a helper's message: CHECK(helper() == 0, "%s", g_why)). */
static inline void fail_at(int line, const char *fmt, ...)
{
    char tmp[sizeof(g_why)];
    va_list ap;
    int n = snprintf(tmp, sizeof(tmp), "line %d: ", line);
    va_start(ap, fmt);
    vsnprintf(tmp + n, sizeof(tmp) - (size_t)n, fmt, ap);
    va_end(ap);
    memcpy(g_why, tmp, sizeof(tmp));
}

/* In a function returning int: on failure record why and return 1. */
#define CHECK(cond, ...)                    \
    do {                                    \
        if (!(cond)) {                      \
            fail_at(__LINE__, __VA_ARGS__); \
            return 1;                       \
        }                                   \
    } while (0)

static inline int port_open(iocp_port **port, unsigned qcap)
{
    iocp_port_options o;
    memset(&o, 0, sizeof(o));
    o.backend = g_backend;
    o.queue_capacity = qcap;
    return iocp_port_create(&o, port);
}

/*
 * iocp_port_wait, retried on IOCP_EINTR within the same deadline.  EINTR
 * is a legitimate answer (a signal, or -- seen with io_uring -- task work
 * left by another ring interrupting this thread's next blocking call), and
 * every caller of the API must be ready for it.
 */
static inline int wait_(iocp_port *port, iocp_completion *out, int max, int timeout_ms)
{
    long long deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    for (;;) {
        int n = iocp_port_wait(port, out, max, timeout_ms);
        if (n != IOCP_EINTR)
            return n;
        if (timeout_ms > 0) {
            long long left = deadline - now_ms();
            timeout_ms = left > 0 ? (int)left : 0;
        }
    }
}

/* Collects up to `want` completions, waiting at most timeout_ms in all;
 * returns how many (or a negative error). */
static inline int collect(iocp_port *port, iocp_completion *out, int want, int timeout_ms)
{
    long long deadline = now_ms() + timeout_ms;
    int got = 0;

    while (got < want) {
        long long left = deadline - now_ms();
        int n;
        if (left <= 0)
            break;
        n = wait_(port, out + got, want - got, (int)left);
        if (n < 0 && n != IOCP_EINTR)
            return n;
        if (n > 0) {
            got += n;
            iocp_port_dispatch_done(port);
        }
    }
    return got;
}

static inline iocp_socket_t tcp_socket(void)
{
    return socket(AF_INET, SOCK_STREAM, IPPROTO_TCP);
}

/* A listening socket on 127.0.0.1, any port; fills its address. */
static inline iocp_socket_t make_listener(struct sockaddr_in *addr)
{
    iocp_socket_t s = tcp_socket();
    iocp_socklen_t len = sizeof(*addr);

    if (s == IOCP_INVALID_SOCKET)
        return s;
    memset(addr, 0, sizeof(*addr));
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)addr, sizeof(*addr)) != 0 || listen(s, 1024) != 0 ||
        getsockname(s, (struct sockaddr *)addr, &len) != 0) {
        CLOSESOCK(s);
        return IOCP_INVALID_SOCKET;
    }
    return s;
}

/* A fresh op record of `kind` on s over buf/len (no flags). */
static inline iocp_op *op_new(iocp_port *port, int kind, iocp_socket_t s, char *buf,
                              size_t len)
{
    iocp_op *op = iocp_op_alloc(port);
    if (!op)
        return NULL;
    op->kind = kind;
    op->sock = s;
    op->buf = buf;
    op->len = len;
    return op;
}

/* Nothing left behind: no op in flight, no record or buffer alive. */
static inline int check_clean(iocp_port *port)
{
    iocp_port_stats st;
    iocp_port_get_stats(port, &st);
    CHECK(st.inflight == 0, "inflight=%lld", (long long)st.inflight);
    CHECK(st.live_ops == 0, "live_ops=%lld", (long long)st.live_ops);
    CHECK(st.live_buffers == 0, "live_buffers=%lld", (long long)st.live_buffers);
    CHECK(st.queued == 0, "queued=%lld", (long long)st.queued);
    return 0;
}

#endif /* IOCP_TESTS_HARNESS_H */
