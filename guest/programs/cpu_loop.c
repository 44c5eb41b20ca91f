/*
 * CPU-bound work with no syscalls in the loop: `cpu_loop [N]` runs N rounds
 * of an integer hash and a sieve of the first 10000 numbers every 1024
 * rounds, then prints a checksum that depends only on N.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SIEVE_N 10000

static unsigned sieve(unsigned char *composite)
{
	unsigned primes = 0;
	memset(composite, 0, SIEVE_N);
	for (unsigned i = 2; i < SIEVE_N; i++) {
		if (composite[i])
			continue;
		primes++;
		for (unsigned j = i * i; j < SIEVE_N; j += i)
			composite[j] = 1;
	}
	return primes;
}

int main(int argc, char **argv)
{
	unsigned long n = argc > 1 ? strtoul(argv[1], NULL, 0) : 1000000UL;
	static unsigned char composite[SIEVE_N];
	uint64_t h = 0x243F6A8885A308D3ULL;
	uint64_t primes = 0;

	for (unsigned long i = 0; i < n; i++) {
		h ^= i;
		h *= 0xff51afd7ed558ccdULL;
		h ^= h >> 33;
		if ((i & 1023) == 0)
			primes += sieve(composite);
	}
	printf("cpu_loop n=%lu primes=%llu checksum=%016llx\n", n, (unsigned long long)primes,
	       (unsigned long long)h);
	return 0;
}
