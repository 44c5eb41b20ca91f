/*
 * event_replay: a kernel event that arrives while the guest runs must not make
 * it execute an instruction twice.
 *
 * The loop adds 1 to `counter` 1000 times, each time with one read-modify-write
 * instruction (addq $1, mem), as syscall_fuzz counts its calls.  The test
 * (tests/test_fuzz_guest.py) posts a kernel event at the store of the 500th
 * increment.  Unicorn, told to stop there, rewinds to the start of the
 * instruction whose store is done: the add ran again and the count came out
 * 1001 (VM-clone: an event from the supervisor; syscall_fuzz's ok+errors was
 * its calls + 1).  The syscall after the loop (the write) takes the event.
 *
 * Output:  counter=1000
 * the same natively; exit 0 (1 if the count is off).
 */
#include <stdio.h>

unsigned long counter; /* the test finds it by its symbol */

int main(void)
{
	unsigned long n;

	for (n = 0; n < 1000; n++)
		__asm__ volatile("addq $1, %0" : "+m"(counter));
	printf("counter=%lu\n", counter);
	return counter == 1000 ? 0 : 1;
}
