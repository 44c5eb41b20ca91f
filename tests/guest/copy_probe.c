/*
 * copy_probe — what a POSIX fork must make private, checked from the parent.
 *
 * copy_probe private: (NuttX-style) the child writes an initialised global
 *     (.data), a zero global (.bss), a heap block reachable only from a
 *     global, a heap block reachable only through another heap block, and a
 *     static pointer to a string literal; it checks that it sees its own
 *     writes and exits 0.  The parent, after reaping it, prints what it sees.
 *     Natively:  data=1 bss=0 heap=1 heap2=1 lit=parent child=ok
 * copy_probe stdio full|line|none: stdout gets that buffering (setvbuf), a
 *     line and an unterminated piece are written before fork, then each side
 *     writes its own line and exits through exit() (which flushes).  Natively
 *     a full or line buffer holds data at fork, so both processes print it.
 * copy_probe enomem MIB: the parent fills MIB MiB of heap (through a global),
 *     then forks: the child cannot get a copy, so fork fails with ENOMEM and
 *     the parent goes on.  Prints "fork: ENOMEM, parent goes on" (or, where
 *     memory is plenty, as natively, "fork: ok").
 * copy_probe text N: N children in turn each call a function of the program
 *     (it returns 1), then patch its code to return 2 (the page made writable
 *     with mprotect natively; in a VM every page is) and call it again; the
 *     parent calls it after each child.  A child's patch is its own: natively
 *     text is copy-on-write; in copy fork the next child gets a copy of the
 *     parent's text even where it reuses the pages an earlier child ran from.
 *     Natively, for N = 3:  child: 1 then 2 (x3), then parent: 1
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static int data_var = 1;
static int bss_var;
static int *heap_from_global;
static int **heap_second;
static const char *lit = "parent";

static int reap(pid_t pid)
{
	int st;
	if (waitpid(pid, &st, 0) != pid)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int probe_private(void)
{
	heap_from_global = malloc(sizeof *heap_from_global);
	heap_second = malloc(sizeof *heap_second);
	*heap_second = malloc(sizeof **heap_second);
	*heap_from_global = 1;
	**heap_second = 1;
	pid_t pid = fork();
	if (pid < 0)
		return perror("fork"), 1;
	if (pid == 0) {
		data_var = 2;
		bss_var = 2;
		*heap_from_global = 2;
		**heap_second = 2;
		lit = "child";
		int ok = data_var == 2 && bss_var == 2 && *heap_from_global == 2 &&
			 **heap_second == 2 && strcmp(lit, "child") == 0;
		_exit(ok ? 0 : 3);
	}
	int rc = reap(pid);
	printf("data=%d bss=%d heap=%d heap2=%d lit=%s child=%s\n", data_var, bss_var,
	       *heap_from_global, **heap_second, lit, rc == 0 ? "ok" : "bad");
	return 0;
}

static int probe_stdio(const char *how)
{
	static char buf[BUFSIZ];
	int mode = !strcmp(how, "full") ? _IOFBF : !strcmp(how, "line") ? _IOLBF : _IONBF;
	setvbuf(stdout, mode == _IONBF ? NULL : buf, mode, sizeof buf);
	printf("before fork (%s)\n", how);
	printf("pending: ");
	pid_t pid = fork();
	if (pid < 0)
		return perror("fork"), 1;
	if (pid == 0) {
		printf("child\n");
		exit(0);
	}
	reap(pid);
	printf("parent\n");
	return 0;
}

static int probe_enomem(long mib)
{
	/* a global keeps the blocks reachable, as a real program's would be */
	static void *blocks[4096];
	long n = mib > 4096 ? 4096 : mib;
	for (long i = 0; i < n; i++) {
		blocks[i] = malloc(1 << 20);
		if (!blocks[i])
			return printf("malloc failed at %ld MiB\n", i), 1;
		memset(blocks[i], (int)i, 1 << 20);
	}
	pid_t pid = fork();
	if (pid < 0) {
		printf("fork: %s, parent goes on\n", errno == ENOMEM ? "ENOMEM" : strerror(errno));
		return 0;
	}
	if (pid == 0)
		_exit(0);
	reap(pid);
	printf("fork: ok\n");
	return 0;
}

static __attribute__((noinline, aligned(64))) int answer(void)
{
	__asm__ volatile("" ::: "memory");
	return 1;
}

static int probe_text(int n)
{
	/* mov eax, 2; ret */
	static const unsigned char patch[] = { 0xb8, 0x02, 0x00, 0x00, 0x00, 0xc3 };
	int (*volatile fn)(void) = answer;
	for (int i = 0; i < n; i++) {
		fflush(stdout);
		pid_t pid = fork();
		if (pid < 0)
			return printf("fork: %s\n", strerror(errno)), 1;
		if (pid == 0) {
			int before = fn();
			unsigned long page = (unsigned long)(void *)answer & ~4095UL;
			if (mprotect((void *)page, 8192, PROT_READ | PROT_WRITE | PROT_EXEC))
				_exit(3);
			memcpy((void *)answer, patch, sizeof patch);
			__builtin___clear_cache((char *)answer, (char *)answer + sizeof patch);
			printf("child: %d then %d\n", before, fn());
			fflush(stdout);
			_exit(0);
		}
		if (reap(pid) != 0)
			return printf("child %d failed\n", i), 1;
		if (fn() != 1)
			return printf("parent: the child's patch reached the parent\n"), 1;
	}
	printf("parent: %d\n", fn());
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "private"))
		return probe_private();
	if (argc >= 3 && !strcmp(argv[1], "stdio"))
		return probe_stdio(argv[2]);
	if (argc >= 3 && !strcmp(argv[1], "enomem"))
		return probe_enomem(atol(argv[2]));
	if (argc >= 3 && !strcmp(argv[1], "text"))
		return probe_text(atoi(argv[2]));
	fprintf(stderr, "usage: copy_probe private | stdio full|line|none | enomem MIB | text N\n");
	return 2;
}
