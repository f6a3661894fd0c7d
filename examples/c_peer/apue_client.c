/* apue_client: a client of examples/device_broker_dgram.py, in plain C.
 *
 * It speaks the protocol of Stevens and Rago's send_fd/recv_fd (APUE,
 * section 17.4) over an AF_UNIX SOCK_DGRAM socket: a reply is some error
 * text (possibly none), a NUL byte, then a status byte; status 0 means a
 * descriptor is attached, anything else is an errno value. Written from
 * that description alone.
 *
 *   apue_client BROKER_PATH DEVICE
 *
 * It binds its own socket to a path in the current directory (the broker
 * replies to the sender's address), sends the device name, and receives
 * the reply with recv_fd(). Granted: it writes "ID?\n" to the device and
 * prints the answer, exit status 0. Refused: it prints the status and the
 * text, exit status 2. Exit status 1 on an error.
 *
 * Build: cc -std=c11 -Wall -Wextra -O2 -o apue_client apue_client.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXLINE 4096

static char own_path[64];

static void die(const char *what)
{
    perror(what);
    unlink(own_path);
    exit(1);
}

/* recv_fd, as in APUE: return the descriptor, or -status; the error text
 * that precedes the NUL byte is copied to text. Over datagrams each
 * recvmsg is one message, so the loop ends at the first NUL. */
static int recv_fd(int sock, char *text, size_t textlen)
{
    char buf[MAXLINE];
    union {
        struct cmsghdr align;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    size_t have = 0;
    text[0] = '\0';
    for (;;) {
        struct iovec iov = {buf, sizeof buf};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof control.space;
        ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0)
            die("recvmsg");
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] != '\0') {
                if (have + 1 < textlen)
                    text[have++] = buf[i];
                continue;
            }
            text[have] = '\0';
            if (i + 1 >= n) {
                fprintf(stderr, "apue_client: no status byte after the NUL\n");
                exit(1);
            }
            int status = (unsigned char)buf[i + 1];
            if (status != 0)
                return -status;
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            if (c == NULL || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS
                || c->cmsg_len != CMSG_LEN(sizeof(int))) {
                fprintf(stderr, "apue_client: status 0 but no descriptor\n");
                exit(1);
            }
            int fd;
            memcpy(&fd, CMSG_DATA(c), sizeof fd);
            return fd;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s BROKER_PATH DEVICE\n", argv[0]);
        return 1;
    }
    int sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        die("socket");
    struct sockaddr_un own = {.sun_family = AF_UNIX};
    snprintf(own_path, sizeof own_path, "apue-client-%ld.sock", (long)getpid());
    strcpy(own.sun_path, own_path);
    if (bind(sock, (struct sockaddr *)&own, sizeof own) < 0)
        die("bind");
    struct sockaddr_un broker = {.sun_family = AF_UNIX};
    strncpy(broker.sun_path, argv[1], sizeof broker.sun_path - 1);
    size_t len = strlen(argv[2]);
    if (sendto(sock, argv[2], len, 0, (struct sockaddr *)&broker, sizeof broker)
        != (ssize_t)len)
        die("sendto");

    char text[MAXLINE];
    int fd = recv_fd(sock, text, sizeof text);
    unlink(own_path);
    if (fd < 0) {
        printf("%s: REFUSED, status %d (%s): %s\n", argv[2], -fd, strerror(-fd), text);
        return 2;
    }
    if (write(fd, "ID?\n", 4) != 4)
        die("write");
    char line[MAXLINE];
    size_t got = 0;
    while (got == 0 || line[got - 1] != '\n') {
        ssize_t n = read(fd, line + got, sizeof line - 1 - got);
        if (n <= 0)
            die("read");
        got += (size_t)n;
    }
    line[got] = '\0';
    printf("%s: GRANTED, the device says: %s", argv[2], line);
    close(fd);
    return 0;
}
