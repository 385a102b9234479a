/*
 * benchtools.c -- iocp._benchtools: the native side of `iocp bench`.
 *
 *   run_load(host, port, connections, size, inflight=1, warmup=1.0,
 *            duration=5.0, *, threads=1, active=-1, connect_timeout=10.0,
 *            drain_timeout=2.0, seed=0, server_pid=0, work_us=0.0) -> dict
 *       A closed-loop echo load generator.  Every connection keeps
 *       `inflight` messages of `size` bytes outstanding; each byte echoed
 *       back is checked against a per-connection pseudo-random stream, so a
 *       server that drops, reorders, duplicates or corrupts bytes is caught.
 *       After `warmup` seconds a measured window of `duration` seconds
 *       counts completed messages and records each message's round trip in
 *       a log-linear histogram.  Then no new messages are queued and the
 *       generator waits up to `drain_timeout` for every outstanding echo;
 *       what never comes back is a "short" echo.
 *       With server_pid > 0 the first worker samples that process's CPU
 *       time (the sum over its threads of /proc/PID/task/TID/schedstat, in
 *       ns; /proc/PID/stat ticks where schedstat is missing) when the
 *       measured window opens and when it closes, and counts the messages
 *       between the two samples, so CPU per message covers exactly the
 *       measured window -- no connection setup, warm-up or drain.  It also
 *       counts its own syscalls and epoll batches in the window.
 *
 *   echo_server(host="127.0.0.1", port=0, *, fd=-1, backlog=4096,
 *               max_seconds=0.0) -> dict
 *       A plain single-threaded epoll echo server: the ceiling the Python
 *       servers are compared with.  Runs until a signal handler raises
 *       (SIGINT/SIGTERM) or max_seconds pass.
 *
 * Plain CPython C API, Linux only (epoll), no Cython: it ships compiled in
 * the wheel, so benchmarks need no compiler.  The GIL is released while
 * sockets are driven; the calling thread wakes every 50 ms to check for
 * signals.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* time                                                                */

static inline uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void
sleep_ms(int ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* ------------------------------------------------------------------ */
/* payload pattern: byte at stream offset o of connection c is byte
 * (o % 8) of splitmix64(seed_c + o / 8).                               */

static inline uint64_t
splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline unsigned char
pattern_byte(uint64_t seed, uint64_t off)
{
    return (unsigned char)(splitmix64(seed + (off >> 3)) >> ((off & 7u) * 8u));
}

static inline void
store_word(unsigned char *p, uint64_t w)
{
    int i;
    for (i = 0; i < 8; i++)
        p[i] = (unsigned char)(w >> (8 * i));
}

static void
fill_pattern(uint64_t seed, uint64_t off, unsigned char *buf, size_t len)
{
    size_t i = 0;
    while (i < len && ((off + i) & 7u) != 0) {
        buf[i] = pattern_byte(seed, off + i);
        i++;
    }
    while (len - i >= 8) {
        store_word(buf + i, splitmix64(seed + ((off + i) >> 3)));
        i += 8;
    }
    while (i < len) {
        buf[i] = pattern_byte(seed, off + i);
        i++;
    }
}

/* Returns 1 when buf matches the pattern at stream offset off. */
static int
check_pattern(uint64_t seed, uint64_t off, const unsigned char *buf, size_t len)
{
    unsigned char w[8];
    size_t i = 0;
    while (i < len && ((off + i) & 7u) != 0) {
        if (buf[i] != pattern_byte(seed, off + i))
            return 0;
        i++;
    }
    while (len - i >= 8) {
        store_word(w, splitmix64(seed + ((off + i) >> 3)));
        if (memcmp(w, buf + i, 8) != 0)
            return 0;
        i += 8;
    }
    while (i < len) {
        if (buf[i] != pattern_byte(seed, off + i))
            return 0;
        i++;
    }
    return 1;
}

/* ------------------------------------------------------------------ */
/* latency histogram: exact below 128 ns, then 64 sub-buckets per power
 * of two (<= 1.6 % error), up to 2^40 ns (~18 min).                    */

#define H_EXACT 128
#define H_SUB 64
#define H_MAXBIT 40
#define H_BUCKETS (H_EXACT + (H_MAXBIT - 7) * H_SUB)

typedef struct {
    uint64_t counts[H_BUCKETS];
    uint64_t n;
    uint64_t max;
    double sum;
} hist_t;

static inline int
hist_index(uint64_t v)
{
    int msb, shift, idx;
    if (v < H_EXACT)
        return (int)v;
    msb = 63 - __builtin_clzll(v);
    if (msb >= H_MAXBIT)
        return H_BUCKETS - 1;
    shift = msb - 6;
    idx = H_EXACT + (msb - 7) * H_SUB + (int)((v >> shift) - H_SUB);
    return idx;
}

/* Midpoint of a bucket's value range. */
static double
hist_value(int idx)
{
    int msb, shift;
    uint64_t lo;
    if (idx < H_EXACT)
        return (double)idx;
    msb = 7 + (idx - H_EXACT) / H_SUB;
    shift = msb - 6;
    lo = ((uint64_t)(H_SUB + (idx - H_EXACT) % H_SUB)) << shift;
    return (double)lo + (double)((1ull << shift) - 1) / 2.0;
}

static inline void
hist_add(hist_t *h, uint64_t v)
{
    h->counts[hist_index(v)]++;
    h->n++;
    h->sum += (double)v;
    if (v > h->max)
        h->max = v;
}

static void
hist_merge(hist_t *dst, const hist_t *src)
{
    int i;
    for (i = 0; i < H_BUCKETS; i++)
        dst->counts[i] += src->counts[i];
    dst->n += src->n;
    dst->sum += src->sum;
    if (src->max > dst->max)
        dst->max = src->max;
}

static double
hist_quantile(const hist_t *h, double q)
{
    uint64_t rank, seen = 0;
    int i;
    if (h->n == 0)
        return 0.0;
    rank = (uint64_t)(q * (double)h->n);
    if (rank >= h->n)
        rank = h->n - 1;
    for (i = 0; i < H_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen > rank) {
            double v = hist_value(i);
            return v > (double)h->max ? (double)h->max : v;
        }
    }
    return (double)h->max;
}

/* ------------------------------------------------------------------ */
/* another process's CPU time                                          */

/* Reads a small /proc file into buf (NUL-terminated); length or -1. */
static ssize_t
read_small(const char *path, char *buf, size_t cap)
{
    ssize_t n, got = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    while ((size_t)got < cap - 1) {
        n = read(fd, buf + got, cap - 1 - (size_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += n;
    }
    close(fd);
    buf[got] = '\0';
    return got;
}

/*
 * CPU ns used so far by every live thread of pid, and how many times they
 * were scheduled in (schedstat's third field: ~ wake-ups + preemptions).
 * schedstat is nanosecond-exact; where the kernel lacks it, utime + stime
 * of /proc/PID/stat (clock ticks) stand in and *runs is 0.
 * Returns 1 (schedstat), 2 (stat) or 0 (pid gone).
 */
static int
proc_cpu_ns(int pid, uint64_t *ns, uint64_t *runs)
{
    char path[64], buf[512];
    DIR *d;
    struct dirent *e;
    int found = 0;
    *ns = 0;
    *runs = 0;
    snprintf(path, sizeof(path), "/proc/%d/task", pid);
    d = opendir(path);
    if (d != NULL) {
        while ((e = readdir(d)) != NULL) {
            unsigned long long run = 0, wait = 0, slices = 0;
            if (e->d_name[0] < '0' || e->d_name[0] > '9')
                continue;
            snprintf(path, sizeof(path), "/proc/%d/task/%.16s/schedstat", pid, e->d_name);
            if (read_small(path, buf, sizeof(buf)) <= 0 ||
                sscanf(buf, "%llu %llu %llu", &run, &wait, &slices) != 3)
                continue;
            *ns += run;
            *runs += slices;
            found = 1;
        }
        closedir(d);
    }
    if (found && *ns > 0)
        return 1;
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    if (read_small(path, buf, sizeof(buf)) > 0) {
        /* Fields after the ")" of the command name: utime is the 12th. */
        char *p = strrchr(buf, ')');
        unsigned long long ut = 0, st = 0;
        long tck = sysconf(_SC_CLK_TCK);
        int i;
        if (p == NULL || tck <= 0)
            return 0;
        p += 2;
        for (i = 0; i < 11 && p; i++) {
            p = strchr(p, ' ');
            if (p)
                p++;
        }
        if (p == NULL || sscanf(p, "%llu %llu", &ut, &st) != 2)
            return 0;
        *ns = (ut + st) * (1000000000ull / (unsigned long long)tck);
        *runs = 0;
        return 2;
    }
    return 0;
}

static uint64_t
thread_cpu_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* load generator                                                      */

enum { C_IDLE = 0, C_CONNECTING, C_OPEN, C_DEAD };

typedef struct {
    int fd;
    int state;
    int want_out;            /* EPOLLOUT in the interest set */
    uint64_t seed;
    uint64_t budget;         /* messages this connection may queue */
    uint64_t queued;         /* messages queued so far */
    uint64_t done;           /* messages fully echoed */
    uint64_t sent;           /* stream bytes written */
    uint64_t recvd;          /* stream bytes read and verified */
    uint64_t *qtime;         /* [inflight] queue time of outstanding messages */
} lconn_t;

typedef struct {
    volatile int stop;       /* set by the coordinating thread */
    volatile int connected;  /* workers done connecting */
    volatile int finished;   /* workers done */
    volatile uint64_t t0;    /* warm-up start, set once all connected */
} lshared_t;

typedef struct {
    /* configuration */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    size_t size;
    unsigned inflight;
    uint64_t warmup_ns, duration_ns, drain_ns, connect_ns;
    uint64_t work_ns;        /* busy work per echoed message (a heavier client) */
    lconn_t *conns;
    int nconns;
    lshared_t *sh;
    /* scratch */
    unsigned char *rbuf, *wbuf;
    size_t bufsize;
    int ep;
    /* phase */
    int running;             /* 1 while new messages may be queued */
    uint64_t t_measure, t_end;
    /* results */
    hist_t *hist;
    uint64_t msgs_window, msgs_total, msgs_primed, open_conns;
    uint64_t err_connect, err_reset, err_short, err_mismatch, err_closed, err_other;
    double connect_s;
    int setup_errno;
    /* measured-window accounting (see server_pid above) */
    int server_pid;          /* 0: do not sample */
    int cpu_state;           /* 0 before the window, 1 in it, 2 after */
    int cpu_source;          /* 1 schedstat, 2 /proc/PID/stat ticks */
    uint64_t cpu_a, cpu_b;   /* server CPU ns at the two samples */
    uint64_t runs_a, runs_b; /* times the server's threads were scheduled in */
    uint64_t ts_a, ts_b;     /* when the samples were taken */
    uint64_t msgs_a, msgs_b; /* msgs_total at the samples */
    uint64_t self_a, self_b; /* this thread's CPU ns at the samples */
    uint64_t n_wait, n_events, n_recv, n_send;  /* syscalls, counted always */
    uint64_t wait_a, events_a, recv_a, send_a;  /* their values at sample a */
    uint64_t wait_b, events_b, recv_b, send_b;
} lworker_t;

static void
lconn_kill(lworker_t *w, lconn_t *c)
{
    if (c->fd >= 0) {
        epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    c->state = C_DEAD;
}

static void
lconn_error(lworker_t *w, lconn_t *c, int err)
{
    if (err == ECONNRESET || err == EPIPE || err == ECONNABORTED)
        w->err_reset++;
    else
        w->err_other++;
    lconn_kill(w, c);
}

static void
set_out(lworker_t *w, lconn_t *c, int on)
{
    struct epoll_event ev;
    if (c->want_out == on)
        return;
    ev.events = EPOLLIN | (on ? EPOLLOUT : 0);
    ev.data.u64 = (uint64_t)(c - w->conns);
    if (epoll_ctl(w->ep, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = on;
}

/* Writes queued bytes until done or the socket is full. 0 ok, -1 killed. */
static int
lconn_flush(lworker_t *w, lconn_t *c)
{
    uint64_t target = c->queued * w->size;
    while (c->sent < target) {
        size_t n = (size_t)(target - c->sent);
        ssize_t r;
        if (n > w->bufsize)
            n = w->bufsize;
        fill_pattern(c->seed, c->sent, w->wbuf, n);
        r = send(c->fd, w->wbuf, n, MSG_NOSIGNAL);
        w->n_send++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_out(w, c, 1);
                return 0;
            }
            lconn_error(w, c, errno);
            return -1;
        }
        c->sent += (uint64_t)r;
        if ((size_t)r < n) {
            set_out(w, c, 1);
            return 0;
        }
    }
    set_out(w, c, 0);
    return 0;
}

static inline void
lconn_queue(lworker_t *w, lconn_t *c, uint64_t t)
{
    c->qtime[c->queued % w->inflight] = t;
    c->queued++;
}

/* Reads what is there, verifies it, completes messages. */
static void
lconn_readable(lworker_t *w, lconn_t *c)
{
    int rounds;
    for (rounds = 0; rounds < 8; rounds++) {
        ssize_t r = recv(c->fd, w->rbuf, w->bufsize, 0);
        uint64_t t, target;
        w->n_recv++;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            lconn_error(w, c, errno);
            return;
        }
        if (r == 0) {
            /* The server closed: bytes still owed are short echoes, an
             * unprompted close of an idle connection is an error too. */
            if (c->recvd < c->sent || c->queued > c->done)
                w->err_short++;
            else
                w->err_closed++;
            lconn_kill(w, c);
            return;
        }
        if (c->recvd + (uint64_t)r > c->sent ||
            !check_pattern(c->seed, c->recvd, w->rbuf, (size_t)r)) {
            /* More bytes than were sent, or different ones. */
            w->err_mismatch++;
            lconn_kill(w, c);
            return;
        }
        c->recvd += (uint64_t)r;
        t = now_ns();
        while (c->recvd >= (c->done + 1) * w->size) {
            uint64_t q = c->qtime[c->done % w->inflight];
            c->done++;
            w->msgs_total++;
            if (t >= w->t_measure && t < w->t_end) {
                w->msgs_window++;
                hist_add(w->hist, t - q);
            }
            if (w->work_ns) {
                /* Emulates a load generator that spends more per message
                 * (parsing, bookkeeping): spin, then stamp the next send. */
                uint64_t until = t + w->work_ns;
                while ((t = now_ns()) < until) {
                }
            }
            if (w->running && c->queued < c->budget)
                lconn_queue(w, c, t);
        }
        target = c->queued * w->size;
        if (c->sent < target && !c->want_out) {
            if (lconn_flush(w, c) < 0)
                return;
        }
        if ((size_t)r < w->bufsize)
            return;
    }
}

static int
lworker_connect(lworker_t *w)
{
    const int max_pending = 256;
    int next = 0, pending = 0, open = 0, failed = 0;
    uint64_t t_start = now_ns(), deadline = t_start + w->connect_ns;
    struct epoll_event evs[256];

    while (open + failed < w->nconns) {
        int n, i, tmo;
        uint64_t t;
        while (next < w->nconns && pending < max_pending) {
            lconn_t *c = &w->conns[next++];
            int one = 1, fd;
            struct epoll_event ev;
            fd = socket(w->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                w->setup_errno = errno;
                c->state = C_DEAD;
                failed++;
                continue;
            }
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            c->fd = fd;
            if (connect(fd, (struct sockaddr *)&w->addr, w->addrlen) < 0 &&
                errno != EINPROGRESS) {
                lconn_kill(w, c);
                failed++;
                continue;
            }
            ev.events = EPOLLOUT;
            ev.data.u64 = (uint64_t)(c - w->conns);
            if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
                w->setup_errno = errno;
                lconn_kill(w, c);
                failed++;
                continue;
            }
            c->state = C_CONNECTING;
            c->want_out = 1;
            pending++;
        }
        if (pending == 0)
            continue;
        t = now_ns();
        if (t >= deadline || w->sh->stop)
            break;
        tmo = (int)((deadline - t) / 1000000ull) + 1;
        if (tmo > 50)
            tmo = 50;
        n = epoll_wait(w->ep, evs, 256, tmo);
        for (i = 0; i < n; i++) {
            lconn_t *c = &w->conns[evs[i].data.u64];
            int err = 0;
            socklen_t len = sizeof(err);
            if (c->state != C_CONNECTING)
                continue;
            pending--;
            if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
                lconn_kill(w, c);
                failed++;
                continue;
            }
            c->state = C_OPEN;
            set_out(w, c, 0);
            open++;
        }
    }
    /* Whatever did not connect in time failed. */
    {
        int i;
        for (i = 0; i < w->nconns; i++) {
            lconn_t *c = &w->conns[i];
            if (c->state == C_CONNECTING || c->state == C_IDLE) {
                lconn_kill(w, c);
                failed++;
            }
        }
    }
    w->err_connect = (uint64_t)failed;
    w->open_conns = (uint64_t)open;
    w->connect_s = (double)(now_ns() - t_start) / 1e9;
    return open;
}

/*
 * Idle connections (budget 1) echo their one message before the common
 * start, so the server holds every connection when measuring begins and
 * those first round trips (accept backlog included) stay out of the
 * latency histogram.  Bounded by the connect timeout.
 */
static void
lworker_prime(lworker_t *w)
{
    struct epoll_event evs[512];
    uint64_t deadline = now_ns() + w->connect_ns;
    int i, owed = 0;

    w->t_measure = w->t_end = 0;   /* record nothing */
    w->running = 0;
    for (i = 0; i < w->nconns; i++) {
        lconn_t *c = &w->conns[i];
        if (c->state == C_OPEN && c->budget == 1) {
            lconn_queue(w, c, now_ns());
            lconn_flush(w, c);
            owed = 1;
        }
    }
    while (owed && !w->sh->stop && now_ns() < deadline) {
        int n = epoll_wait(w->ep, evs, 512, 5);
        for (i = 0; i < n; i++) {
            lconn_t *c = &w->conns[evs[i].data.u64];
            if (c->state != C_OPEN)
                continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                lconn_readable(w, c);
            if (c->state == C_OPEN && (evs[i].events & EPOLLOUT))
                lconn_flush(w, c);
        }
        owed = 0;
        for (i = 0; i < w->nconns; i++) {
            lconn_t *c = &w->conns[i];
            if (c->state == C_OPEN && c->done < c->queued) {
                owed = 1;
                break;
            }
        }
    }
    w->msgs_primed = w->msgs_total;
}

/* Opens (state 0 -> 1) or closes (1 -> 2) the measured window's CPU
 * accounting once the clock has passed its edge; cheap otherwise. */
static inline void
lworker_sample(lworker_t *w, uint64_t t)
{
    if (w->server_pid <= 0 || w->cpu_state >= 2)
        return;
    if (w->cpu_state == 0 && t >= w->t_measure) {
        w->cpu_source = proc_cpu_ns(w->server_pid, &w->cpu_a, &w->runs_a);
        w->ts_a = now_ns();
        w->self_a = thread_cpu_ns();
        w->msgs_a = w->msgs_total;
        w->wait_a = w->n_wait;
        w->events_a = w->n_events;
        w->recv_a = w->n_recv;
        w->send_a = w->n_send;
        w->cpu_state = 1;
    } else if (w->cpu_state == 1 && t >= w->t_end) {
        int src = proc_cpu_ns(w->server_pid, &w->cpu_b, &w->runs_b);
        w->ts_b = now_ns();
        w->self_b = thread_cpu_ns();
        w->msgs_b = w->msgs_total;
        w->wait_b = w->n_wait;
        w->events_b = w->n_events;
        w->recv_b = w->n_recv;
        w->send_b = w->n_send;
        if (src != w->cpu_source)
            w->cpu_source = 0;   /* the server died in between */
        w->cpu_state = 2;
    }
}

static void *
lworker_main(void *arg)
{
    lworker_t *w = (lworker_t *)arg;
    struct epoll_event evs[512];
    uint64_t t0, t_drain;
    int i;

    lworker_connect(w);
    lworker_prime(w);
    __atomic_add_fetch(&w->sh->connected, 1, __ATOMIC_SEQ_CST);
    /* Wait for the common start (all workers connected). */
    while ((t0 = __atomic_load_n(&w->sh->t0, __ATOMIC_SEQ_CST)) == 0 && !w->sh->stop)
        sleep_ms(1);
    if (w->sh->stop)
        goto out;

    w->t_measure = t0 + w->warmup_ns;
    w->t_end = w->t_measure + w->duration_ns;
    t_drain = w->t_end + w->drain_ns;
    w->running = 1;

    for (i = 0; i < w->nconns; i++) {
        lconn_t *c = &w->conns[i];
        unsigned k;
        if (c->state != C_OPEN)
            continue;
        for (k = 0; k < w->inflight && c->queued < c->budget; k++)
            lconn_queue(w, c, now_ns());
        lconn_flush(w, c);
    }

    for (;;) {
        int n;
        uint64_t t;
        n = epoll_wait(w->ep, evs, 512, 5);
        w->n_wait++;
        if (n > 0)
            w->n_events += (uint64_t)n;
        for (i = 0; i < n; i++) {
            lconn_t *c = &w->conns[evs[i].data.u64];
            if (c->state != C_OPEN)
                continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                lconn_readable(w, c);
            if (c->state == C_OPEN && (evs[i].events & EPOLLOUT))
                lconn_flush(w, c);
        }
        if (w->sh->stop)
            break;
        t = now_ns();
        lworker_sample(w, t);
        if (w->running && t >= w->t_end)
            w->running = 0;
        if (!w->running) {
            int owed = 0;
            for (i = 0; i < w->nconns; i++) {
                lconn_t *c = &w->conns[i];
                if (c->state == C_OPEN && c->done < c->queued) {
                    owed = 1;
                    break;
                }
            }
            if (!owed)
                break;
            if (t >= t_drain)
                break;
        }
    }
    /* Echoes that never came back. */
    for (i = 0; i < w->nconns; i++) {
        lconn_t *c = &w->conns[i];
        if (c->state == C_OPEN && c->done < c->queued)
            w->err_short++;
    }
out:
    for (i = 0; i < w->nconns; i++) {
        lconn_t *c = &w->conns[i];
        if (c->fd >= 0) {
            close(c->fd);
            c->fd = -1;
        }
    }
    __atomic_add_fetch(&w->sh->finished, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static int
resolve(const char *host, int port, struct sockaddr_storage *out, socklen_t *outlen)
{
    struct addrinfo hints, *res = NULL;
    char portstr[16];
    int rc;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(portstr, sizeof(portstr), "%d", port);
    rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc != 0 || res == NULL)
        return rc != 0 ? rc : EAI_NONAME;
    memcpy(out, res->ai_addr, res->ai_addrlen);
    *outlen = (socklen_t)res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

#define SET_ITEM(d, k, expr)                                   \
    do {                                                       \
        PyObject *v_ = (expr);                                 \
        if (v_ == NULL || PyDict_SetItemString((d), (k), v_) < 0) { \
            Py_XDECREF(v_);                                    \
            goto fail;                                         \
        }                                                      \
        Py_DECREF(v_);                                         \
    } while (0)

PyDoc_STRVAR(run_load_doc,
"run_load(host, port, connections, size, inflight=1, warmup=1.0, duration=5.0, *,\n"
"         threads=1, active=-1, connect_timeout=10.0, drain_timeout=2.0, seed=0,\n"
"         server_pid=0, work_us=0.0) -> dict\n"
"\n"
"Closed-loop echo load: each connection keeps `inflight` messages of `size`\n"
"bytes outstanding and verifies every echoed byte.  `active` >= 0 makes only\n"
"that many connections busy; the others echo one message and then stay idle.\n"
"Returns throughput, latency percentiles (microseconds) and error counts.\n"
"With server_pid > 0 also 'window': that process's CPU time over exactly\n"
"the measured window and the messages echoed in it (first thread's view).\n"
"work_us > 0 spins that long per echoed message: a heavier load generator.");

static PyObject *
run_load(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"host", "port", "connections", "size", "inflight",
                             "warmup", "duration", "threads", "active",
                             "connect_timeout", "drain_timeout", "seed", "server_pid",
                             "work_us", NULL};
    const char *host;
    int port, connections, threads = 1, active = -1, server_pid = 0;
    Py_ssize_t size;
    unsigned int inflight = 1;
    double warmup = 1.0, duration = 5.0, connect_timeout = 10.0, drain_timeout = 2.0;
    double work_us = 0.0;
    unsigned long long seed = 0;
    struct sockaddr_storage addr;
    socklen_t addrlen = 0;
    lshared_t sh;
    lworker_t *workers = NULL;
    lconn_t *conns = NULL;
    uint64_t *qtimes = NULL;
    pthread_t *tids = NULL;
    hist_t *hist = NULL;
    int i, started = 0, rc, interrupted = 0;
    PyObject *result = NULL, *lat = NULL, *errs = NULL;
    uint64_t msgs_window = 0, msgs_total = 0, msgs_primed = 0, open_conns = 0;
    uint64_t e_connect = 0, e_reset = 0, e_short = 0, e_mismatch = 0, e_closed = 0, e_other = 0;
    double connect_s = 0.0, measured_s;
    int setup_errno = 0;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "siin|Iddiiddkid", kwlist, &host, &port,
                                     &connections, &size, &inflight, &warmup, &duration,
                                     &threads, &active, &connect_timeout, &drain_timeout,
                                     &seed, &server_pid, &work_us))
        return NULL;
    if (connections <= 0 || size <= 0 || inflight == 0 || inflight > 65536 ||
        threads <= 0 || threads > 256 || warmup < 0 || duration <= 0 ||
        port <= 0 || port > 65535 || connect_timeout <= 0 || drain_timeout < 0 ||
        server_pid < 0 || !(work_us >= 0.0 && work_us <= 1e6)) {
        PyErr_SetString(PyExc_ValueError, "run_load: argument out of range");
        return NULL;
    }
    if (threads > connections)
        threads = connections;
    if (active < 0 || active > connections)
        active = connections;

    Py_BEGIN_ALLOW_THREADS
    rc = resolve(host, port, &addr, &addrlen);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_Format(PyExc_OSError, "cannot resolve %s: %s", host, gai_strerror(rc));
        return NULL;
    }

    memset(&sh, 0, sizeof(sh));
    workers = PyMem_Calloc((size_t)threads, sizeof(*workers));
    conns = PyMem_Calloc((size_t)connections, sizeof(*conns));
    qtimes = PyMem_Calloc((size_t)connections * inflight, sizeof(uint64_t));
    tids = PyMem_Calloc((size_t)threads, sizeof(*tids));
    hist = PyMem_Calloc((size_t)threads, sizeof(*hist));
    if (!workers || !conns || !qtimes || !tids || !hist) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < connections; i++) {
        lconn_t *c = &conns[i];
        c->fd = -1;
        c->seed = splitmix64((uint64_t)seed * 0x100000001B3ull + (uint64_t)i + 1);
        c->budget = i < active ? UINT64_MAX : 1;
        c->qtime = qtimes + (size_t)i * inflight;
    }
    {
        size_t bufsize = (size_t)size < 65536 ? 65536 : (size_t)size;
        int per = connections / threads, extra = connections % threads, first = 0;
        if (bufsize > 262144)
            bufsize = 262144;
        for (i = 0; i < threads; i++) {
            lworker_t *w = &workers[i];
            int n = per + (i < extra ? 1 : 0);
            w->addr = addr;
            w->addrlen = addrlen;
            w->size = (size_t)size;
            w->inflight = inflight;
            w->warmup_ns = (uint64_t)(warmup * 1e9);
            w->duration_ns = (uint64_t)(duration * 1e9);
            w->drain_ns = (uint64_t)(drain_timeout * 1e9);
            w->connect_ns = (uint64_t)(connect_timeout * 1e9);
            w->work_ns = (uint64_t)(work_us * 1e3);
            w->conns = conns + first;
            w->nconns = n;
            w->sh = &sh;
            w->hist = &hist[i];
            w->bufsize = bufsize;
            w->ep = -1;
            w->server_pid = i == 0 ? server_pid : 0;
            first += n;
            w->rbuf = PyMem_Malloc(bufsize);
            w->wbuf = PyMem_Malloc(bufsize);
            if (!w->rbuf || !w->wbuf) {
                PyErr_NoMemory();
                goto done;
            }
            w->ep = epoll_create1(EPOLL_CLOEXEC);
            if (w->ep < 0) {
                PyErr_SetFromErrno(PyExc_OSError);
                goto done;
            }
        }
    }
    /* With several threads, give each a share of the active connections. */
    if (threads > 1 && active < connections) {
        for (i = 0; i < connections; i++)
            conns[i].budget = 1;
        for (i = 0; i < active; i++) {
            int t = i % threads, k = i / threads;
            if (k < workers[t].nconns)
                workers[t].conns[k].budget = UINT64_MAX;
        }
    }

    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < threads; i++) {
        if (pthread_create(&tids[i], NULL, lworker_main, &workers[i]) != 0)
            break;
        started++;
    }
    if (started < threads)
        sh.stop = 1;
    for (;;) {
        int fin;
        sleep_ms(started == threads && __atomic_load_n(&sh.t0, __ATOMIC_SEQ_CST) ? 50 : 2);
        fin = __atomic_load_n(&sh.finished, __ATOMIC_SEQ_CST);
        if (fin >= started)
            break;
        if (!sh.t0 && __atomic_load_n(&sh.connected, __ATOMIC_SEQ_CST) >= started)
            __atomic_store_n(&sh.t0, now_ns(), __ATOMIC_SEQ_CST);
        {
            int sig;
            Py_BLOCK_THREADS
            sig = PyErr_CheckSignals();
            Py_UNBLOCK_THREADS
            if (sig < 0 && !interrupted) {
                interrupted = 1;
                sh.stop = 1;
            }
        }
    }
    for (i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    Py_END_ALLOW_THREADS

    if (interrupted)
        goto done;   /* the exception from the signal handler is set */
    if (started < threads) {
        PyErr_SetString(PyExc_OSError, "run_load: cannot start threads");
        goto done;
    }

    for (i = 1; i < threads; i++)
        hist_merge(&hist[0], &hist[i]);
    for (i = 0; i < threads; i++) {
        lworker_t *w = &workers[i];
        msgs_window += w->msgs_window;
        msgs_total += w->msgs_total;
        msgs_primed += w->msgs_primed;
        open_conns += w->open_conns;
        e_connect += w->err_connect;
        e_reset += w->err_reset;
        e_short += w->err_short;
        e_mismatch += w->err_mismatch;
        e_closed += w->err_closed;
        e_other += w->err_other;
        if (w->connect_s > connect_s)
            connect_s = w->connect_s;
        if (w->setup_errno)
            setup_errno = w->setup_errno;
    }
    measured_s = duration;

    result = PyDict_New();
    lat = PyDict_New();
    errs = PyDict_New();
    if (!result || !lat || !errs)
        goto fail;
    SET_ITEM(result, "connections", PyLong_FromLong(connections));
    SET_ITEM(result, "connected", PyLong_FromUnsignedLongLong(open_conns));
    SET_ITEM(result, "active", PyLong_FromLong(active));
    SET_ITEM(result, "size", PyLong_FromSsize_t(size));
    SET_ITEM(result, "inflight", PyLong_FromUnsignedLong(inflight));
    SET_ITEM(result, "threads", PyLong_FromLong(threads));
    SET_ITEM(result, "warmup_s", PyFloat_FromDouble(warmup));
    SET_ITEM(result, "duration_s", PyFloat_FromDouble(measured_s));
    SET_ITEM(result, "connect_s", PyFloat_FromDouble(connect_s));
    SET_ITEM(result, "messages", PyLong_FromUnsignedLongLong(msgs_window));
    SET_ITEM(result, "messages_total", PyLong_FromUnsignedLongLong(msgs_total));
    SET_ITEM(result, "messages_primed", PyLong_FromUnsignedLongLong(msgs_primed));
    SET_ITEM(result, "msgs_per_s", PyFloat_FromDouble((double)msgs_window / measured_s));
    SET_ITEM(result, "mb_per_s",
             PyFloat_FromDouble((double)msgs_window * (double)size / measured_s / 1e6));
    SET_ITEM(lat, "p50", PyFloat_FromDouble(hist_quantile(&hist[0], 0.50) / 1e3));
    SET_ITEM(lat, "p90", PyFloat_FromDouble(hist_quantile(&hist[0], 0.90) / 1e3));
    SET_ITEM(lat, "p99", PyFloat_FromDouble(hist_quantile(&hist[0], 0.99) / 1e3));
    SET_ITEM(lat, "p999", PyFloat_FromDouble(hist_quantile(&hist[0], 0.999) / 1e3));
    SET_ITEM(lat, "max", PyFloat_FromDouble((double)hist[0].max / 1e3));
    SET_ITEM(lat, "mean",
             PyFloat_FromDouble(hist[0].n ? hist[0].sum / (double)hist[0].n / 1e3 : 0.0));
    SET_ITEM(result, "latency_us", lat);
    lat = NULL;
    SET_ITEM(errs, "connect", PyLong_FromUnsignedLongLong(e_connect));
    SET_ITEM(errs, "reset", PyLong_FromUnsignedLongLong(e_reset));
    SET_ITEM(errs, "short", PyLong_FromUnsignedLongLong(e_short));
    SET_ITEM(errs, "mismatch", PyLong_FromUnsignedLongLong(e_mismatch));
    SET_ITEM(errs, "closed", PyLong_FromUnsignedLongLong(e_closed));
    SET_ITEM(errs, "other", PyLong_FromUnsignedLongLong(e_other));
    SET_ITEM(result, "errors", errs);
    errs = NULL;
    SET_ITEM(result, "error_total",
             PyLong_FromUnsignedLongLong(e_connect + e_reset + e_short + e_mismatch +
                                         e_closed + e_other));
    if (setup_errno)
        SET_ITEM(result, "setup_error", PyUnicode_FromString(strerror(setup_errno)));
    if (server_pid > 0) {
        /* Only the first worker sampled: with one thread its counts are
         * exact, with more the window's message count stands in. */
        const lworker_t *w = &workers[0];
        PyObject *win = PyDict_New();
        uint64_t msgs;
        double span;
        if (win == NULL)
            goto fail;
        SET_ITEM(result, "window", win);
        if (w->cpu_state == 2 && w->cpu_source != 0) {
            msgs = threads == 1 ? w->msgs_b - w->msgs_a : msgs_window;
            span = (double)(w->ts_b - w->ts_a) / 1e9;
            SET_ITEM(win, "source",
                     PyUnicode_FromString(w->cpu_source == 1 ? "schedstat" : "stat"));
            SET_ITEM(win, "seconds", PyFloat_FromDouble(span));
            SET_ITEM(win, "messages", PyLong_FromUnsignedLongLong(msgs));
            SET_ITEM(win, "server_cpu_s", PyFloat_FromDouble((double)(w->cpu_b - w->cpu_a) / 1e9));
            SET_ITEM(win, "server_cpu_us_per_msg",
                     PyFloat_FromDouble(msgs ? (double)(w->cpu_b - w->cpu_a) / 1e3 / (double)msgs
                                             : 0.0));
            SET_ITEM(win, "server_runs", PyLong_FromUnsignedLongLong(w->runs_b - w->runs_a));
            if (threads == 1) {
                uint64_t waits = w->wait_b - w->wait_a;
                SET_ITEM(win, "loadgen_cpu_s",
                         PyFloat_FromDouble((double)(w->self_b - w->self_a) / 1e9));
                SET_ITEM(win, "loadgen_epoll_waits", PyLong_FromUnsignedLongLong(waits));
                SET_ITEM(win, "loadgen_events_per_wait",
                         PyFloat_FromDouble(waits ? (double)(w->events_b - w->events_a) /
                                                    (double)waits : 0.0));
                SET_ITEM(win, "loadgen_syscalls_per_msg",
                         PyFloat_FromDouble(msgs ? (double)(waits + (w->recv_b - w->recv_a) +
                                                            (w->send_b - w->send_a)) /
                                                   (double)msgs : 0.0));
            }
        } else {
            SET_ITEM(win, "source", PyUnicode_FromString("none"));
        }
    }
    goto done;

fail:
    Py_CLEAR(result);
done:
    Py_XDECREF(lat);
    Py_XDECREF(errs);
    if (workers) {
        for (i = 0; i < threads; i++) {
            if (workers[i].ep >= 0)
                close(workers[i].ep);
            PyMem_Free(workers[i].rbuf);
            PyMem_Free(workers[i].wbuf);
        }
    }
    if (conns) {
        for (i = 0; i < connections; i++)
            if (conns[i].fd >= 0)
                close(conns[i].fd);
    }
    PyMem_Free(workers);
    PyMem_Free(conns);
    PyMem_Free(qtimes);
    PyMem_Free(tids);
    PyMem_Free(hist);
    return result;
}

/* ------------------------------------------------------------------ */
/* echo server                                                         */

typedef struct {
    char *pend;              /* bytes the socket would not take yet */
    uint32_t plen, poff;
    int open;
} sconn_t;

typedef struct {
    sconn_t *c;
    int cap;
} stable_t;

static sconn_t *
stable_get(stable_t *t, int fd)
{
    if (fd >= t->cap) {
        int ncap = t->cap ? t->cap : 1024;
        sconn_t *n;
        while (ncap <= fd)
            ncap *= 2;
        n = realloc(t->c, (size_t)ncap * sizeof(*n));
        if (n == NULL)
            return NULL;
        memset(n + t->cap, 0, (size_t)(ncap - t->cap) * sizeof(*n));
        t->c = n;
        t->cap = ncap;
    }
    return &t->c[fd];
}

static void
sconn_close(int ep, sconn_t *c, int fd)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(c->pend);
    c->pend = NULL;
    c->plen = c->poff = 0;
    c->open = 0;
}

/* Sends what is pending; 1 = all gone, 0 = still pending, -1 = closed. */
static int
sconn_flush(int ep, sconn_t *c, int fd)
{
    while (c->poff < c->plen) {
        ssize_t r = send(fd, c->pend + c->poff, c->plen - c->poff, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            sconn_close(ep, c, fd);
            return -1;
        }
        c->poff += (uint32_t)r;
    }
    free(c->pend);
    c->pend = NULL;
    c->plen = c->poff = 0;
    return 1;
}

static void
set_events(int ep, int fd, uint32_t events)
{
    struct epoll_event ev;
    ev.events = events;
    ev.data.fd = fd;
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

PyDoc_STRVAR(echo_server_doc,
"echo_server(host='127.0.0.1', port=0, *, fd=-1, backlog=4096, max_seconds=0.0) -> dict\n"
"\n"
"Single-threaded C epoll echo server (the benchmark's ceiling).  Listens on\n"
"host:port, or serves the already listening socket `fd`.  Runs until a\n"
"signal handler raises (the exception propagates) or max_seconds > 0 pass;\n"
"then returns {'accepted': n, 'bytes': n}.");

static PyObject *
echo_server(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"host", "port", "fd", "backlog", "max_seconds", NULL};
    const char *host = "127.0.0.1";
    int port = 0, lfd = -1, backlog = 4096, own_lfd = 0, ep = -1, err = 0, interrupted = 0;
    double max_seconds = 0.0;
    stable_t table = {NULL, 0};
    unsigned long long accepted = 0, echoed = 0;
    char *buf = NULL;
    const size_t bufsize = 65536;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|si$iid", kwlist, &host, &port, &lfd,
                                     &backlog, &max_seconds))
        return NULL;

    if (lfd < 0) {
        struct sockaddr_storage addr;
        socklen_t addrlen;
        int one = 1, rc;
        rc = resolve(host, port, &addr, &addrlen);
        if (rc != 0) {
            PyErr_Format(PyExc_OSError, "cannot resolve %s: %s", host, gai_strerror(rc));
            return NULL;
        }
        lfd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (lfd < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        own_lfd = 1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(lfd, (struct sockaddr *)&addr, addrlen) < 0 || listen(lfd, backlog) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            close(lfd);
            return NULL;
        }
    }
    {
        int fl = fcntl(lfd, F_GETFL);
        if (fl < 0 || fcntl(lfd, F_SETFL, fl | O_NONBLOCK) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
    }
    buf = malloc(bufsize);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (buf == NULL || ep < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto out;
    }
    {
        struct epoll_event ev;
        ev.events = EPOLLIN;
        ev.data.fd = lfd;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto out;
        }
    }

    Py_BEGIN_ALLOW_THREADS
    {
        struct epoll_event evs[512];
        uint64_t t_start = now_ns(), t_check = t_start;
        uint64_t t_stop = max_seconds > 0 ? t_start + (uint64_t)(max_seconds * 1e9) : 0;
        for (;;) {
            int n, i;
            uint64_t t;
            n = epoll_wait(ep, evs, 512, 50);
            if (n < 0 && errno != EINTR) {
                err = errno;
                break;
            }
            for (i = 0; i < n; i++) {
                int fd = evs[i].data.fd;
                sconn_t *c;
                if (fd == lfd) {
                    int k;
                    for (k = 0; k < 64; k++) {
                        int one = 1;
                        struct epoll_event ev;
                        int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                        if (cfd < 0)
                            break;
                        c = stable_get(&table, cfd);
                        if (c == NULL) {
                            close(cfd);
                            continue;
                        }
                        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                        ev.events = EPOLLIN;
                        ev.data.fd = cfd;
                        if (epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ev) < 0) {
                            close(cfd);
                            continue;
                        }
                        c->open = 1;
                        accepted++;
                    }
                    continue;
                }
                c = &table.c[fd];
                if (!c->open)
                    continue;
                if (c->pend) {
                    /* Waiting for room: write first, read again after. */
                    int f = sconn_flush(ep, c, fd);
                    if (f == 1)
                        set_events(ep, fd, EPOLLIN);
                    continue;
                }
                {
                    int rounds;
                    for (rounds = 0; rounds < 4; rounds++) {
                        ssize_t r = recv(fd, buf, bufsize, 0), w = 0;
                        if (r < 0 && errno == EINTR)
                            continue;
                        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                            break;
                        if (r <= 0) {
                            sconn_close(ep, c, fd);
                            break;
                        }
                        while (w < r) {
                            ssize_t s = send(fd, buf + w, (size_t)(r - w), MSG_NOSIGNAL);
                            if (s < 0 && errno == EINTR)
                                continue;
                            if (s < 0)
                                break;
                            w += s;
                        }
                        echoed += (unsigned long long)r;
                        if (w < r) {
                            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                                sconn_close(ep, c, fd);
                                break;
                            }
                            c->plen = (uint32_t)(r - w);
                            c->poff = 0;
                            c->pend = malloc(c->plen);
                            if (c->pend == NULL) {
                                sconn_close(ep, c, fd);
                                break;
                            }
                            memcpy(c->pend, buf + w, c->plen);
                            set_events(ep, fd, EPOLLOUT);
                            break;
                        }
                        if ((size_t)r < bufsize)
                            break;
                    }
                }
            }
            t = now_ns();
            if (t_stop && t >= t_stop)
                break;
            if (n <= 0 || t - t_check >= 50000000ull) {
                int sig;
                t_check = t;
                Py_BLOCK_THREADS
                sig = PyErr_CheckSignals();
                Py_UNBLOCK_THREADS
                if (sig < 0) {
                    interrupted = 1;
                    break;
                }
            }
        }
    }
    Py_END_ALLOW_THREADS

    if (err && !interrupted) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    }
out:
    if (table.c) {
        int fd;
        for (fd = 0; fd < table.cap; fd++) {
            if (table.c[fd].open) {
                close(fd);
                free(table.c[fd].pend);
            }
        }
        free(table.c);
    }
    if (ep >= 0)
        close(ep);
    if (own_lfd)
        close(lfd);
    free(buf);
    if (PyErr_Occurred())
        return NULL;
    return Py_BuildValue("{s:K,s:K}", "accepted", accepted, "bytes", echoed);
}

/* ------------------------------------------------------------------ */

PyDoc_STRVAR(pattern_doc,
"pattern(connection, offset, length, seed=0) -> bytes\n"
"\n"
"The bytes run_load sends on connection number `connection` at stream\n"
"offset `offset` (for tests).");

static PyObject *
pattern(PyObject *self, PyObject *args)
{
    int conn;
    unsigned long long off, seed = 0;
    Py_ssize_t len;
    PyObject *out;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKn|K", &conn, &off, &len, &seed))
        return NULL;
    if (len < 0 || conn < 0) {
        PyErr_SetString(PyExc_ValueError, "negative argument");
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, len);
    if (out == NULL)
        return NULL;
    fill_pattern(splitmix64((uint64_t)seed * 0x100000001B3ull + (uint64_t)conn + 1),
                 off, (unsigned char *)PyBytes_AS_STRING(out), (size_t)len);
    return out;
}

static PyMethodDef methods[] = {
    {"run_load", (PyCFunction)(void (*)(void))run_load, METH_VARARGS | METH_KEYWORDS,
     run_load_doc},
    {"echo_server", (PyCFunction)(void (*)(void))echo_server, METH_VARARGS | METH_KEYWORDS,
     echo_server_doc},
    {"pattern", pattern, METH_VARARGS, pattern_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "iocp._benchtools",
    "Native load generator and C echo server for `iocp bench` (Linux).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__benchtools(void)
{
    return PyModule_Create(&moduledef);
}
