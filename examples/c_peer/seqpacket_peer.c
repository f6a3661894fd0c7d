/* seqpacket_peer: an aiofdpass SEQPACKET channel's peer, in plain C.
 *
 * On SOCK_SEQPACKET a record is one packet and carries no aiofdpass header
 * (docs/protocol.md): the kernel's packet boundaries are the framing. This
 * peer connects to SOCKET_PATH (aiofdpass.listen(path, kind="seqpacket")),
 * sends an empty packet and a packet with a pipe attached, then prints what
 * each packet it receives holds and echoes it back (the same bytes, the same
 * descriptors, one sendmsg), until end of stream.
 *
 * An empty packet and end of stream both read as 0 bytes; with SO_PASSCRED
 * on, every packet brings a credentials message and end of stream brings
 * none, which tells them apart (aiofdpass does the same).
 *
 * Exit status 0 on a clean end of stream, 1 on an error.
 * Build: cc -std=c11 -Wall -Wextra -O2 -o seqpacket_peer seqpacket_peer.c
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_FDS 253
#define MAX_PACKET (256 * 1024)
#define CONTROL (CMSG_SPACE(MAX_FDS * sizeof(int)) + CMSG_SPACE(sizeof(struct ucred)))

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void send_packet(int sock, const void *data, size_t len, const int *fds, int nfds)
{
    struct iovec iov = {(void *)data, len};
    struct msghdr msg = {0};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
    } control;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != (ssize_t)len)
        die("sendmsg");
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 1;
    }
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0)
        die("socket");
    int on = 1;
    if (setsockopt(sock, SOL_SOCKET, SO_PASSCRED, &on, sizeof on) < 0)
        die("setsockopt");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect");

    /* First our own packets: an empty one, and one with a pipe. */
    send_packet(sock, "", 0, NULL, 0);
    int p[2];
    if (pipe(p) < 0)
        die("pipe");
    const char note[] = "from C through a pipe\n";
    if (write(p[1], note, sizeof note - 1) != (ssize_t)(sizeof note - 1))
        die("write");
    close(p[1]);
    send_packet(sock, "pipe", 4, &p[0], 1);
    close(p[0]);

    static char data[MAX_PACKET];
    int count = 0;
    for (;;) {
        union {
            struct cmsghdr align;
            char buf[CONTROL];
        } control;
        struct iovec iov = {data, sizeof data};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0)
            die("recvmsg");
        if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
            fprintf(stderr, "seqpacket_peer: a packet was truncated\n");
            return 1;
        }
        int fds[MAX_FDS], nfds = 0, control_messages = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            control_messages++;
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                memcpy(fds + nfds, CMSG_DATA(c), k * sizeof(int));
                nfds += k;
            }
        }
        if (n == 0 && control_messages == 0)
            break; /* no credentials: end of stream, not a packet */
        printf("packet %d: %zd bytes, %d fds\n", count++, n, nfds);
        fflush(stdout);
        send_packet(sock, data, (size_t)n, fds, nfds);
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
    }
    printf("end of stream after %d packets\n", count);
    return 0;
}
