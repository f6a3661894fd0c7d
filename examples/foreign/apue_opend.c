/* apue_opend: the open server of APUE, in plain C.
 *
 * Written from the protocol as W. Richard Stevens and Stephen A. Rago
 * describe it in "Advanced Programming in the UNIX Environment" (3rd ed.,
 * sections 17.4 "Passing File Descriptors" and 17.5 "An Open Server,
 * Version 1"):
 *
 *   request (client to server): "open <pathname> <oflag>" and a NUL byte,
 *     <oflag> in decimal (the client's csopen writes it with writev).
 *   reply, send_fd: two bytes, a NUL byte and a status byte 0, with the
 *     descriptor attached to them (SCM_RIGHTS).
 *   reply, send_err: the error text (no NUL) in one write, then send_fd
 *     with a negative "descriptor": a NUL byte and the status byte 1 (the
 *     negated code, 1 when it would be 0), with no descriptor.
 *   The client's recv_fd reads until the NUL byte; what came before it is
 *   an error message; the byte after it is the status.
 *
 * Like the book's opend version 1, it serves the socket it was given as
 * standard input (the book's "s-pipe", one end of a socketpair), one
 * request after the other, until end of file; then it exits 0. Exit status
 * 1 on a local error.
 *
 * Build: cc -std=c11 -Wall -Wextra -O2 -o apue_opend apue_opend.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAXLINE 4096 /* the book's request buffer */
#define MAXARGC 50

static int sock = STDIN_FILENO;

static void die(const char *what)
{
    fprintf(stderr, "apue_opend: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* APUE's send_fd: a NUL byte and a status byte; the descriptor with them
 * when fd_to_send >= 0, else the status is -fd_to_send (never 0). */
static void send_fd(int fd_to_send)
{
    unsigned char buf[2] = {0, 0};
    struct iovec iov = {.iov_base = buf, .iov_len = 2};
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd_to_send < 0) {
        buf[1] = (unsigned char)-fd_to_send;
        if (buf[1] == 0)
            buf[1] = 1; /* -256 would look like success */
    } else {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.space;
        msg.msg_controllen = sizeof(control.space);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd_to_send, sizeof(int));
    }
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != 2)
        die("sendmsg");
}

/* APUE's send_err: the message in one write, then send_fd(errcode). */
static void send_err(int errcode, const char *text)
{
    size_t n = strlen(text);
    if (n > 0 && write(sock, text, n) != (ssize_t)n)
        die("write");
    send_fd(errcode >= 0 ? -1 : errcode);
}

/* Split the request into arguments at blanks, as the book's buf_args. */
static int buf_args(char *buf, char **argv)
{
    int argc = 0;
    for (char *p = strtok(buf, " \t\n"); p != NULL; p = strtok(NULL, " \t\n")) {
        if (argc == MAXARGC - 1)
            return -1;
        argv[argc++] = p;
    }
    argv[argc] = NULL;
    return argc;
}

/* The book's handle_request: open the file, send it or the error. */
static void handle_request(char *request)
{
    char *argv[MAXARGC];
    char errmsg[MAXLINE + 64];
    int argc = buf_args(request, argv);
    if (argc != 3 || strcmp(argv[0], "open") != 0) {
        send_err(-1, "usage: open <pathname> <oflag>");
        return;
    }
    int fd = open(argv[1], atoi(argv[2]) | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(errmsg, sizeof(errmsg), "can't open %s: %s", argv[1], strerror(errno));
        send_err(-1, errmsg);
        return;
    }
    send_fd(fd);
    close(fd); /* the client has its own now */
}

int main(void)
{
    char buf[MAXLINE];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(sock, buf + have, sizeof(buf) - have);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        if (n == 0)
            return have == 0 ? 0 : 1; /* end of file, inside a request? */
        have += (size_t)n;
        /* A request ends with its NUL byte; a read may hold part of one. */
        char *end;
        while ((end = memchr(buf, '\0', have)) != NULL) {
            handle_request(buf);
            size_t used = (size_t)(end - buf) + 1;
            memmove(buf, end + 1, have - used);
            have -= used;
        }
        if (have == sizeof(buf)) {
            send_err(-1, "request not null terminated");
            have = 0;
        }
    }
}
