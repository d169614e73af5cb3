/* The gRPC backend of bench/h2_compare.py: an HTTP/2 server (h2c, prior knowledge) that answers
 * every stream the client ends with one gRPC unary reply: HEADERS (:status 200, content-type
 * application/grpc), DATA (one length-prefixed message, a protobuf string field 1 = "ok"), and
 * trailers (grpc-status 0) ending the stream. The request is not decoded: its headers and body are
 * skipped (no HPACK decoder is needed, as the replies use literals without indexing and so never
 * touch either side's dynamic table). It is meant to cost far less per call than any proxy in
 * front of it (no TLS, no allocation per stream, one write per batch of replies), so that the
 * proxies, not the backend, set the figures; a grpcio server costs more per call in Python than
 * the proxies do.
 *
 * HTTP/2 as far as this needs: the preface; SETTINGS (MAX_CONCURRENT_STREAMS 1000, the largest
 * initial stream window) and a connection WINDOW_UPDATE to the largest window, both refilled
 * as DATA arrives; SETTINGS and PING acknowledged; CONTINUATION; the peer's connection window
 * respected (replies wait in a queue while it is spent; a reply's 9 bytes of DATA always fit a
 * new stream's window); GOAWAY and RST_STREAM need nothing here. Single-threaded, epoll.
 *
 * SIGUSR1 prints "answered N accepted M" to stderr (streams answered, connections accepted: the
 * harness checks that every call a proxy answered reached the backend, and counts the backend
 * connections each proxy opened); SIGTERM/SIGINT print it and exit.
 *
 * usage: grpc_responder PORT [ADDR]   (ADDR defaults to 127.0.0.1)
 * build: gcc -O2 -o grpc_responder grpc_responder.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_CHUNK 65536
#define MAX_WINDOW 0x7fffffff
#define REFILL_AT (1u << 30) /* DATA received before the connection window is refilled */

static const char PREFACE[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define PREFACE_LEN 24

static volatile sig_atomic_t report, stop;
static void on_signal(int sig) {
    if (sig == SIGUSR1)
        report = 1;
    else
        stop = 1;
}

/* HPACK: ":status: 200" (static index 8), then "content-type: application/grpc" as a literal
 * without indexing, name from static index 31 (4-bit prefix: 15, then 16). */
static const unsigned char REPLY_HEADERS[] = {
    0x88, 0x0f, 0x10, 16, 'a', 'p', 'p', 'l', 'i', 'c', 'a', 't', 'i', 'o', 'n', '/', 'g', 'r', 'p', 'c',
};
/* One gRPC message: not compressed, length 4, protobuf field 1 (string) = "ok". */
static const unsigned char REPLY_MESSAGE[] = {0, 0, 0, 0, 4, 0x0a, 2, 'o', 'k'};
/* "grpc-status: 0", a literal without indexing with a new name. */
static const unsigned char REPLY_TRAILERS[] = {
    0x00, 11, 'g', 'r', 'p', 'c', '-', 's', 't', 'a', 't', 'u', 's', 1, '0',
};

struct buf {
    unsigned char *p;
    size_t len, cap;
};

struct conn {
    int fd;
    int preface_seen;
    int want_out; /* EPOLLOUT registered */
    struct buf in, out;
    int64_t send_window;   /* the peer's connection window for our DATA */
    uint64_t recv_unacked; /* DATA received since the last connection WINDOW_UPDATE */
    uint32_t cont_stream;  /* a HEADERS block waiting for its CONTINUATION, or 0 */
    int cont_end_stream;
    uint32_t *queue; /* streams ended by the client whose reply waits for window */
    size_t queued, queue_cap;
};

static unsigned long long answered, accepted;

static void put(struct buf *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p) {
            perror("realloc");
            exit(1);
        }
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void frame(struct buf *b, uint8_t type, uint8_t flags, uint32_t stream, const void *payload, size_t n) {
    unsigned char h[9] = {
        (unsigned char)(n >> 16), (unsigned char)(n >> 8), (unsigned char)n, type, flags,
        (unsigned char)(stream >> 24), (unsigned char)(stream >> 16), (unsigned char)(stream >> 8),
        (unsigned char)stream,
    };
    put(b, h, 9);
    if (n)
        put(b, payload, n);
}

static void window_update(struct buf *b, uint32_t stream, uint32_t increment) {
    unsigned char p[4] = {
        (unsigned char)(increment >> 24), (unsigned char)(increment >> 16),
        (unsigned char)(increment >> 8), (unsigned char)increment,
    };
    frame(b, 8, 0, stream, p, 4);
}

static void reply(struct conn *c, uint32_t stream) {
    frame(&c->out, 1, 0x4, stream, REPLY_HEADERS, sizeof REPLY_HEADERS);           /* END_HEADERS */
    frame(&c->out, 0, 0, stream, REPLY_MESSAGE, sizeof REPLY_MESSAGE);             /* DATA */
    frame(&c->out, 1, 0x5, stream, REPLY_TRAILERS, sizeof REPLY_TRAILERS);         /* END_STREAM | END_HEADERS */
    c->send_window -= sizeof REPLY_MESSAGE;
    answered++;
}

static void ended(struct conn *c, uint32_t stream) {
    if (c->queued == 0 && c->send_window >= (int64_t)sizeof REPLY_MESSAGE) {
        reply(c, stream);
        return;
    }
    if (c->queued == c->queue_cap) {
        c->queue_cap = c->queue_cap ? 2 * c->queue_cap : 64;
        c->queue = realloc(c->queue, c->queue_cap * sizeof *c->queue);
        if (!c->queue) {
            perror("realloc");
            exit(1);
        }
    }
    c->queue[c->queued++] = stream;
}

static void drain_queue(struct conn *c) {
    size_t i = 0;
    while (i < c->queued && c->send_window >= (int64_t)sizeof REPLY_MESSAGE)
        reply(c, c->queue[i++]);
    memmove(c->queue, c->queue + i, (c->queued - i) * sizeof *c->queue);
    c->queued -= i;
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Handles the frames buffered in c->in; 0, or -1 to close the connection. */
static int frames(struct conn *c) {
    size_t off = 0;
    if (!c->preface_seen) {
        if (c->in.len < PREFACE_LEN)
            return 0;
        if (memcmp(c->in.p, PREFACE, PREFACE_LEN) != 0)
            return -1;
        c->preface_seen = 1;
        off = PREFACE_LEN;
    }
    while (c->in.len - off >= 9) {
        const unsigned char *h = c->in.p + off;
        size_t n = ((size_t)h[0] << 16) | ((size_t)h[1] << 8) | h[2];
        uint8_t type = h[3], flags = h[4];
        uint32_t stream = be32(h + 5) & 0x7fffffff;
        if (c->in.len - off < 9 + n)
            break;
        const unsigned char *p = h + 9;
        off += 9 + n;
        if (c->cont_stream && type != 9)
            return -1; /* a header block must go on in CONTINUATION frames */
        switch (type) {
        case 0: /* DATA */
            c->recv_unacked += n;
            if (c->recv_unacked >= REFILL_AT) {
                window_update(&c->out, 0, (uint32_t)c->recv_unacked);
                c->recv_unacked = 0;
            }
            if (flags & 0x1)
                ended(c, stream);
            break;
        case 1: /* HEADERS */
            if (!(flags & 0x4)) {
                c->cont_stream = stream;
                c->cont_end_stream = flags & 0x1;
            } else if (flags & 0x1) {
                ended(c, stream);
            }
            break;
        case 9: /* CONTINUATION */
            if (stream != c->cont_stream)
                return -1;
            if (flags & 0x4) {
                c->cont_stream = 0;
                if (c->cont_end_stream)
                    ended(c, stream);
            }
            break;
        case 4: /* SETTINGS */
            if (!(flags & 0x1))
                frame(&c->out, 4, 0x1, 0, NULL, 0);
            break;
        case 6: /* PING */
            if (!(flags & 0x1) && n == 8)
                frame(&c->out, 6, 0x1, 0, p, 8);
            break;
        case 8: /* WINDOW_UPDATE */
            if (stream == 0 && n == 4) {
                c->send_window += be32(p) & 0x7fffffff;
                drain_queue(c);
            }
            break;
        default: /* PRIORITY, RST_STREAM, GOAWAY, PUSH_PROMISE, unknown: nothing to do */
            break;
        }
    }
    memmove(c->in.p, c->in.p + off, c->in.len - off);
    c->in.len -= off;
    return 0;
}

static void close_conn(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in.p);
    free(c->out.p);
    free(c->queue);
    free(c);
}

/* Writes what c->out holds; -1 on a broken connection. */
static int flush(int ep, struct conn *c) {
    size_t done = 0;
    while (done < c->out.len) {
        ssize_t w = write(c->fd, c->out.p + done, c->out.len - done);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            return -1;
        }
        done += (size_t)w;
    }
    memmove(c->out.p, c->out.p + done, c->out.len - done);
    c->out.len -= done;
    int want = c->out.len > 0;
    if (want != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
    return 0;
}

static void on_readable(int ep, struct conn *c) {
    for (;;) {
        if (c->in.cap - c->in.len < READ_CHUNK) {
            c->in.cap = c->in.len + READ_CHUNK;
            c->in.p = realloc(c->in.p, c->in.cap);
            if (!c->in.p) {
                perror("realloc");
                exit(1);
            }
        }
        size_t room = c->in.cap - c->in.len;
        ssize_t r = read(c->fd, c->in.p + c->in.len, room);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            break;
        if (r <= 0) { /* EOF or an error */
            close_conn(ep, c);
            return;
        }
        c->in.len += (size_t)r;
        if ((size_t)r < room)
            break; /* a short read: the socket is empty for now */
    }
    if (frames(c) < 0 || flush(ep, c) < 0)
        close_conn(ep, c);
}

static void on_accept(int ep, int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            return;
        }
        c->fd = fd;
        c->send_window = 65535;
        accepted++;
        /* SETTINGS: MAX_CONCURRENT_STREAMS 1000, INITIAL_WINDOW_SIZE 2^31-1; then the
         * connection window to 2^31-1 too. */
        unsigned char s[12] = {0, 3, 0, 0, 0x03, 0xe8, 0, 4, 0x7f, 0xff, 0xff, 0xff};
        frame(&c->out, 4, 0, 0, s, sizeof s);
        window_update(&c->out, 0, MAX_WINDOW - 65535);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        if (flush(ep, c) < 0)
            close_conn(ep, c);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [ADDR]\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    if (inet_pton(AF_INET, argc > 2 ? argv[2] : "127.0.0.1", &addr.sin_addr) != 1) {
        fprintf(stderr, "bad address\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    static int listener_tag;
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event evs[256];
    while (!stop) {
        int n = epoll_wait(ep, evs, 256, 100); /* a SIGUSR1 between two waits is seen within 100 ms */
        if (report) {
            report = 0;
            fprintf(stderr, "answered %llu accepted %llu\n", answered, accepted);
        }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &listener_tag) {
                on_accept(ep, lfd);
                continue;
            }
            struct conn *c = evs[i].data.ptr;
            if (evs[i].events & EPOLLOUT) {
                if (flush(ep, c) < 0) {
                    close_conn(ep, c);
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                on_readable(ep, c);
        }
    }
    fprintf(stderr, "answered %llu accepted %llu\n", answered, accepted);
    return 0;
}
