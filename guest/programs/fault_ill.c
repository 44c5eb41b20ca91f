/* Dies of SIGILL: executes ud2, the architecturally undefined instruction. */
#include <stdio.h>

int main(void)
{
	printf("fault_ill: executing ud2\n");
	fflush(stdout);
	__asm__ volatile("ud2");
	printf("fault_ill: still alive?!\n");
	return 1;
}
