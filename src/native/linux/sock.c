/*
 * sock.c -- socket helpers both Linux backends share (see sock.h).
 *
 * Each is a handful of plain syscalls on a socket the caller owns; none
 * touches port state, so they need no lock and set no errno for the
 * caller (they return -errno instead).
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "sock.h"

int iocp__sock_prepare(iocp_socket_t sock)
{
    int fl;

    if (sock < 0)
        return IOCP_EBADF;
    fl = fcntl(sock, F_GETFL);
    if (fl < 0)
        return -errno;
    if (!(fl & O_NONBLOCK) && fcntl(sock, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    return 0;
}

int iocp__sock_connect_status(iocp_socket_t sock)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(int), sl = sizeof(ss);
    int err = 0;

    if (getsockopt(sock, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err == EINPROGRESS || err == EALREADY)
        return 1;
    if (err != 0)
        return -err;
    /* No error yet, but the edge may have come before the handshake
     * ended: only a peer name proves the connection is up. */
    if (getpeername(sock, (struct sockaddr *)&ss, &sl) < 0 && errno == ENOTCONN)
        return 1;
    return 0;
}

int iocp__sock_is_tcp(iocp_socket_t sock)
{
    int type = 0, proto = 0;
    socklen_t len = sizeof(type);

    /* SOCK_STREAM and IPPROTO_TCP both: a raw socket can carry
     * IPPROTO_TCP and still deliver whole datagrams. */
    if (getsockopt(sock, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_STREAM)
        return 0;
    len = sizeof(proto);
    if (getsockopt(sock, SOL_SOCKET, SO_PROTOCOL, &proto, &len) < 0)
        return 0;
    return proto == IPPROTO_TCP;
}
