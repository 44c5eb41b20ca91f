/* Prints argc, every argv[] and every environment entry in order; exits with atoi(argv[1]). */
#include <stdio.h>
#include <stdlib.h>

extern char **environ;

int main(int argc, char **argv)
{
	printf("argc=%d\n", argc);
	for (int i = 0; i < argc; i++)
		printf("argv[%d]=%s\n", i, argv[i]);
	int n = 0;
	for (char **e = environ; e && *e; e++, n++)
		printf("env[%d]=%s\n", n, *e);
	printf("envc=%d\n", n);
	return argc > 1 ? atoi(argv[1]) : 0;
}
