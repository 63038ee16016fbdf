/*
 * tcp_ceiling — the throughput ceiling for serving a file over loopback HTTP.
 *
 * The least an HTTP/1.1 file server can do: for each GET, open the file,
 * write the response head, and have the kernel move the body into the socket
 * with sendfile(2) — no hashing, no lease, no user-space copy of the body,
 * no logging. It is the yardstick of the registry and serve scenarios: no
 * server in front of a loopback client can beat it.
 *
 *   tcp_ceiling ROOT        (prints http://127.0.0.1:PORT on stdout)
 *
 * GET /NAME serves ROOT/NAME (a NAME with ".." is refused). A header
 * "Range: bytes=FIRST-LAST" (or "bytes=FIRST-") gets a 206 with that range;
 * anything else the whole file with Content-Length. Connections are kept
 * alive (HTTP/1.1) until the client closes them or sends "Connection: close";
 * one thread per connection. Errors on a connection end that connection.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static int root_fd;

/* write_all: the whole buffer into fd, MSG_MORE when a body follows. */
static int write_all(int fd, const char *buf, size_t len, int more)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL | (more ? MSG_MORE : 0));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* header: the value of header NAME in the request head, or NULL. */
static const char *header(const char *head, const char *name)
{
    size_t len = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p; p = strstr(p + 2, "\r\n")) {
        if (strncasecmp(p + 2, name, len) == 0 && p[2 + len] == ':') {
            const char *v = p + 3 + len;
            while (*v == ' ')
                v++;
            return v;
        }
    }
    return NULL;
}

/* respond: answer one request head; -1 ends the connection. */
static int respond(int sock, char *head)
{
    char path[4096], out[512];
    if (sscanf(head, "GET %4095s HTTP/1.", path) != 1 || path[0] != '/' || strstr(path, "..")) {
        const char *bad = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        write_all(sock, bad, strlen(bad), 0);
        return -1;
    }
    int fd = openat(root_fd, path + 1, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        if (fd >= 0)
            close(fd);
        const char *nf = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        return write_all(sock, nf, strlen(nf), 0);
    }
    off_t first = 0, last = st.st_size - 1;
    int partial = 0;
    const char *range = header(head, "Range");
    if (range && strncmp(range, "bytes=", 6) == 0) {
        long long a, b;
        int got = sscanf(range + 6, "%lld-%lld", &a, &b);
        if (got >= 1 && a >= 0 && a < st.st_size) {
            first = a;
            if (got == 2 && b >= a && b < st.st_size)
                last = b;
            partial = 1;
        }
    }
    off_t len = last - first + 1;
    int n;
    if (partial)
        n = snprintf(out, sizeof out,
                     "HTTP/1.1 206 Partial Content\r\nContent-Length: %lld\r\n"
                     "Content-Range: bytes %lld-%lld/%lld\r\n\r\n",
                     (long long)len, (long long)first, (long long)last, (long long)st.st_size);
    else
        n = snprintf(out, sizeof out, "HTTP/1.1 200 OK\r\nContent-Length: %lld\r\n\r\n",
                     (long long)len);
    int rc = write_all(sock, out, (size_t)n, 1);
    off_t off = first;
    while (rc == 0 && off <= last) {
        ssize_t m = sendfile(sock, fd, &off, (size_t)(last + 1 - off));
        if (m < 0 && errno == EINTR)
            continue;
        if (m <= 0)
            rc = -1;
    }
    close(fd);
    const char *conn = header(head, "Connection");
    if (conn && strncasecmp(conn, "close", 5) == 0)
        return -1;
    return rc;
}

static void *connection(void *arg)
{
    int sock = (int)(long)arg;
    char buf[16384];
    size_t have = 0;
    for (;;) {
        char *end;
        buf[have] = 0;
        while (!(end = strstr(buf, "\r\n\r\n"))) {
            if (have == sizeof buf - 1)
                goto done;
            ssize_t n = recv(sock, buf + have, sizeof buf - 1 - have, 0);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                goto done;
            have += (size_t)n;
            buf[have] = 0;
        }
        end[2] = 0; /* the head, its last line ending kept for header() */
        if (respond(sock, buf) < 0)
            goto done;
        size_t used = (size_t)(end + 4 - buf);
        memmove(buf, buf + used, have - used);
        have -= used;
    }
done:
    close(sock);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: tcp_ceiling ROOT\n");
        return 2;
    }
    root_fd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0) {
        fprintf(stderr, "tcp_ceiling: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof addr;
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 1024) < 0 ||
        getsockname(ls, (struct sockaddr *)&addr, &alen) < 0) {
        fprintf(stderr, "tcp_ceiling: listen: %s\n", strerror(errno));
        return 1;
    }
    printf("http://127.0.0.1:%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (;;) {
        int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (s < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            fprintf(stderr, "tcp_ceiling: accept: %s\n", strerror(errno));
            return 1;
        }
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, connection, (void *)(long)s) != 0)
            close(s);
        pthread_attr_destroy(&attr);
    }
}
