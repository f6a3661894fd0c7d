/* nginx_master: the master's side of nginx's process channel, in plain C.
 *
 * Written from nginx's public source, src/os/unix/ngx_channel.h and .c and
 * ngx_process_cycle.h:
 *
 *   typedef struct {
 *       ngx_uint_t  command;   (uintptr_t)
 *       ngx_pid_t   pid;       (pid_t)
 *       ngx_int_t   slot;      (intptr_t)
 *       ngx_fd_t    fd;        (int)
 *   } ngx_channel_t;           32 bytes on LP64 (x86-64, aarch64)
 *
 *   NGX_CMD_OPEN_CHANNEL 1, NGX_CMD_CLOSE_CHANNEL 2, NGX_CMD_QUIT 3,
 *   NGX_CMD_TERMINATE 4, NGX_CMD_REOPEN 5.
 *
 *   ngx_write_channel: one sendmsg of the whole struct, with ch->fd
 *     attached (SCM_RIGHTS) unless it is -1.
 *   ngx_read_channel: one recvmsg of sizeof(ngx_channel_t); fewer bytes is
 *     an error; for NGX_CMD_OPEN_CHANNEL a descriptor must be attached, and
 *     it replaces ch->fd (the number in the struct is the sender's).
 *
 * The channel is a socketpair(AF_UNIX, SOCK_STREAM), as in nginx. This
 * master runs with its channel to one worker (slot 0) as standard input,
 * and plays what nginx's master does when it starts another worker:
 *   1. makes a socket pair for the worker in slot 1 and sends worker 0
 *      NGX_CMD_OPEN_CHANNEL {pid, slot 1, fd} with one end of it, so that
 *      worker 0 can talk to worker 1;
 *   2. reads, as worker 1, what worker 0 sent there with ngx_read_channel:
 *      it must be NGX_CMD_OPEN_CHANNEL with a pipe; reads the pipe to its
 *      end and prints what it got;
 *   3. sends worker 0 NGX_CMD_REOPEN, then NGX_CMD_QUIT (no descriptors)
 *      and waits for its end of file.
 * Exit status 0 when all went as described, 1 otherwise.
 *
 * Build: cc -std=c11 -Wall -Wextra -O2 -o nginx_master nginx_master.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define NGX_CMD_OPEN_CHANNEL 1
#define NGX_CMD_QUIT 3
#define NGX_CMD_REOPEN 5

typedef struct {
    uintptr_t command;
    pid_t pid;
    intptr_t slot;
    int fd;
} ngx_channel_t;

static void die(const char *what)
{
    fprintf(stderr, "nginx_master: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

/* ngx_write_channel */
static void write_channel(int s, ngx_channel_t *ch)
{
    struct iovec iov = {.iov_base = ch, .iov_len = sizeof(*ch)};
    union {
        struct cmsghdr cm;
        char space[CMSG_SPACE(sizeof(int))];
    } cmsg;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (ch->fd != -1) {
        memset(&cmsg, 0, sizeof(cmsg));
        msg.msg_control = cmsg.space;
        msg.msg_controllen = sizeof(cmsg.space);
        cmsg.cm.cmsg_len = CMSG_LEN(sizeof(int));
        cmsg.cm.cmsg_level = SOL_SOCKET;
        cmsg.cm.cmsg_type = SCM_RIGHTS;
        memcpy(CMSG_DATA(&cmsg.cm), &ch->fd, sizeof(int));
    }
    if (sendmsg(s, &msg, MSG_NOSIGNAL) != (ssize_t)sizeof(*ch))
        die("sendmsg() of a channel message");
}

/* ngx_read_channel: 0 on success, -1 at end of file. */
static int read_channel(int s, ngx_channel_t *ch)
{
    struct iovec iov = {.iov_base = ch, .iov_len = sizeof(*ch)};
    union {
        struct cmsghdr cm;
        char space[CMSG_SPACE(sizeof(int))];
    } cmsg;
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = cmsg.space,
        .msg_controllen = sizeof(cmsg.space),
    };
    ssize_t n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0)
        die("recvmsg()");
    if (n == 0)
        return -1;
    if ((size_t)n < sizeof(*ch)) {
        errno = 0;
        die("recvmsg() returned not enough data");
    }
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        errno = 0;
        die("recvmsg() truncated data");
    }
    if (ch->command == NGX_CMD_OPEN_CHANNEL) {
        if (msg.msg_controllen < CMSG_LEN(sizeof(int)) || cmsg.cm.cmsg_level != SOL_SOCKET
            || cmsg.cm.cmsg_type != SCM_RIGHTS) {
            errno = 0;
            die("recvmsg() returned no descriptor with NGX_CMD_OPEN_CHANNEL");
        }
        memcpy(&ch->fd, CMSG_DATA(&cmsg.cm), sizeof(int));
    }
    return 0;
}

int main(void)
{
    _Static_assert(sizeof(ngx_channel_t) == 32, "ngx_channel_t is 32 bytes on LP64");
    int worker0 = STDIN_FILENO;
    int worker1[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, worker1) < 0)
        die("socketpair()");

    /* 1. Tell worker 0 about worker 1's channel. */
    ngx_channel_t ch;
    memset(&ch, 0, sizeof(ch));
    ch.command = NGX_CMD_OPEN_CHANNEL;
    ch.pid = getpid();
    ch.slot = 1;
    ch.fd = worker1[0];
    write_channel(worker0, &ch);
    close(worker1[0]); /* worker 0 has its own copy now */

    /* 2. As worker 1: what did worker 0 send on that channel? */
    memset(&ch, 0, sizeof(ch));
    if (read_channel(worker1[1], &ch) < 0) {
        errno = 0;
        die("worker 0 closed the slot 1 channel without a message");
    }
    if (ch.command != NGX_CMD_OPEN_CHANNEL) {
        errno = 0;
        die("worker 0 sent slot 1 something else than NGX_CMD_OPEN_CHANNEL");
    }
    char text[256];
    size_t have = 0;
    ssize_t n;
    while ((n = read(ch.fd, text + have, sizeof(text) - 1 - have)) > 0)
        have += (size_t)n;
    if (n < 0)
        die("read() of the pipe from worker 0");
    text[have] = '\0';
    printf("slot 1 got NGX_CMD_OPEN_CHANNEL from pid %ld (slot %ld) with a pipe: %s",
           (long)ch.pid, (long)ch.slot, text);
    close(ch.fd);
    close(worker1[1]);

    /* 3. Reopen the logs, then quit. */
    memset(&ch, 0, sizeof(ch));
    ch.command = NGX_CMD_REOPEN;
    ch.pid = getpid();
    ch.fd = -1;
    write_channel(worker0, &ch);
    ch.command = NGX_CMD_QUIT;
    write_channel(worker0, &ch);
    char byte;
    while ((n = read(worker0, &byte, 1)) > 0) {
    }
    if (n < 0)
        die("read() of worker 0's end of file");
    printf("worker 0 closed its channel after NGX_CMD_QUIT\n");
    return 0;
}
