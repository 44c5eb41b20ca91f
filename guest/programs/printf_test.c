/*
 * Deterministic printf coverage: integers of every width and base, floating
 * point in %f/%e/%g at several precisions (musl formats all of them through
 * long double, so this also exercises the x87 path), strings, chars and %p.
 * The output must be byte-identical natively and in a VM.
 */
#include <limits.h>
#include <stdint.h>
#include <stdio.h>

int main(void)
{
	int i = 42, neg = -1234567;
	long long big = 9007199254740993LL, nbig = LLONG_MIN;
	unsigned long long ubig = ULLONG_MAX;
	double d[] = {0.0, -0.0, 1.0, -2.5, 3.14159265358979, 1e-7, 123456789.125, 6.02214076e23, 1.0 / 3.0};
	const char *s = "unikernel";

	printf("int: [%d] [%i] [%d] [%u]\n", i, neg, INT_MIN, UINT_MAX);
	printf("padded: [%5d] [%-5d] [%05d] [%+d] [% d] [%+05d]\n", i, i, i, i, i, -i);
	printf("long long: [%lld] [%lld] [%llu] [%llx]\n", big, nbig, ubig, ubig);
	printf("hex: [%x] [%X] [%#x] [%08x] [%#010x]\n", 0xbeefu, 0xbeefu, 0xbeefu, 0xbeefu, 0xbeefu);
	printf("octal: [%o] [%#o] [%6o]\n", 8u, 8u, 511u);
	printf("sized: [%hhd] [%hd] [%ld] [%zu] [%jd]\n", (signed char)-5, (short)-300, 1L << 40,
	       sizeof(long double), (intmax_t)INT64_MAX);
	printf("star: [%*d] [%-*d] [%.*d]\n", 6, i, 6, i, 4, i);
	for (unsigned k = 0; k < sizeof d / sizeof d[0]; k++)
		printf("double[%u]: %f | %.0f | %.2f | %.10f | %e | %.3e | %g | %.3g | %.12g | %10.3f|\n", k,
		       d[k], d[k], d[k], d[k], d[k], d[k], d[k], d[k], d[k], d[k]);
	printf("float: %f %e %g\n", (double)1.1f, (double)-7.25f, (double)3.4e38f);
	printf("strings: [%s] [%-10s] [%10s] [%.3s] [%-6.2s]\n", s, s, "abc", s, s);
	printf("chars: [%c] [%c] [%3c] [%-3c] [%%]\n", 'u', 65, 'x', 'y');
	printf("pointer: [%p]\n", (void *)0);
	int n = printf("count: ");
	printf("%d\n", n);
	char buf[16];
	int full = snprintf(buf, sizeof buf, "%s-%d-%s", s, 123456, s);
	printf("snprintf: [%s] %d\n", buf, full);
	return 0;
}
