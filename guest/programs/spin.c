/*
 * Announces itself, then loops forever without a single syscall: for tests
 * of timeouts, kill and preemption of a guest that never yields.
 */
#include <stdio.h>

int main(void)
{
	volatile unsigned long counter = 0;

	printf("spin: spinning\n");
	fflush(stdout);
	for (;;)
		counter++;
}
