/*
 * Dies of SIGSEGV: writes through a NULL pointer, or with argument
 * "unmapped" through an address far from anything a process maps.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	int unmapped = argc > 1 && strcmp(argv[1], "unmapped") == 0;
	volatile int *p = unmapped ? (volatile int *)(uintptr_t)0xbad00000000ULL : (volatile int *)0;

	printf("fault_segv: writing through %s pointer\n", unmapped ? "an unmapped" : "a NULL");
	fflush(stdout);
	*p = 42;
	printf("fault_segv: still alive?!\n");
	return 1;
}
