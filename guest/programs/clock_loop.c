/*
 * The cost of asking the time: `clock_loop [N]` calls clock_gettime(CLOCK_MONOTONIC)
 * N times through libc (musl takes the vDSO when the auxv names one, as Linux's
 * does) and N times as a raw syscall, and prints the mean cost of each, measured
 * inside the program: `ns_per_libc_call=`, `ns_per_syscall=`.
 *
 * It also checks that the two ways are one clock: readings taken alternately
 * through libc and the syscall, and CLOCK_REALTIME against gettimeofday and
 * time(), never go back (`backwards=0`), and says whether a vDSO was given
 * (`vdso=yes`).
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long ns_of(const struct timespec *ts)
{
	return (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

static long long raw_now(clockid_t clk)
{
	struct timespec ts;
	syscall(SYS_clock_gettime, clk, &ts);
	return ns_of(&ts);
}

static long long libc_now(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return ns_of(&ts);
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 100000L;
	long backwards = 0;
	long long t0, t1, t2, last;
	struct timeval tv;

	t0 = libc_now(CLOCK_MONOTONIC);
	for (long i = 0; i < n; i++)
		libc_now(CLOCK_MONOTONIC);
	t1 = libc_now(CLOCK_MONOTONIC);
	for (long i = 0; i < n; i++)
		raw_now(CLOCK_MONOTONIC);
	t2 = libc_now(CLOCK_MONOTONIC);

	last = libc_now(CLOCK_MONOTONIC);
	for (long i = 0; i < 1000; i++) {
		long long a = raw_now(CLOCK_MONOTONIC), b = libc_now(CLOCK_MONOTONIC);
		backwards += (a < last) + (b < a);
		last = b;
	}
	last = libc_now(CLOCK_REALTIME) / 1000;
	for (long i = 0; i < 1000; i++) {
		long long a, b;
		gettimeofday(&tv, NULL);
		a = (long long)tv.tv_sec * 1000000LL + tv.tv_usec;
		b = libc_now(CLOCK_REALTIME) / 1000;
		backwards += (a < last) + (b < a) + (time(NULL) < b / 1000000);
		last = b;
	}

	printf("calls=%ld\n", n);
	printf("ns_per_libc_call=%.3f\n", n > 0 ? (double)(t1 - t0) / (double)n : 0.0);
	printf("ns_per_syscall=%.3f\n", n > 0 ? (double)(t2 - t1) / (double)n : 0.0);
	printf("vdso=%s\n", getauxval(AT_SYSINFO_EHDR) ? "yes" : "no");
	printf("backwards=%ld\n", backwards);
	return backwards ? 1 : 0;
}
