/*
 * consumer — the benchmark's consumer: a stand-in for `cocoon image import`
 * reading the assembled disk from its stdin.
 *
 * It exists so that every producer in the benchmarks (cloudimg, the Go
 * reference's shape, cat, the splice ceiling) feeds the same reader, one that
 * reads the way cocoon does: read() calls of 32 KiB on stdin until EOF. The
 * data is discarded, or, with -o FILE, written to FILE chunk by chunk with
 * write(), to model cocoon's copy of the stream into a temp file.
 *
 * Usage:
 *
 *   consumer [-c] [-o FILE]
 *
 *   -c       print the number of bytes read to stderr at EOF
 *   -o FILE  write every chunk to FILE (created or truncated, mode 0644)
 *
 * At EOF it prints nothing (unless -c) and exits 0; a read or write error is
 * reported on stderr with exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (32 * 1024)

static void usage(void)
{
    fprintf(stderr, "usage: consumer [-c] [-o FILE]\n");
    exit(2);
}

static void write_all(int fd, const char *buf, size_t len, const char *name)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "consumer: write %s: %s\n", name, strerror(errno));
            exit(1);
        }
        buf += n;
        len -= (size_t)n;
    }
}

int main(int argc, char **argv)
{
    static char buf[CHUNK];
    const char *out = NULL;
    int count = 0, opt, fd = -1;
    unsigned long long total = 0;

    while ((opt = getopt(argc, argv, "co:")) != -1) {
        switch (opt) {
        case 'c': count = 1; break;
        case 'o': out = optarg; break;
        default: usage();
        }
    }
    if (optind != argc)
        usage();

    if (out) {
        fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) {
            fprintf(stderr, "consumer: open %s: %s\n", out, strerror(errno));
            return 1;
        }
    }

    for (;;) {
        ssize_t n = read(STDIN_FILENO, buf, CHUNK);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "consumer: read stdin: %s\n", strerror(errno));
            return 1;
        }
        total += (unsigned long long)n;
        if (fd >= 0)
            write_all(fd, buf, (size_t)n, out);
    }

    if (fd >= 0 && close(fd) < 0) {
        fprintf(stderr, "consumer: close %s: %s\n", out, strerror(errno));
        return 1;
    }
    if (count)
        fprintf(stderr, "%llu\n", total);
    return 0;
}
