/*
 * The vDSO's clock across fork, and a guest that overwrites its clock page
 * (tests/test_vclock.py).
 *
 *   clock_fork fork     a child forked after the parent read CLOCK_MONOTONIC reads
 *                       a time no earlier (in VM-clone mode the child's VM goes on
 *                       from the page its snapshot carried)
 *   clock_fork corrupt  (VM only: Linux's vvar page is read-only) 0xff over the
 *                       page before the vDSO; the clock syscalls still give the
 *                       kernel's time, which the guest cannot touch, also in a
 *                       child forked then
 */
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long raw(clockid_t clk)
{
	struct timespec ts;
	syscall(SYS_clock_gettime, clk, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "fork")) {
		long long before = mono();
		pid_t pid = fork();
		if (pid == 0) {
			long long after = mono();
			printf("child: its clock no earlier than the parent's before fork: %s\n",
			       after >= before ? "yes" : "no");
			fflush(stdout);
			_exit(0);
		}
		int st;
		waitpid(pid, &st, 0);
		printf("parent: after wait, later still: %s\n", mono() >= before ? "yes" : "no");
		return 0;
	}
	if (argc > 1 && !strcmp(argv[1], "corrupt")) {
		unsigned char *ehdr = (unsigned char *)getauxval(AT_SYSINFO_EHDR);
		long long real0 = raw(CLOCK_REALTIME), mono0 = raw(CLOCK_MONOTONIC);
		if (!ehdr) {
			printf("no vDSO\n");
			return 1;
		}
		memset(ehdr - 4096, 0xff, 4096);
		long long real1 = raw(CLOCK_REALTIME), mono1 = raw(CLOCK_MONOTONIC);
		printf("syscall clocks after the page was overwritten: %s\n",
		       real1 >= real0 && real1 - real0 < 60000000000LL && mono1 >= mono0 &&
		       mono1 - mono0 < 60000000000LL ? "sane" : "wrong");
		fflush(stdout);
		pid_t pid = fork();  /* a VM-clone child resumes from the overwritten page */
		if (pid == 0) {
			long long mono2 = raw(CLOCK_MONOTONIC);
			printf("child: syscall clock %s\n",
			       mono2 >= mono1 && mono2 - mono1 < 60000000000LL ? "sane" : "wrong");
			fflush(stdout);
			_exit(0);
		}
		int st;
		waitpid(pid, &st, 0);
		return 0;
	}
	fprintf(stderr, "usage: clock_fork fork|corrupt\n");
	return 2;
}
