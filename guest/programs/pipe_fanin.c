/*
 * pipe_fanin — W writers, one reader, one pipe: atomic records, nothing lost.
 *
 * The program (P) makes one pipe and forks a reader (R) and W writer children
 * (-w, default 4).  Together the writers send B payload bytes (-b, default
 * 16 MiB = 16777216): writer w sends B/W bytes (the first B%W writers one
 * more) as records of at most PIPE_BUF (4096) bytes, each written with ONE
 * write(2), so each record arrives whole (writes <= PIPE_BUF are atomic).  A
 * record is a 24-byte header (magic, writer, seq, payload length, FNV-1a 32
 * checksum of the payload, padding) and 1..4072 payload bytes; its length and
 * contents are functions of (writer, seq), so the reader can recompute them.
 *
 * R reads the pipe in big chunks until EOF and checks every record: magic,
 * writer number, seq = the writer's next one (so no loss, no duplicate, no
 * reordering within a writer), length, checksum and every payload byte (so
 * no interleaving inside a record), no partial record at EOF, and that each
 * writer sent exactly its share.  Then R prints one line per writer and a
 * summary, and exits 0 (1 and an "error" line at the first bad record).  P
 * closes its ends, reaps the writers and R, checks every status is 0.
 *
 * Output:      writer <w>: records=<n> bytes=<b> fnv=<FNV-1a 64 of its payload, hex>
 *              ... (one line per writer, w = 0..W-1)
 *              reader: <B> bytes in <N> records from <W> writers: no loss, no duplicate, no interleaving
 *              parent: reaped <W> writers and the reader, all exited 0
 * The numbers depend only on -w and -b; the output is the same natively,
 * in a thread-fork VM and with VM-clone fork.  Children never use stdio
 * (their lines go out with one write(2) each).  Bad options: usage, exit 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROG "pipe_fanin"
#define MAGIC 0x4e494650u /* "PFIN" */
#define REC_MAX 4096
#define MAX_WRITERS 64

#include "guest_common.h"

struct hdr {
	uint32_t magic;
	uint32_t writer;
	uint32_t seq;
	uint32_t len;
	uint32_t sum;
	uint32_t pad;
};

#define PAYLOAD_MAX (REC_MAX - (int)sizeof(struct hdr))

_Static_assert(REC_MAX <= PIPE_BUF, "records must be written atomically");

static uint32_t mix(uint32_t w, uint32_t seq)
{
	uint32_t x = w * 0x9e3779b1u ^ (seq + 0x7f4a7c15u) * 0x85ebca6bu;

	x ^= x >> 15;
	x *= 0x2c1b3c6du;
	x ^= x >> 12;
	return x;
}

static unsigned char pattern(uint32_t w, uint32_t seq, uint32_t i)
{
	return (unsigned char)(w * 67u + seq * 13u + i * 7u + (i >> 8));
}

static uint32_t fnv32(const unsigned char *p, size_t n)
{
	uint32_t h = 0x811c9dc5u;

	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x01000193u;
	}
	return h;
}

static uint64_t share_of(uint64_t total, int writers, int w)
{
	return total / (uint64_t)writers + ((uint64_t)w < total % (uint64_t)writers ? 1 : 0);
}

static void writer(int fd, int w, uint64_t share)
{
	unsigned char rec[REC_MAX];
	struct hdr *h = (struct hdr *)rec;
	uint32_t seq = 0;

	while (share > 0) {
		uint32_t len = 1 + mix((uint32_t)w, seq) % (uint32_t)PAYLOAD_MAX;
		if (len > share)
			len = (uint32_t)share;
		for (uint32_t i = 0; i < len; i++)
			rec[sizeof *h + i] = pattern((uint32_t)w, seq, i);
		h->magic = MAGIC;
		h->writer = (uint32_t)w;
		h->seq = seq;
		h->len = len;
		h->sum = fnv32(rec + sizeof *h, len);
		h->pad = 0;
		size_t n = sizeof *h + len;
		ssize_t r;
		do
			r = write(fd, rec, n);
		while (r < 0 && errno == EINTR);
		if (r < 0)
			DIE_ERRNO("writer: write");
		if ((size_t)r != n) {
			char buf[128];
			snprintf(buf, sizeof buf, "writer %d: short write %zd of %zu\n", w, r, n);
			say(buf);
			_exit(1);
		}
		share -= len;
		seq++;
	}
	_exit(0);
}

struct tally {
	uint32_t records;
	uint64_t bytes;
	uint64_t fnv;
};

static __attribute__((noreturn)) void bad(const char *fmt, uint32_t a, uint32_t b)
{
	char msg[200], line[256];

	snprintf(msg, sizeof msg, fmt, a, b);
	snprintf(line, sizeof line, "reader: error: %s\n", msg);
	say(line);
	_exit(1);
}

static void reader(int fd, int writers, uint64_t total)
{
	static unsigned char buf[1 << 16];
	struct tally t[MAX_WRITERS];
	size_t have = 0;
	uint64_t all = 0;
	uint32_t records = 0;
	char line[256];

	memset(t, 0, sizeof t);
	for (int w = 0; w < writers; w++)
		t[w].fnv = 0xcbf29ce484222325ull;
	for (;;) {
		ssize_t r = read(fd, buf + have, sizeof buf - have);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			DIE_ERRNO("reader: read");
		}
		if (r == 0)
			break;
		have += (size_t)r;
		size_t off = 0;
		while (have - off >= sizeof(struct hdr)) {
			struct hdr h;
			memcpy(&h, buf + off, sizeof h);
			if (h.magic != MAGIC)
				bad("bad magic %#x after %u records", h.magic, records);
			if (h.writer >= (uint32_t)writers)
				bad("writer %u out of range (record %u)", h.writer, records);
			if (h.len < 1 || h.len > (uint32_t)PAYLOAD_MAX)
				bad("bad length %u (record %u)", h.len, records);
			if (have - off < sizeof h + h.len)
				break; /* the rest of this record comes with the next read */
			struct tally *tw = &t[h.writer];
			if (h.seq != tw->records)
				bad("seq %u where %u was due: lost or duplicated record", h.seq,
				    tw->records);
			const unsigned char *p = buf + off + sizeof h;
			if (fnv32(p, h.len) != h.sum)
				bad("checksum mismatch in record %u of writer %u", h.seq, h.writer);
			uint32_t want = 1 + mix(h.writer, h.seq) % (uint32_t)PAYLOAD_MAX;
			if (h.len != want && tw->bytes + h.len != share_of(total, writers, (int)h.writer))
				bad("record %u has an unexpected length %u", h.seq, h.len);
			for (uint32_t i = 0; i < h.len; i++) {
				if (p[i] != pattern(h.writer, h.seq, i))
					bad("record %u: byte %u is foreign (interleaved write?)", h.seq, i);
				tw->fnv ^= p[i];
				tw->fnv *= 0x100000001b3ull;
			}
			tw->records++;
			tw->bytes += h.len;
			all += h.len;
			records++;
			off += sizeof h + h.len;
		}
		memmove(buf, buf + off, have - off);
		have -= off;
	}
	if (have != 0)
		bad("%u bytes of a partial record at EOF (after %u records)", (uint32_t)have, records);
	for (int w = 0; w < writers; w++) {
		if (t[w].bytes != share_of(total, writers, w))
			bad("writer %u sent a wrong number of bytes (%u)", (uint32_t)w,
			    (uint32_t)t[w].bytes);
		snprintf(line, sizeof line, "writer %d: records=%u bytes=%llu fnv=%016llx\n", w,
			 t[w].records, (unsigned long long)t[w].bytes, (unsigned long long)t[w].fnv);
		say(line);
	}
	snprintf(line, sizeof line,
		 "reader: %llu bytes in %u records from %d writers: no loss, no duplicate, "
		 "no interleaving\n",
		 (unsigned long long)all, records, writers);
	say(line);
	_exit(0);
}

int main(int argc, char **argv)
{
	int writers = 4, opt, fd[2];
	uint64_t total = 16u << 20;
	pid_t pids[MAX_WRITERS + 1];

	top_pid = getpid();

	while ((opt = getopt(argc, argv, "w:b:")) != -1) {
		switch (opt) {
		case 'w': writers = atoi(optarg); break;
		case 'b': total = strtoull(optarg, NULL, 10); break;
		default: writers = -1; break;
		}
	}
	if (writers < 1 || writers > MAX_WRITERS || optind != argc) {
		fprintf(stderr, "usage: pipe_fanin [-w writers (1..%d)] [-b total bytes]\n",
			MAX_WRITERS);
		return 2;
	}
	xpipe(fd);
	for (int i = 0; i <= writers; i++) {
		pid_t pid = xfork();
		if (pid == 0) {
			if (i == 0) {
				close(fd[1]);
				reader(fd[0], writers, total);
			}
			close(fd[0]);
			writer(fd[1], i - 1, share_of(total, writers, i - 1));
		}
		pids[i] = pid;
	}
	close(fd[0]);
	close(fd[1]);
	int ok = 1;
	for (int i = writers; i >= 0; i--) { /* writers first, the reader last */
		int st = xwaitpid(pids[i]);
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			printf("parent: %s %d ended with status 0x%x\n", i ? "writer" : "reader",
			       i - 1, st);
			ok = 0;
		}
	}
	if (!ok)
		return 1;
	printf("parent: reaped %d writers and the reader, all exited 0\n", writers);
	return 0;
}
