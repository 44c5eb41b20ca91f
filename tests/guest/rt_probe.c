/*
 * Shows what the guest runtime decided and that its pieces work: the raw
 * probe result, unifork_in_vm(), the raw syscall helpers against libc, and
 * the wrapped allocator (including memory that libc itself allocates).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "unifork_hypercalls.h"

int main(void)
{
	long probe = unifork_syscall0(UNIFORK_HC_PROBE);
	printf("probe=%ld is_error=%d\n", probe, unifork_is_error(probe));
	printf("in_vm=%d\n", unifork_in_vm());

	printf("getpid_match=%d\n", unifork_syscall0(SYS_getpid) == (long)getpid());
	fflush(stdout);
	long w = unifork_syscall3(SYS_write, 1, (long)"raw write\n", 10);
	printf("raw_write=%ld\n", w);
	long bad = unifork_syscall3(SYS_write, -1, (long)"x", 1);
	printf("bad_fd=%ld is_error=%d\n", bad, unifork_is_error(bad));

	char *s = strdup("duplicated by libc");
	char *p = malloc(100);
	char *q = realloc(p, 5000);
	int *z = calloc(64, sizeof(int));
	int zero = 1;
	for (int i = 0; i < 64; i++)
		zero &= z[i] == 0;
	printf("alloc_ok=%d calloc_zero=%d strdup=%s\n", s && q && z, zero, s);
	free(s);
	free(q);
	free(z);
	return 0;
}
