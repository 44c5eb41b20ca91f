/*
 * prefork_server — a master and W prefork()ed workers sharing a job pipe.
 *
 * Checks: the master forks W workers (-w, default 4).  Jobs (J of them, -j,
 * default 200: "compute 1 + 2 + ... + k") go out as fixed 16-byte records on
 * ONE job pipe that all workers read (writes <= PIPE_BUF are atomic, and
 * every read asks for exactly one record, so records are never split or
 * interleaved); answers come back as 16-byte records on one answer pipe.  The
 * master keeps at most 32 jobs in flight (so neither pipe can fill up and
 * deadlock, whatever the pipe capacity), checks that every job is answered
 * exactly once and correctly, then sends one stop record per worker and reaps
 * all workers with status 0.  Which worker does which job is not printed.
 *
 * Output:      jobs=<J> ok
 * Thread-fork VM: identical output.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <limits.h>

#define PROG "prefork_server"
#define WINDOW 32

#include "guest_common.h"

struct rec {
	uint32_t kind; /* JOB, STOP or ANSWER */
	uint32_t id;   /* job id; for an answer: id of the job */
	uint64_t val;  /* job: k; answer: the sum */
};
enum { JOB = 1, STOP = 2, ANSWER = 3 };

_Static_assert(sizeof(struct rec) == 16, "record size");
_Static_assert(sizeof(struct rec) <= PIPE_BUF, "records must be written atomically");

static uint64_t job_k(uint32_t id)
{
	return 1 + (uint64_t)id * 37 % 1000;
}

static void worker(int jobs_rd, int ans_wr)
{
	struct rec r;

	for (;;) {
		ssize_t n = read(jobs_rd, &r, sizeof r);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			DIE_ERRNO("worker: read");
		if (n != (ssize_t)sizeof r)
			die("worker: read %zd bytes, expected one %zu-byte record", n, sizeof r);
		if (r.kind == STOP)
			_exit(0);
		if (r.kind != JOB)
			die("worker: bad record kind %u", r.kind);
		{
			uint64_t sum = 0;
			struct rec a;

			for (uint64_t i = 1; i <= r.val; i++)
				sum += i;
			a.kind = ANSWER;
			a.id = r.id;
			a.val = sum;
			write_full(ans_wr, &a, sizeof a);
		}
	}
}

int main(int argc, char **argv)
{
	int w = 4, jobs = 200, opt, jp[2], ap[2], i;
	int sent = 0, answered = 0;
	unsigned char *done;
	pid_t *pids;
	char who[64];

	top_pid = getpid();
	while ((opt = getopt(argc, argv, "w:j:")) != -1) {
		switch (opt) {
		case 'w': w = atoi(optarg); break;
		case 'j': jobs = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-w workers] [-j jobs]\n", argv[0]);
			return 2;
		}
	}
	if (w < 1 || jobs < 0)
		die("bad arguments");
	done = calloc((size_t)jobs + 1, 1);
	pids = malloc(sizeof *pids * (size_t)w);
	if (!done || !pids)
		die("malloc failed");
	xpipe(jp);
	xpipe(ap);
	for (i = 0; i < w; i++) {
		pid_t pid = xfork();
		if (pid == 0) {
			xclose(jp[1]);
			xclose(ap[0]);
			worker(jp[0], ap[1]);
		}
		pids[i] = pid;
	}
	xclose(jp[0]);
	xclose(ap[1]);

	while (answered < jobs) {
		struct rec r;

		while (sent < jobs && sent - answered < WINDOW) {
			r.kind = JOB;
			r.id = (uint32_t)sent;
			r.val = job_k((uint32_t)sent);
			write_full(jp[1], &r, sizeof r);
			sent++;
		}
		read_exact(ap[0], &r, sizeof r, "answer");
		if (r.kind != ANSWER || r.id >= (uint32_t)sent)
			die("bad answer record (kind %u, id %u)", r.kind, r.id);
		if (done[r.id])
			die("job %u answered twice", r.id);
		done[r.id] = 1;
		if (r.val != job_k(r.id) * (job_k(r.id) + 1) / 2)
			die("job %u: wrong answer %llu", r.id, (unsigned long long)r.val);
		answered++;
	}
	for (i = 0; i < w; i++) {
		struct rec r = { STOP, 0, 0 };
		write_full(jp[1], &r, sizeof r);
	}
	xclose(jp[1]);
	for (i = 0; i < w; i++) {
		snprintf(who, sizeof who, "worker %d", i);
		expect_exit(xwaitpid(pids[i]), 0, who);
	}
	{
		char extra;
		if (read_full(ap[0], &extra, 1) != 0)
			die("unexpected data on the answer pipe");
	}
	xclose(ap[0]);
	printf("jobs=%d ok\n", jobs);
	return 0;
}
