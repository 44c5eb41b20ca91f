/*
 * swap_tag — prints its build's TAG and exits with it (exec_swap's programs:
 * builds that differ only in TAG have images of the same size).
 */
#include <stdio.h>

#ifndef TAG
#define TAG 1
#endif

int main(void)
{
	printf("tag=%d\n", TAG);
	return TAG;
}
