/* counted_peer: messages whose header counts their descriptors, in plain C.
 *
 * The framing of skalibs' unixmessage (what s6 and its fd-holding daemon
 * speak), and of many protocols built the same way: a 6-byte header,
 * big-endian,
 *
 *   offset 0  uint32  payload length in bytes
 *   offset 4  uint16  number of descriptors the message carries
 *
 * then the payload. The descriptors travel as SCM_RIGHTS with a sendmsg of
 * the message's bytes, or of an earlier one: a sender may write several
 * messages in one sendmsg with all their descriptors attached. So a reader
 * keeps the descriptors it receives in a FIFO, and when a message is
 * complete takes from it as many as the header says; fewer is a broken
 * stream. (Descriptors arrive with the read that returns the first byte of
 * the sendmsg they were attached to.)
 *
 *   counted_peer SOCKET_PATH
 *
 * connects to SOCKET_PATH and sends five messages with descriptors: a pipe
 * in a message of its own; three messages in one sendmsg, their three
 * descriptors attached to it; and a message whose descriptor rides on a
 * later sendmsg than its header. Then it ends its side and reads the
 * replies: each must bring back the same open files (compared with fstat),
 * as many as its header says. Exit status 0 when all checked out, 1 on a
 * local error or a failed check, 2 when the peer broke the framing.
 *
 * Build: cc -std=c11 -Wall -Wextra -O2 -o counted_peer counted_peer.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define HEADER_SIZE 6
#define MAX_FDS 253 /* SCM_MAX_FD: the most one sendmsg carries */
#define NMESSAGES 5

static void fail(int status, const char *what)
{
    if (errno)
        fprintf(stderr, "counted_peer: %s: %s\n", what, strerror(errno));
    else
        fprintf(stderr, "counted_peer: %s\n", what);
    exit(status);
}

static void pack_header(unsigned char *out, uint32_t length, uint16_t nfds)
{
    uint32_t be_length = htonl(length);
    uint16_t be_nfds = htons(nfds);
    memcpy(out, &be_length, 4);
    memcpy(out + 4, &be_nfds, 2);
}

/* One sendmsg of all of iov, with fds attached (a short write is an error
 * here: the messages are small). */
static void send_with_fds(int s, struct iovec *iov, int iovcnt, const int *fds, int nfds)
{
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(MAX_FDS * sizeof(int))];
    } control;
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    if (nfds > 0) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.space;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
    }
    if (sendmsg(s, &msg, MSG_NOSIGNAL) != (ssize_t)total)
        fail(1, "sendmsg");
}

static int memfd_with(const char *text)
{
    int fd = memfd_create("counted_peer", MFD_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        fail(1, "memfd");
    return fd;
}

static int same_file(int a, int b)
{
    struct stat sa, sb;
    if (fstat(a, &sa) < 0 || fstat(b, &sb) < 0)
        fail(1, "fstat");
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* What was sent, to check the replies against. */
static const char *payloads[NMESSAGES] = {"pipe", "two files", "nothing", "one more", "late"};
static int sent_fds[NMESSAGES][2];
static int sent_nfds[NMESSAGES] = {1, 2, 0, 1, 1};

int main(int argc, char **argv)
{
    if (argc != 2) {
        errno = 0;
        fail(1, "usage: counted_peer SOCKET_PATH");
    }
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (s < 0 || strlen(argv[1]) >= sizeof(addr.sun_path))
        fail(1, "socket");
    strcpy(addr.sun_path, argv[1]);
    if (connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        fail(1, "connect");

    /* 1. A pipe, in a message of its own: header and payload, one sendmsg. */
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        fail(1, "pipe");
    const char *through = "from C through a pipe\n";
    if (write(p[1], through, strlen(through)) != (ssize_t)strlen(through))
        fail(1, "write");
    close(p[1]);
    sent_fds[0][0] = p[0];
    unsigned char h[NMESSAGES][HEADER_SIZE];
    pack_header(h[0], 4, 1);
    struct iovec one[2] = {{h[0], HEADER_SIZE}, {(void *)payloads[0], 4}};
    send_with_fds(s, one, 2, sent_fds[0], 1);

    /* 2-4. Three messages in one sendmsg, all three descriptors with it. */
    sent_fds[1][0] = memfd_with("first memfd");
    sent_fds[1][1] = memfd_with("second memfd");
    sent_fds[3][0] = memfd_with("third memfd");
    int three_fds[3] = {sent_fds[1][0], sent_fds[1][1], sent_fds[3][0]};
    struct iovec three[6];
    for (int m = 1; m <= 3; m++) {
        pack_header(h[m], (uint32_t)strlen(payloads[m]), (uint16_t)sent_nfds[m]);
        three[2 * (m - 1)] = (struct iovec){h[m], HEADER_SIZE};
        three[2 * (m - 1) + 1] = (struct iovec){(void *)payloads[m], strlen(payloads[m])};
    }
    send_with_fds(s, three, 6, three_fds, 3);

    /* 5. The header alone, then the payload with the descriptor. */
    sent_fds[4][0] = memfd_with("fourth memfd");
    pack_header(h[4], 4, 1);
    struct iovec head = {h[4], HEADER_SIZE};
    struct iovec late = {(void *)payloads[4], 4};
    send_with_fds(s, &head, 1, NULL, 0);
    send_with_fds(s, &late, 1, sent_fds[4], 1);
    if (shutdown(s, SHUT_WR) < 0)
        fail(1, "shutdown");

    /* The replies: bytes in a buffer, descriptors in a FIFO. */
    static unsigned char buf[1 << 16];
    size_t have = 0;
    int fifo[4 * MAX_FDS];
    size_t nfifo = 0;
    int replies = 0;
    for (;;) {
        union {
            struct cmsghdr hdr;
            char space[CMSG_SPACE(MAX_FDS * sizeof(int))];
        } control;
        struct iovec iov = {buf + have, sizeof(buf) - have};
        struct msghdr msg = {
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = control.space,
            .msg_controllen = sizeof(control.space),
        };
        ssize_t n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0)
            fail(1, "recvmsg");
        if (msg.msg_flags & MSG_CTRUNC) {
            errno = 0;
            fail(2, "descriptors were lost (MSG_CTRUNC)");
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            if (nfifo + k > sizeof(fifo) / sizeof(fifo[0])) {
                errno = 0;
                fail(2, "too many descriptors no message claims");
            }
            memcpy(fifo + nfifo, CMSG_DATA(c), k * sizeof(int));
            nfifo += k;
        }
        if (n == 0) {
            if (have || nfifo) {
                errno = 0;
                fail(2, "end of stream inside a message, or with unclaimed descriptors");
            }
            break;
        }
        have += (size_t)n;
        /* Every complete message takes its descriptors from the FIFO. */
        for (;;) {
            if (have < HEADER_SIZE)
                break;
            uint32_t length;
            uint16_t nfds;
            memcpy(&length, buf, 4);
            memcpy(&nfds, buf + 4, 2);
            length = ntohl(length);
            nfds = ntohs(nfds);
            if (length > sizeof(buf) - HEADER_SIZE) {
                errno = 0;
                fail(2, "a message longer than this peer takes");
            }
            if (have < HEADER_SIZE + length)
                break;
            if (nfifo < nfds) {
                errno = 0;
                fail(2, "fewer descriptors than the header announced");
            }
            int m = replies++;
            int same = m < NMESSAGES && nfds == sent_nfds[m];
            for (int i = 0; same && i < nfds; i++)
                same = same_file(fifo[i], sent_fds[m][i]);
            printf("reply %d: \"%.*s\" with %u fds, the same open files: %s\n", m + 1,
                   (int)length, (const char *)buf + HEADER_SIZE, (unsigned)nfds,
                   same ? "yes" : "NO");
            if (!same)
                exit(1);
            for (int i = 0; i < nfds; i++)
                close(fifo[i]);
            memmove(fifo, fifo + nfds, (nfifo - nfds) * sizeof(int));
            nfifo -= nfds;
            memmove(buf, buf + HEADER_SIZE + length, have - HEADER_SIZE - length);
            have -= HEADER_SIZE + length;
        }
    }
    printf("%d replies, clean end of stream\n", replies);
    return replies == NMESSAGES ? 0 : 1;
}
