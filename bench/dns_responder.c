/* The DNS backend of bench/udp_compare.py: answers every standard query on a UDP port with the
 * question echoed and one fixed A record (127.0.0.1, TTL 3600), NOERROR, authoritative. No zone,
 * no lookup, no EDNS in the answer (an OPT record in the query is dropped). Single-threaded;
 * recvmmsg waits for the first datagram and takes what else is queued (up to BATCH), and the
 * answers leave in one sendmmsg. It is meant to cost far less per query than any proxy in front
 * of it, so that the proxies, not the backend, set the figures.
 *
 * SIGUSR1 prints "answered N dropped M" to stderr (the harness checks that every query a proxy
 * answered reached the backend, so nothing was cached); SIGTERM/SIGINT print it and exit.
 *
 * usage: dns_responder PORT [ADDR]   (ADDR defaults to 127.0.0.1)
 * build: gcc -O2 -o dns_responder dns_responder.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define QMAX 4096 /* longer queries are dropped */
#define RECORD 16 /* the answer: name pointer, type, class, ttl, rdlength, rdata */

static volatile sig_atomic_t report, stop;
static void on_signal(int sig) {
    if (sig == SIGUSR1)
        report = 1;
    else
        stop = 1;
}

static const unsigned char A_RECORD[RECORD] = {
    0xc0, 0x0c,             /* the name: a pointer to the question's name at offset 12 */
    0x00, 0x01, 0x00, 0x01, /* type A, class IN */
    0x00, 0x00, 0x0e, 0x10, /* TTL 3600 */
    0x00, 0x04, 127, 0, 0, 1,
};

/* The answer to q (len bytes) into r; its length, or 0 to drop it. */
static size_t answer(const unsigned char *q, size_t len, unsigned char *r) {
    if (len < 12 || (q[2] & 0x80)) /* too short, or a response */
        return 0;
    int opcode = (q[2] >> 3) & 0x0f;
    int qdcount = (q[4] << 8) | q[5];
    size_t end = 12;
    int ok = opcode == 0 && qdcount == 1;
    if (ok) { /* the question: labels to the root, then type and class */
        while (end < len && q[end] != 0) {
            if (q[end] > 63) { ok = 0; break; } /* no compression in a question */
            end += 1 + q[end];
        }
        end += 1 + 4;
        ok = ok && end <= len;
    }
    if (!ok) { /* header only: NOTIMP for other opcodes, FORMERR for the rest */
        memcpy(r, q, 12);
        r[2] = 0x80 | (q[2] & 0x79);
        r[3] = opcode != 0 ? 4 : 1;
        memset(r + 4, 0, 8);
        return 12;
    }
    int qtype = (q[end - 4] << 8) | q[end - 3];
    int with_a = qtype == 1 || qtype == 255; /* A or ANY; other types: NOERROR, no data */
    memcpy(r, q, end);
    r[2] = 0x84 | (q[2] & 0x01); /* QR, opcode QUERY, AA, RD as asked */
    r[3] = 0x80;                 /* RA, NOERROR */
    r[6] = 0, r[7] = with_a;     /* ANCOUNT */
    r[8] = r[9] = r[10] = r[11] = 0;
    if (!with_a)
        return end;
    memcpy(r + end, A_RECORD, RECORD);
    return end + RECORD;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [ADDR]\n", argv[0]);
        return 2;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_signal; /* no SA_RESTART: recvmmsg returns EINTR */
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    int one = 1, size = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Room for bursts: FORCE needs CAP_NET_ADMIN, else the sysctl maximum applies. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (inet_pton(AF_INET, argc > 2 ? argv[2] : "127.0.0.1", &addr.sin_addr) != 1) {
        fprintf(stderr, "bad address\n");
        return 2;
    }
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }

    static unsigned char in[BATCH][QMAX], out[BATCH][QMAX + RECORD];
    static struct sockaddr_in from[BATCH];
    static struct iovec in_iov[BATCH], out_iov[BATCH];
    static struct mmsghdr in_msg[BATCH], out_msg[BATCH];
    for (int i = 0; i < BATCH; i++) {
        in_iov[i] = (struct iovec){in[i], QMAX};
        in_msg[i].msg_hdr.msg_iov = &in_iov[i];
        in_msg[i].msg_hdr.msg_iovlen = 1;
        in_msg[i].msg_hdr.msg_name = &from[i];
        out_iov[i].iov_base = out[i];
        out_msg[i].msg_hdr.msg_iov = &out_iov[i];
        out_msg[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long answered = 0, dropped = 0;
    for (;;) {
        if (report || stop) {
            fprintf(stderr, "answered %llu dropped %llu\n", answered, dropped);
            report = 0;
            if (stop)
                return 0;
        }
        for (int i = 0; i < BATCH; i++) {
            in_msg[i].msg_hdr.msg_namelen = sizeof from[i];
            in_msg[i].msg_hdr.msg_flags = 0;
        }
        int n = recvmmsg(fd, in_msg, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("recvmmsg");
            return 1;
        }
        int m = 0;
        for (int i = 0; i < n; i++) {
            size_t len = (in_msg[i].msg_hdr.msg_flags & MSG_TRUNC) ? 0 : in_msg[i].msg_len;
            size_t r = answer(in[i], len, out[m]);
            if (!r) {
                dropped++;
                continue;
            }
            out_iov[m].iov_len = r;
            out_msg[m].msg_hdr.msg_name = &from[i];
            out_msg[m].msg_hdr.msg_namelen = in_msg[i].msg_hdr.msg_namelen;
            m++;
        }
        for (int sent = 0; sent < m;) {
            int k = sendmmsg(fd, out_msg + sent, m - sent, 0);
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                dropped++; /* this one failed (e.g. its client's port is gone): skip it */
                sent++;
                continue;
            }
            sent += k;
            answered += k;
        }
    }
}
