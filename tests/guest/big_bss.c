/*
 * big_bss — an image whose bss alone needs 12 MiB of guest RAM: it cannot be
 * laid out in an 8 MiB VM (the loader must refuse it before anything runs),
 * and runs fine in a 64 MiB one.  Touches both ends of the array, prints
 * "big_bss ok <checksum>" and exits 0.
 */
#include <stdio.h>

static volatile unsigned char big[12 << 20];

int main(void)
{
	big[0] = 1;
	big[sizeof big - 1] = 2;
	printf("big_bss ok %d\n", big[0] + big[sizeof big - 1]);
	return 0;
}
