/* afd_peer: a peer for the aiofdpass wire protocol, version 1, in plain C.
 *
 * Written from docs/protocol.md alone, with nothing but sendmsg/recvmsg:
 * it shows that the spec is enough to interoperate, and tests/test_c_peer.py
 * runs it against a Python server in both directions.
 *
 *   afd_peer SOCKET_PATH send   send records with descriptors (a pipe, a
 *                               file, a socket pair, 253 descriptors, three
 *                               records in one sendmsg) and check that each
 *                               echo brings back the same open files
 *   afd_peer SOCKET_PATH echo   print what each received record holds (the
 *                               content of files and pipes it was given),
 *                               then echo the record back, until the peer
 *                               ends its side
 *
 * Exit status 0 when everything checked out, 1 on a local error or a
 * failed check, 2 when the peer broke the protocol. Linux only (descriptor
 * passing never leaves the kernel, and MSG_CMSG_CLOEXEC is Linux's).
 *
 * Build: cc -std=c11 -Wall -Wextra -O2 -o afd_peer afd_peer.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

/* Section 2: the header. */
#define AFD_HEADER_SIZE 12
#define AFD_VERSION 1
/* Section 7: limits (this peer uses the defaults). */
#define AFD_MAX_FDS 253 /* SCM_MAX_FD */
#define AFD_MAX_PAYLOAD (16u * 1024u * 1024u)
/* Section 5: an SCM_PIDFD message carries a descriptor to close. */
#ifndef SCM_PIDFD
#define SCM_PIDFD 4
#endif
/* Section 5: room for the most descriptors one call can bring, plus the
 * credentials and pidfd messages, all sized with CMSG_SPACE. */
#define AFD_RECV_CONTROL                                                     \
    (CMSG_SPACE(AFD_MAX_FDS * sizeof(int)) + CMSG_SPACE(sizeof(struct ucred)) \
     + CMSG_SPACE(sizeof(int)))
#define READ_CHUNK 65536

static void fail(int status, const char *fmt, ...)
{
    va_list ap;
    fputs("afd_peer: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

static void fail_errno(const char *what)
{
    fail(1, "%s: %s", what, strerror(errno));
}

/* ---- sending (sections 3 and 4) ---------------------------------------- */

struct record {
    const void *data;
    uint32_t len;
    const int *fds;
    uint16_t nfds;
};

static void put_header(unsigned char *h, uint32_t len, uint16_t nfds)
{
    uint16_t nfds_be = htons(nfds), reserved = 0;
    uint32_t len_be = htonl(len);

    h[0] = 'F'; /* magic "FD" */
    h[1] = 'D';
    h[2] = AFD_VERSION;
    h[3] = 0; /* flags */
    memcpy(h + 4, &nfds_be, 2);
    memcpy(h + 6, &reserved, 2);
    memcpy(h + 8, &len_be, 4);
}

/* Write n records. They go out with one sendmsg as far as the kernel takes
 * them (coalescing, rule 1 of section 3): every record's descriptors, in
 * record order, are attached to the first call, which carries the first
 * header's bytes. A partial write is continued with no control message
 * (rule 3). The socket is blocking, so EAGAIN does not happen here. */
static void send_records(int sock, const struct record *recs, size_t n)
{
    unsigned char(*headers)[AFD_HEADER_SIZE] = calloc(n, AFD_HEADER_SIZE);
    struct iovec *iov = calloc(2 * n, sizeof *iov);
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(AFD_MAX_FDS * sizeof(int))];
    } ctl;
    struct msghdr msg;
    int fds[AFD_MAX_FDS];
    size_t niov = 0, left = 0, nfds = 0;

    if (headers == NULL || iov == NULL)
        fail_errno("calloc");
    memset(&ctl, 0, sizeof ctl);
    for (size_t i = 0; i < n; i++) {
        if (nfds + recs[i].nfds > AFD_MAX_FDS) /* rule 4 */
            fail(1, "more than %d descriptors in one sendmsg", AFD_MAX_FDS);
        memcpy(fds + nfds, recs[i].fds, recs[i].nfds * sizeof(int));
        nfds += recs[i].nfds;
        put_header(headers[i], recs[i].len, recs[i].nfds);
        iov[niov].iov_base = headers[i];
        iov[niov++].iov_len = AFD_HEADER_SIZE;
        if (recs[i].len > 0) {
            iov[niov].iov_base = (void *)recs[i].data;
            iov[niov++].iov_len = recs[i].len;
        }
        left += AFD_HEADER_SIZE + (size_t)recs[i].len;
    }

    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = niov;
    if (nfds > 0) {
        struct cmsghdr *c;
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }

    while (left > 0) {
        ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            fail_errno("sendmsg");
        }
        left -= (size_t)sent;
        /* The descriptors went with this call; never send them again. */
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
        while (sent > 0) { /* skip what was written */
            if ((size_t)sent >= msg.msg_iov->iov_len) {
                sent -= (ssize_t)msg.msg_iov->iov_len;
                msg.msg_iov++;
                msg.msg_iovlen--;
            } else {
                msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + sent;
                msg.msg_iov->iov_len -= (size_t)sent;
                sent = 0;
            }
        }
    }
    free(iov);
    free(headers);
}

/* ---- receiving (sections 5 and 6) -------------------------------------- */

struct receiver {
    int sock;
    unsigned char *buf; /* bytes not yet decoded */
    size_t len, cap;
    int fifo[2 * AFD_MAX_FDS]; /* received, not yet claimed */
    size_t nfifo;
};

struct received {
    unsigned char *data;
    uint32_t len;
    int fds[AFD_MAX_FDS];
    uint16_t nfds;
};

/* Section 6: close every descriptor held, fail the connection. */
static void violation(struct receiver *r, const char *what)
{
    for (size_t i = 0; i < r->nfifo; i++)
        close(r->fifo[i]);
    r->nfifo = 0;
    r->len = 0;
    shutdown(r->sock, SHUT_RDWR);
    close(r->sock);
    fail(2, "protocol violation: %s", what);
}

/* Return 1 with the next record in *out (the caller owns out->data and
 * out->fds), or 0 at a clean end of stream. */
static int receive_record(struct receiver *r, struct received *out)
{
    for (;;) {
        size_t want = READ_CHUNK;

        /* 1. Take a complete record out of the buffer, if there is one. The
         * header is checked as soon as its 12 bytes are in. */
        if (r->len >= AFD_HEADER_SIZE) {
            const unsigned char *h = r->buf;
            uint16_t nfds, reserved;
            uint32_t length;
            memcpy(&nfds, h + 4, 2);
            memcpy(&reserved, h + 6, 2);
            memcpy(&length, h + 8, 4);
            nfds = ntohs(nfds);
            reserved = ntohs(reserved);
            length = ntohl(length);
            if (h[0] != 'F' || h[1] != 'D')
                violation(r, "bad magic");
            if (h[2] != AFD_VERSION)
                violation(r, "unknown version");
            if (h[3] != 0 || reserved != 0)
                violation(r, "nonzero flags or reserved field");
            if (length > AFD_MAX_PAYLOAD)
                violation(r, "payload over max_payload");
            if (nfds > AFD_MAX_FDS)
                violation(r, "nfds over max_fds");
            if (r->len >= AFD_HEADER_SIZE + (size_t)length) {
                if (r->nfifo < nfds)
                    violation(r, "fewer descriptors than the header announced");
                out->len = length;
                out->data = malloc(length ? length : 1);
                if (out->data == NULL)
                    fail_errno("malloc");
                memcpy(out->data, r->buf + AFD_HEADER_SIZE, length);
                out->nfds = nfds;
                memcpy(out->fds, r->fifo, nfds * sizeof(int));
                memmove(r->fifo, r->fifo + nfds, (r->nfifo - nfds) * sizeof(int));
                r->nfifo -= nfds;
                r->len -= AFD_HEADER_SIZE + (size_t)length;
                memmove(r->buf, r->buf + AFD_HEADER_SIZE + length, r->len);
                return 1;
            }
            /* Room for the rest of this record in one go. */
            if (AFD_HEADER_SIZE + (size_t)length - r->len > want)
                want = AFD_HEADER_SIZE + (size_t)length - r->len;
        }
        if (r->nfifo > AFD_MAX_FDS)
            violation(r, "more than 253 unclaimed descriptors");

        /* 2. Read once. */
        if (r->cap < r->len + want) {
            unsigned char *bigger = realloc(r->buf, r->len + want);
            if (bigger == NULL)
                fail_errno("realloc");
            r->buf = bigger;
            r->cap = r->len + want;
        }
        union {
            struct cmsghdr align;
            char buf[AFD_RECV_CONTROL];
        } ctl;
        struct iovec iov = {.iov_base = r->buf + r->len, .iov_len = want};
        struct msghdr msg;
        int got[AFD_RECV_CONTROL / sizeof(int)];
        size_t ngot = 0;
        ssize_t n;

        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        do
            n = recvmsg(r->sock, &msg, MSG_CMSG_CLOEXEC);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            fail_errno("recvmsg");

        /* Own every descriptor before acting on anything else. */
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL;
             c = CMSG_NXTHDR(&msg, c)) {
            size_t count;
            const unsigned char *data = CMSG_DATA(c);
            if (c->cmsg_level != SOL_SOCKET)
                continue;
            if (c->cmsg_type != SCM_RIGHTS && c->cmsg_type != SCM_PIDFD)
                continue; /* SCM_CREDENTIALS and others: ignore */
            /* A trailing partial int is dropped by the division. */
            count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < count; i++) {
                int fd;
                memcpy(&fd, data + i * sizeof(int), sizeof fd);
                if (c->cmsg_type == SCM_PIDFD)
                    close(fd);
                else
                    got[ngot++] = fd;
            }
        }
        if (msg.msg_flags & MSG_CTRUNC) {
            for (size_t i = 0; i < ngot; i++)
                close(got[i]);
            violation(r, "descriptors lost (MSG_CTRUNC)");
        }
        if (r->nfifo + ngot > sizeof r->fifo / sizeof r->fifo[0]) {
            for (size_t i = 0; i < ngot; i++)
                close(got[i]);
            violation(r, "more than 253 unclaimed descriptors");
        }
        memcpy(r->fifo + r->nfifo, got, ngot * sizeof(int));
        r->nfifo += ngot;

        if (n == 0) { /* end of stream */
            if (r->len == 0 && r->nfifo == 0)
                return 0;
            violation(r, r->len ? "end of stream inside a record"
                                : "end of stream with unclaimed descriptors");
        }
        r->len += (size_t)n;
    }
}

static void free_received(struct received *rec)
{
    for (uint16_t i = 0; i < rec->nfds; i++)
        close(rec->fds[i]);
    free(rec->data);
    rec->data = NULL;
    rec->nfds = 0;
}

/* ---- helpers ------------------------------------------------------------ */

static int connect_to(const char *path)
{
    struct sockaddr_un addr;
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (sock < 0)
        fail_errno("socket");
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path)
        fail(1, "socket path too long: %s", path);
    strcpy(addr.sun_path, path);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        fail_errno("connect");
    return sock;
}

static void identity(int fd, dev_t *dev, ino_t *ino)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        fail_errno("fstat");
    *dev = st.st_dev;
    *ino = st.st_ino;
}

static int same_file(int a, int b)
{
    dev_t da, db;
    ino_t ia, ib;
    identity(a, &da, &ia);
    identity(b, &db, &ib);
    return da == db && ia == ib;
}

static int is_cloexec(int fd)
{
    int flags = fcntl(fd, F_GETFD);
    if (flags < 0)
        fail_errno("fcntl");
    return (flags & FD_CLOEXEC) != 0;
}

static void write_all(int fd, const void *data, size_t len)
{
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail_errno("write");
        }
        p += n;
        len -= (size_t)n;
    }
}

/* Print bytes as a C-style escaped string. */
static void print_escaped(const unsigned char *p, size_t len)
{
    putchar('"');
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\n')
            fputs("\\n", stdout);
        else if (p[i] == '"' || p[i] == '\\')
            printf("\\%c", p[i]);
        else if (p[i] < 0x20 || p[i] >= 0x7f)
            printf("\\x%02x", p[i]);
        else
            putchar(p[i]);
    }
    putchar('"');
}

/* Wait for the echo of one record and check it: same payload, same number
 * of descriptors, and each descriptor the same open file as expected[i]. */
static void expect_echo(struct receiver *rx, const char *name,
                        const struct record *sent, const int *expected,
                        struct received *echo)
{
    if (!receive_record(rx, echo))
        fail(1, "%s: end of stream instead of the echo", name);
    if (echo->len != sent->len || memcmp(echo->data, sent->data, sent->len) != 0)
        fail(1, "%s: the echoed payload differs", name);
    if (echo->nfds != sent->nfds)
        fail(1, "%s: %u descriptors echoed, %u sent", name, echo->nfds,
             sent->nfds);
    for (uint16_t i = 0; i < echo->nfds; i++) {
        if (!same_file(echo->fds[i], expected[i]))
            fail(1, "%s: echoed descriptor %u is not the file sent", name, i);
        if (!is_cloexec(echo->fds[i]))
            fail(1, "%s: received descriptor is not close-on-exec", name);
    }
    printf("echo %s: ok, %u bytes, %u fds\n", name, echo->len, echo->nfds);
}

/* ---- send mode: C sends, the peer echoes -------------------------------- */

static const char PIPE_TEXT[] = "from C through a pipe\n";
static const char FILE_TEXT[] = "from C in a file\n";

static int run_send(int sock)
{
    struct receiver rx = {.sock = sock};
    struct received echo = {0};
    int echoes = 0;

    /* 1. The read end of a pipe, after writing into it. The peer reads it. */
    {
        int p[2];
        int keep;
        struct record rec = {"pipe", 4, NULL, 1};
        if (pipe2(p, O_CLOEXEC) < 0)
            fail_errno("pipe2");
        write_all(p[1], PIPE_TEXT, strlen(PIPE_TEXT));
        close(p[1]);
        keep = dup(p[0]); /* only to check the echo's identity */
        rec.fds = &p[0];
        send_records(sock, &rec, 1);
        close(p[0]); /* send, then close: the file stays alive in flight */
        expect_echo(&rx, "pipe", &rec, &keep, &echo);
        free_received(&echo);
        close(keep);
        echoes++;
    }

    /* 2. A file (memfd) at offset 0. The peer reads it, which moves the
     * offset that both processes share. */
    int file = memfd_create("afd_peer", MFD_CLOEXEC);
    if (file < 0)
        fail_errno("memfd_create");
    write_all(file, FILE_TEXT, strlen(FILE_TEXT));
    if (lseek(file, 0, SEEK_SET) < 0)
        fail_errno("lseek");
    {
        struct record rec = {"file", 4, &file, 1};
        off_t offset;
        send_records(sock, &rec, 1);
        expect_echo(&rx, "file", &rec, &file, &echo);
        offset = lseek(echo.fds[0], 0, SEEK_CUR);
        if (offset != (off_t)strlen(FILE_TEXT))
            fail(1, "file: offset %lld after the peer read it, expected %zu",
                 (long long)offset, strlen(FILE_TEXT));
        printf("file offset after the peer read it: %lld (shared)\n",
               (long long)offset);
        free_received(&echo);
        echoes++;
    }

    /* 3. An empty record: a bare header. */
    {
        struct record rec = {"", 0, NULL, 0};
        send_records(sock, &rec, 1);
        expect_echo(&rx, "empty", &rec, NULL, &echo);
        free_received(&echo);
        echoes++;
    }

    /* 4. 1 MiB of payload (many partial reads) with both ends of a socket
     * pair, which must still talk to each other after the round trip. */
    {
        size_t len = 1024 * 1024;
        unsigned char *big = malloc(len);
        int sp[2];
        char reply[5] = {0};
        if (big == NULL)
            fail_errno("malloc");
        for (size_t i = 0; i < len; i++)
            big[i] = (unsigned char)(i * 7 + i / 251);
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) < 0)
            fail_errno("socketpair");
        struct record rec = {big, (uint32_t)len, sp, 2};
        send_records(sock, &rec, 1);
        expect_echo(&rx, "big", &rec, sp, &echo);
        write_all(echo.fds[0], "ping", 4);
        if (read(echo.fds[1], reply, 4) != 4 || memcmp(reply, "ping", 4) != 0)
            fail(1, "big: the echoed socket pair does not talk");
        free_received(&echo);
        close(sp[0]);
        close(sp[1]);
        free(big);
        echoes++;
    }

    /* 5. Three records written by one sendmsg, their descriptors in record
     * order on that call (coalescing, section 3 rule 1). */
    {
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0)
            fail_errno("pipe2");
        int first[1] = {p[0]};
        int third[2] = {p[1], file};
        struct record recs[3] = {
            {"c1", 2, first, 1},
            {"c2", 2, NULL, 0},
            {"c3", 2, third, 2},
        };
        send_records(sock, recs, 3);
        expect_echo(&rx, "c1", &recs[0], first, &echo);
        free_received(&echo);
        expect_echo(&rx, "c2", &recs[1], NULL, &echo);
        free_received(&echo);
        expect_echo(&rx, "c3", &recs[2], third, &echo);
        free_received(&echo);
        close(p[0]);
        close(p[1]);
        echoes += 3;
    }

    /* 6. The most one record may carry: 253 descriptors (the same file). */
    {
        int many[AFD_MAX_FDS];
        for (int i = 0; i < AFD_MAX_FDS; i++)
            many[i] = file;
        struct record rec = {"many", 4, many, AFD_MAX_FDS};
        send_records(sock, &rec, 1);
        expect_echo(&rx, "many", &rec, many, &echo);
        free_received(&echo);
        echoes++;
    }
    close(file);

    /* End our direction; the peer then ends its own: a clean end. */
    if (shutdown(sock, SHUT_WR) < 0)
        fail_errno("shutdown");
    if (receive_record(&rx, &echo))
        fail(1, "a record after the last echo");
    free(rx.buf);
    printf("send: %d records echoed and checked, clean end of stream\n", echoes);
    return 0;
}

/* ---- echo mode: the peer sends, C reports and echoes --------------------- */

static void describe_fd(int fd, uint16_t index)
{
    struct stat st;
    unsigned char content[4096];
    ssize_t n = 0;

    if (fstat(fd, &st) < 0)
        fail_errno("fstat");
    printf("  fd %u: ", index);
    if (S_ISREG(st.st_mode)) {
        n = pread(fd, content, sizeof content, 0);
        printf("file");
    } else if (S_ISFIFO(st.st_mode)) {
        size_t total = 0;
        while (total < sizeof content &&
               (n = read(fd, content + total, sizeof content - total)) > 0)
            total += (size_t)n;
        n = n < 0 ? n : (ssize_t)total;
        printf("pipe");
    } else if (S_ISSOCK(st.st_mode)) {
        static const char hello[] = "hello from C\n";
        write_all(fd, hello, strlen(hello));
        printf("socket (wrote %zu bytes)", strlen(hello));
    } else {
        printf("other");
    }
    if (n < 0)
        fail_errno("read");
    printf(" cloexec=%d", is_cloexec(fd));
    if (S_ISREG(st.st_mode) || S_ISFIFO(st.st_mode)) {
        printf(" content=");
        print_escaped(content, (size_t)n);
    }
    putchar('\n');
}

static int run_echo(int sock)
{
    struct receiver rx = {.sock = sock};
    struct received rec = {0};
    int count = 0;

    while (receive_record(&rx, &rec)) {
        printf("record %d: %u bytes, %u fds", count, rec.len, rec.nfds);
        if (rec.len <= 64) {
            printf(", data=");
            print_escaped(rec.data, rec.len);
        }
        putchar('\n');
        if (rec.nfds <= 8) {
            for (uint16_t i = 0; i < rec.nfds; i++)
                describe_fd(rec.fds[i], i);
        } else {
            int same = 1;
            for (uint16_t i = 1; i < rec.nfds; i++)
                same = same && same_file(rec.fds[0], rec.fds[i]);
            printf("  %u fds, all the same open file: %s\n", rec.nfds,
                   same ? "yes" : "no");
        }
        fflush(stdout);
        struct record back = {rec.data, rec.len, rec.fds, rec.nfds};
        send_records(sock, &back, 1);
        free_received(&rec); /* send, then close */
        count++;
    }
    if (shutdown(sock, SHUT_WR) < 0)
        fail_errno("shutdown");
    free(rx.buf);
    printf("echo: %d records echoed, clean end of stream\n", count);
    return 0;
}

int main(int argc, char **argv)
{
    int sock, status;

    if (argc != 3 || (strcmp(argv[2], "send") != 0 && strcmp(argv[2], "echo") != 0)) {
        fprintf(stderr, "usage: %s SOCKET_PATH send|echo\n", argv[0]);
        return 64;
    }
    sock = connect_to(argv[1]);
    status = strcmp(argv[2], "send") == 0 ? run_send(sock) : run_echo(sock);
    close(sock);
    return status;
}
