/*
 * attach.c: redeem a memplug attach ticket on the fd socket, map the region,
 * and print its first bytes. A complete client of proto/memplug/v1/fd-protocol.md.
 *
 *   cc -O2 -Wall -Wextra -o attach examples/attach.c
 *   ./attach FD_SOCKET TICKET [NBYTES]
 *
 * Prints the daemon's OK line, then NBYTES (default 16) bytes of the region
 * from offset 0 in hex. Exit status 0 on success, 1 on any failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int die(const char *what) {
    fprintf(stderr, "attach: %s: %s\n", what, strerror(errno));
    return 1;
}

/* Value of "key=" in an OK line, or NULL. */
static const char *field(const char *line, const char *key) {
    size_t n = strlen(key);
    for (const char *p = line; (p = strstr(p, key)) != NULL; p += n)
        if ((p == line || p[-1] == ' ') && p[n] == '=')
            return p + n + 1;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s FD_SOCKET TICKET [NBYTES]\n", argv[0]);
        return 2;
    }
    size_t nbytes = argc > 3 ? strtoull(argv[3], NULL, 0) : 16;

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return die("socket");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "attach: socket path too long\n");
        return 1;
    }
    strcpy(addr.sun_path, argv[1]);
    if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return die("connect");

    char request[256];
    int len = snprintf(request, sizeof(request), "MEMPLUG/1 ATTACH %s\n", argv[2]);
    if (len < 0 || (size_t)len >= sizeof(request) || write(sock, request, len) != len)
        return die("write");

    char line[4096] = {0};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = line, .iov_len = sizeof(line) - 1};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof(control.buf),
    };
    ssize_t got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (got <= 0)
        return die("recvmsg");
    close(sock);

    int fd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(&fd, CMSG_DATA(c), sizeof(int));
    line[strcspn(line, "\n")] = '\0';
    if (strncmp(line, "OK ", 3) != 0 || fd < 0) {
        fprintf(stderr, "attach: refused: %s\n", line);
        return 1;
    }
    printf("%s\n", line);

    const char *size_s = field(line, "size"), *access = field(line, "access");
    const char *backing = field(line, "backing");
    if (!size_s || !access || !backing) {
        fprintf(stderr, "attach: malformed OK line\n");
        return 1;
    }
    size_t size = strtoull(size_s, NULL, 10);
    int prot = PROT_READ | (strncmp(access, "rw", 2) == 0 ? PROT_WRITE : 0);
    int flags = MAP_SHARED | (strncmp(backing, "hugetlb", 7) == 0 ? MAP_NORESERVE : 0);
    unsigned char *mem = mmap(NULL, size, prot, flags, fd, 0);
    if (mem == MAP_FAILED)
        return die("mmap");
    if (nbytes > size)
        nbytes = size;
    for (size_t i = 0; i < nbytes; i++)
        printf("%02x", mem[i]);
    printf("\n");
    munmap(mem, size);
    close(fd);
    return 0;
}
