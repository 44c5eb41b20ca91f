/*
 * fork_hazards — the documented limits of the in-VM forks, made visible.
 *
 * One fork(); the child reports through its exit status and its writes, and
 * the parent prints what it sees after reaping the child.  Four probes:
 *
 * (a) int_looking_like_stack_ptr: main keeps an integer local (a long, not a
 *     pointer) whose value happens to equal the address of another local of
 *     main; the same value is also kept in a global, xor-ed with a constant
 *     so that no scan can take it for an address.  The child compares its
 *     copy of the integer with the unmangled global: "rebased" if they differ
 *     (a conservative scan took the integer for a stack pointer and moved it
 *     onto the child's stack), "unchanged" if they are equal (POSIX fork
 *     copies memory as is).
 * (b) heap_second_level: a heap block A whose pointer lives on main's stack
 *     points to a second heap block B; no other reference to B exists at
 *     fork time (B is set up in a noinline function, the dead stack is
 *     scrubbed).  The child writes 2 into B through its A.  "shared" if the
 *     parent then sees 2 in B (only blocks pointed to directly from the stack
 *     are copied; A's copy still points to the parent's B), "private" if not.
 * (c) hoisted_errno: musl declares __errno_location() const, so a compiler
 *     may compute &errno once, before fork(), and keep using that pointer in
 *     the child.  Done explicitly here: &errno is taken before fork() and
 *     kept in a (volatile) local; the parent sets errno = EDOM just before
 *     fork(); the child stores ERANGE through the saved pointer.  "private"
 *     if the parent's errno is still EDOM afterwards (the child wrote its own
 *     errno), "shared" if it became ERANGE (the child wrote the parent's).
 * (d) int_looking_like_global_ptr: a global integer whose value equals the
 *     address of another global (a program's own image), its reference value
 *     kept xor-ed as in (a).  "rebased" if the child's integer differs from
 *     it (copy fork scans the image's writable part and moves every word
 *     that points into the parent's image to the child's copy), "unchanged"
 *     if not.
 *
 * Output natively and in VM-clone fork (everything is copied as is):
 *              int_looking_like_stack_ptr=unchanged
 *              heap_second_level=private
 *              hoisted_errno=private
 *              int_looking_like_global_ptr=unchanged
 * Thread fork (the stack is scanned, globals are shared and not scanned):
 *              int_looking_like_stack_ptr=rebased
 *              heap_second_level=shared
 *              hoisted_errno=private
 *              int_looking_like_global_ptr=unchanged
 * (the kernel rebases words pointing into the parent's TLS block onto the
 * child's, so even a hoisted &errno reaches the child's own errno).
 * Copy fork (every word of the child's copy that equals an address in one
 * of the parent's regions is rebased, integers included):
 *              int_looking_like_stack_ptr=rebased
 *              heap_second_level=private
 *              hoisted_errno=private
 *              int_looking_like_global_ptr=rebased
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROG "fork_hazards"

#include "guest_common.h"

struct outer {
	volatile int *volatile inner; /* the only reference to block B */
	long pad[3];
};

/* the reference values of (a) and (d), xor-ed with MANGLE: a non-canonical
 * value, which no scan takes for an address */
#define MANGLE 0x5a5a000000000000UL
volatile unsigned long g_int_mangled;
volatile unsigned long g_global_mangled;
/* (d): an integer that equals the address of another global */
volatile long g_other = 7;
volatile long g_int_like_global;

static __attribute__((noinline)) struct outer *setup_two_levels(void)
{
	struct outer *a = malloc(sizeof *a);
	int *b = malloc(64);

	if (!a || !b)
		die("malloc failed");
	memset(a, 0, sizeof *a);
	memset(b, 0, 64);
	b[0] = 1;
	a->inner = b;
	return a;
}

/* Overwrites the dead stack below the caller's frame, where malloc() and
 * setup_two_levels() may have left copies of block B's address. */
static __attribute__((noinline)) void scrub_stack(void)
{
	volatile unsigned char junk[16384];

	for (size_t i = 0; i < sizeof junk; i++)
		junk[i] = 0;
}

int main(void)
{
	volatile long other_local = 7;
	volatile long int_value; /* an integer that equals &other_local */
	struct outer *volatile a;
	int *volatile errp;
	int st, err_after;
	pid_t pid, r;

	top_pid = getpid();
	int_value = (long)(uintptr_t)&other_local;
	g_int_mangled = (unsigned long)int_value ^ MANGLE;
	g_int_like_global = (long)(uintptr_t)&g_other;
	g_global_mangled = (unsigned long)g_int_like_global ^ MANGLE;
	a = setup_two_levels();
	errp = &errno;
	fflush(stdout);
	scrub_stack();
	set_errno(EDOM);
	pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		int code = ((unsigned long)int_value == (g_int_mangled ^ MANGLE) ? 20 : 21) +
			   ((unsigned long)g_int_like_global == (g_global_mangled ^ MANGLE) ? 0 : 2);

		a->inner[0] = 2;
		*errp = ERANGE;
		_exit(code);
	}
	do
		r = waitpid(pid, &st, 0);
	while (r < 0 && get_errno() == EINTR);
	err_after = get_errno(); /* waitpid succeeded: errno untouched since fork() */
	if (r != pid)
		die("waitpid returned %d", (int)r);
	if (!WIFEXITED(st) || WEXITSTATUS(st) < 20 || WEXITSTATUS(st) > 23)
		die("child: unexpected wait status 0x%x", st);
	if (a->inner[0] != 1 && a->inner[0] != 2)
		die("block B has value %d", a->inner[0]);
	if (err_after != EDOM && err_after != ERANGE)
		die("errno is %d", err_after);
	if (other_local != 7)
		die("other_local changed to %ld", other_local);

	printf("int_looking_like_stack_ptr=%s\n", WEXITSTATUS(st) & 1 ? "rebased" : "unchanged");
	printf("heap_second_level=%s\n", a->inner[0] == 2 ? "shared" : "private");
	printf("hoisted_errno=%s\n", err_after == ERANGE ? "shared" : "private");
	printf("int_looking_like_global_ptr=%s\n", WEXITSTATUS(st) & 2 ? "rebased" : "unchanged");
	return 0;
}
