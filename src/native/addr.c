/*
 * addr.c -- socket addresses, closing a socket, and error text, so the
 * Cython layer needs no platform socket headers of its own.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "iocp_native.h"

#ifndef _WIN32
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/un.h>
#include <unistd.h>
#else
#include <afunix.h>   /* struct sockaddr_un (Windows 10 1803+ SDK, mingw-w64) */
#endif

int iocp_sockaddr_inet(int family, const char *host, int port, uint32_t flowinfo,
                       uint32_t scope_id, struct sockaddr_storage *out,
                       iocp_socklen_t *outlen)
{
    memset(out, 0, sizeof(*out));
    if (port < 0 || port > 65535 || !host)
        return IOCP_EINVAL;
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)out;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            return IOCP_EINVAL;
        *outlen = (iocp_socklen_t)sizeof(*sin);
        return 0;
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)out;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((unsigned short)port);
        sin6->sin6_flowinfo = htonl(flowinfo);
        sin6->sin6_scope_id = scope_id;
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            return IOCP_EINVAL;
        *outlen = (iocp_socklen_t)sizeof(*sin6);
        return 0;
    }
    return IOCP_EINVAL;
}

int iocp_sockaddr_unix(const char *path, size_t len, struct sockaddr_storage *out,
                       iocp_socklen_t *outlen)
{
#ifdef AF_UNIX
    struct sockaddr_un *sun = (struct sockaddr_un *)out;
    /* The address must fit in sockaddr_storage with the path's NUL: a
     * longer path is refused, never truncated (it would name another
     * socket) nor copied past the structure. */
    typedef char iocp__sun_fits[sizeof(struct sockaddr_un) <= sizeof(*out) ? 1 : -1];
    (void)sizeof(iocp__sun_fits);
    memset(out, 0, sizeof(*out));
    if (len >= sizeof(sun->sun_path) || len == 0)
        return IOCP_EINVAL;
    sun->sun_family = AF_UNIX;
    memcpy(sun->sun_path, path, len);
    *outlen = (iocp_socklen_t)(offsetof(struct sockaddr_un, sun_path) + len +
                               (path[0] != '\0' ? 1 : 0));
    return 0;
#else
    (void)path; (void)len; (void)out; (void)outlen;
    return IOCP_EINVAL;
#endif
}

int iocp_sockaddr_parse(const struct sockaddr_storage *ss, iocp_socklen_t len,
                        char *host, size_t hostlen, int *port, uint32_t *flowinfo,
                        uint32_t *scope_id)
{
    int family = ss->ss_family;
    /* The length comes from the kernel (accept, getpeername), which reports
     * the address's full size even when it truncated it: never read past
     * the storage whatever it says. */
    size_t slen = len > 0 ? (size_t)len : 0;

    if (slen > sizeof(*ss))
        slen = sizeof(*ss);
    if (hostlen == 0)
        return IOCP_EINVAL;
    host[0] = '\0';
    *port = 0;
    *flowinfo = 0;
    *scope_id = 0;
    if (family == AF_INET && slen >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        if (!inet_ntop(AF_INET, (void *)&sin->sin_addr, host, (socklen_t)hostlen))
            return IOCP_EINVAL;
        *port = ntohs(sin->sin_port);
        return AF_INET;
    }
    if (family == AF_INET6 && slen >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        if (!inet_ntop(AF_INET6, (void *)&sin6->sin6_addr, host, (socklen_t)hostlen))
            return IOCP_EINVAL;
        *port = ntohs(sin6->sin6_port);
        *flowinfo = ntohl(sin6->sin6_flowinfo);
        *scope_id = sin6->sin6_scope_id;
        return AF_INET6;
    }
    if (family == AF_INET || family == AF_INET6)
        return 0;   /* too short to hold one: no address (AF_UNSPEC) */
#ifdef AF_UNIX
    if (family == AF_UNIX) {
        const struct sockaddr_un *sun = (const struct sockaddr_un *)ss;
        size_t off = offsetof(struct sockaddr_un, sun_path);
        size_t n = slen > off ? slen - off : 0;
        if (n > sizeof(sun->sun_path))
            n = sizeof(sun->sun_path);
        if (n >= hostlen)
            n = hostlen - 1;
        memcpy(host, sun->sun_path, n);
        /* A pathname address may carry its terminating NUL; an abstract
         * one starts with NUL and is exactly n bytes. */
        if (n > 0 && host[0] != '\0')
            n = strnlen(host, n);
        host[n] = '\0';
        *port = (int)n;   /* the length, since abstract names hold NULs */
        return AF_UNIX;
    }
#endif
    return family;
}

int iocp_socket_peer(iocp_socket_t sock, struct sockaddr_storage *out,
                     iocp_socklen_t *outlen)
{
    iocp_socklen_t len = (iocp_socklen_t)sizeof(*out);

    memset(out, 0, sizeof(*out));
#ifdef _WIN32
    if (getpeername(sock, (struct sockaddr *)out, &len) != 0)
        return -(int)WSAGetLastError();
#else
    if (getpeername(sock, (struct sockaddr *)out, &len) != 0)
        return -errno;
#endif
    *outlen = len;
    return 0;
}

int iocp_socket_close(iocp_socket_t sock)
{
#ifdef _WIN32
    return closesocket(sock) == 0 ? 0 : -(int)WSAGetLastError();
#else
    /* No retry on EINTR: on Linux the descriptor is gone either way. */
    return close(sock) == 0 ? 0 : -errno;
#endif
}

void iocp_error_message(int code, char *buf, size_t len)
{
#ifdef _WIN32
    DWORD n = FormatMessageA(FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS,
                             NULL, (DWORD)(code < 0 ? -code : code), 0, buf, (DWORD)len, NULL);
    while (n > 0 && (buf[n - 1] == '\r' || buf[n - 1] == '\n' || buf[n - 1] == '.'))
        buf[--n] = '\0';
    if (n == 0)
        snprintf(buf, len, "Windows error %d", code < 0 ? -code : code);
#else
    snprintf(buf, len, "%s", strerror(code < 0 ? -code : code));
#endif
}
