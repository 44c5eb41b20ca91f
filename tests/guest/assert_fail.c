/* assert(0) must abort under `unifork cc` defaults and vanish with -DNDEBUG. */
#include <assert.h>
#include <stdio.h>

int main(void)
{
	printf("before assert\n");
	fflush(stdout);
	assert(0 && "asserts are active");
	printf("assert compiled out\n");
	return 0;
}
