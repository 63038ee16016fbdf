/*
 * splice_ceiling — the throughput ceiling for "OCI layout -> pipe".
 *
 * It exists to give the benchmarks an upper bound that no verifying streamer
 * can beat: the files named on the command line are moved into stdout (which
 * must be a pipe) with splice(2) and nothing else — no hashing, no parsing,
 * no user-space copy. The pipe is first enlarged to 1 MiB with
 * fcntl(F_SETPIPE_SZ), then each file is spliced entirely, in order, with
 * splice(fd, &off, 1, NULL, 1 MiB, SPLICE_F_MORE) in a loop until EOF.
 *
 * Usage:
 *
 *   splice_ceiling FILE... | consumer
 *
 * For a layout, FILE... are the disk blobs (DIR/blobs/sha256/HEX) in stream
 * order. Any error (stdout not a pipe, a file that cannot be opened, a failed
 * splice) is reported on stderr with exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PIPE_SIZE (1 << 20)

static void die(const char *what, const char *name)
{
    if (name)
        fprintf(stderr, "splice_ceiling: %s %s: %s\n", what, name, strerror(errno));
    else
        fprintf(stderr, "splice_ceiling: %s: %s\n", what, strerror(errno));
    exit(1);
}

int main(int argc, char **argv)
{
    struct stat st;

    if (argc < 2) {
        fprintf(stderr, "usage: splice_ceiling FILE... | consumer\n");
        return 2;
    }
    if (fstat(STDOUT_FILENO, &st) < 0)
        die("fstat", "stdout");
    if (!S_ISFIFO(st.st_mode)) {
        fprintf(stderr, "splice_ceiling: stdout must be a pipe\n");
        return 1;
    }
    if (fcntl(STDOUT_FILENO, F_SETPIPE_SZ, PIPE_SIZE) < 0)
        die("F_SETPIPE_SZ 1 MiB on", "stdout");

    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        loff_t off = 0;
        int fd = open(name, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die("open", name);
        for (;;) {
            ssize_t n = splice(fd, &off, STDOUT_FILENO, NULL, PIPE_SIZE, SPLICE_F_MORE);
            if (n == 0)
                break;
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                die("splice", name);
            }
        }
        close(fd);
    }
    return 0;
}
