/*
 * wine_probes.c -- what the platform does, printed, not judged: the Winsock
 * behaviours behind tests/wine/run.sh's WINE_KNOWN entries and the Windows
 * backend's workarounds, measured where the suite runs.  Plain Winsock, no
 * iocp code.  tests/wine/run.sh builds and runs it after the driver; its
 * output is evidence for the log, its exit status is always 0.
 *
 *   accept: AcceptEx on a listener whose backlog already holds connections.
 *     Windows may complete it inline (TRUE); Wine 8 returns
 *     ERROR_IO_PENDING and has queued the packet already (a zero-timeout
 *     GetQueuedCompletionStatusEx right after returns it).  Why
 *     iocp__win_poll looks again after re-issuing a multishot accept.
 *   udp-icmp: a connected UDP socket sends to a port nobody listens on
 *     (ICMP port unreachable).  Windows documents the socket readable and
 *     the next recv failing with WSAECONNRESET (10054); Wine 8 keeps the
 *     error in SO_ERROR (10061) only: select() reports it neither readable
 *     nor exceptional and recv() says WSAEWOULDBLOCK.
 *
 * Usage: wine_probes
 */
#ifndef _WIN32
#error "wine_probes.c probes Winsock only"
#endif
#include <winsock2.h>
#include <windows.h>
#include <mswsock.h>
#include <stdio.h>
#include <string.h>

#define NCONN 4

static SOCKET tcp_listener(struct sockaddr_in *a)
{
    SOCKET l = WSASocketW(AF_INET, SOCK_STREAM, IPPROTO_TCP, NULL, 0, WSA_FLAG_OVERLAPPED);
    int al = sizeof(*a);

    memset(a, 0, sizeof(*a));
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (l == INVALID_SOCKET || bind(l, (struct sockaddr *)a, sizeof(*a)) != 0 ||
        listen(l, 64) != 0 || getsockname(l, (struct sockaddr *)a, &al) != 0)
        return INVALID_SOCKET;
    return l;
}

static void probe_accept(void)
{
    static char addrs[NCONN][2 * (sizeof(struct sockaddr_in) + 16)];
    static OVERLAPPED ov[NCONN];
    struct sockaddr_in a;
    SOCKET l = tcp_listener(&a), c[NCONN], s[NCONN];
    HANDLE port = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 0);
    GUID g = WSAID_ACCEPTEX;
    LPFN_ACCEPTEX acceptex = NULL;
    DWORD nb = 0;
    int i;

    if (l == INVALID_SOCKET || !port ||
        WSAIoctl(l, SIO_GET_EXTENSION_FUNCTION_POINTER, &g, sizeof(g), &acceptex,
                 sizeof(acceptex), &nb, NULL, NULL) != 0 ||
        !CreateIoCompletionPort((HANDLE)l, port, 1, 0)) {
        printf("probe accept: setup failed (%d)\n", WSAGetLastError());
        return;
    }
    SetFileCompletionNotificationModes(
        (HANDLE)l, FILE_SKIP_COMPLETION_PORT_ON_SUCCESS | FILE_SKIP_SET_EVENT_ON_HANDLE);
    for (i = 0; i < NCONN; i++) {
        c[i] = socket(AF_INET, SOCK_STREAM, IPPROTO_TCP);
        connect(c[i], (struct sockaddr *)&a, sizeof(a));   /* completes in the backlog */
    }
    Sleep(100);
    for (i = 0; i < NCONN; i++) {
        OVERLAPPED_ENTRY e[4];
        ULONG n = 0;
        DWORD bytes = 0;
        BOOL ok, got;
        int err;

        s[i] = WSASocketW(AF_INET, SOCK_STREAM, IPPROTO_TCP, NULL, 0, WSA_FLAG_OVERLAPPED);
        ok = acceptex(l, s[i], addrs[i], 0, sizeof(struct sockaddr_in) + 16,
                      sizeof(struct sockaddr_in) + 16, &bytes, &ov[i]);
        err = ok ? 0 : WSAGetLastError();
        got = GetQueuedCompletionStatusEx(port, e, 4, &n, 0, FALSE);
        printf("probe accept: connection %d waiting: AcceptEx %s (error %d), "
               "packets queued at once: %lu\n",
               i, ok ? "TRUE" : "FALSE", err, got ? (unsigned long)n : 0ul);
    }
    for (i = 0; i < NCONN; i++) {
        closesocket(s[i]);
        closesocket(c[i]);
    }
    closesocket(l);
    CloseHandle(port);
}

static void probe_udp_icmp(void)
{
    struct sockaddr_in a;
    int al = sizeof(a), v = 0, vl = sizeof(v), r;
    u_long nonblocking = 1;
    SOCKET gone = socket(AF_INET, SOCK_DGRAM, IPPROTO_UDP), u;
    fd_set rd, ex;
    struct timeval tv = {0, 500000};
    char b[16];

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(gone, (struct sockaddr *)&a, sizeof(a));
    getsockname(gone, (struct sockaddr *)&a, &al);
    closesocket(gone);                       /* nobody listens there now */
    u = socket(AF_INET, SOCK_DGRAM, IPPROTO_UDP);
    if (u == INVALID_SOCKET || connect(u, (struct sockaddr *)&a, sizeof(a)) != 0) {
        printf("probe udp-icmp: setup failed (%d)\n", WSAGetLastError());
        return;
    }
    ioctlsocket(u, FIONBIO, &nonblocking);
    r = send(u, "anyone?", 7, 0);
    printf("probe udp-icmp: send %d (error %d)\n", r, r < 0 ? WSAGetLastError() : 0);
    Sleep(200);                              /* the ICMP reply is back by now */
    FD_ZERO(&rd);
    FD_ZERO(&ex);
    FD_SET(u, &rd);
    FD_SET(u, &ex);
    r = select(0, &rd, NULL, &ex, &tv);
    printf("probe udp-icmp: select %d: readable %d, exceptional %d\n", r,
           FD_ISSET(u, &rd) != 0, FD_ISSET(u, &ex) != 0);
    r = recv(u, b, sizeof(b), 0);
    printf("probe udp-icmp: recv %d (error %d; Windows documents 10054)\n", r,
           r < 0 ? WSAGetLastError() : 0);
    getsockopt(u, SOL_SOCKET, SO_ERROR, (char *)&v, &vl);
    printf("probe udp-icmp: SO_ERROR %d\n", v);
    closesocket(u);
}

int main(void)
{
    WSADATA wd;

    if (WSAStartup(MAKEWORD(2, 2), &wd) != 0)
        return 0;
    probe_accept();
    probe_udp_icmp();
    WSACleanup();
    return 0;
}
