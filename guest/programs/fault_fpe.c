/* Dies of SIGFPE: integer division by zero (x86 #DE); volatile keeps it at run time. */
#include <stdio.h>

int main(void)
{
	volatile int num = 1, den = 0;

	printf("fault_fpe: dividing by zero\n");
	fflush(stdout);
	int q = num / den;
	printf("fault_fpe: still alive?! %d\n", q);
	return 1;
}
