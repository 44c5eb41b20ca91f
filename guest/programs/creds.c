/*
 * creds — user and group ids with Linux's rules, as a server that drops root does.
 *
 * Starts as root (natively: run it as root; the guest is root), shows every id,
 * sets supplementary groups, moves the effective uid away and back through the
 * saved one, forks a child that drops root for good (its later attempts to get
 * it back fail with EPERM) while the parent keeps its ids, then drops root the
 * way mini_httpd does (setgroups, setgid, setuid) and checks it cannot return.
 * Output: one line per step; the same natively and in every fork mode.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROG "creds"
#include "guest_common.h"

static void show(const char *who)
{
	uid_t r, e, s;
	gid_t gr, ge, gs;
	gid_t g[16];
	getresuid(&r, &e, &s);
	getresgid(&gr, &ge, &gs);
	int n = getgroups(16, g);
	printf("%s: uid %u/%u/%u gid %u/%u/%u getuid %u geteuid %u getgid %u getegid %u groups %d:",
	       who, r, e, s, gr, ge, gs, getuid(), geteuid(), getgid(), getegid(), n);
	for (int i = 0; i < n; i++)
		printf(" %u", g[i]);
	printf("\n");
	fflush(stdout);
}

static void rc(const char *what, int r)
{
	printf("%s = %d%s%s\n", what, r, r < 0 ? " " : "", r < 0 ? errname(errno) : "");
	fflush(stdout);
}

int main(void)
{
	show("start");
	gid_t set[3] = {30, 10, 20};
	rc("setgroups(3)", setgroups(3, set));
	rc("getgroups(0)", getgroups(0, NULL));
	gid_t small[1];
	rc("getgroups(1) too small", getgroups(1, small));
	show("groups");
	rc("setresuid(-1, 1000, -1)", setresuid(-1, 1000, -1));
	show("euid 1000");
	rc("setgroups as euid 1000", setgroups(0, NULL));
	rc("setuid(0) back through saved", setuid(0));
	show("back");
	rc("setregid(100, 200)", setregid(100, 200));
	show("regid");
	rc("setreuid(-1, 7)", setreuid(-1, 7));
	show("reuid");
	rc("setreuid(-1, 0)", setreuid(-1, 0));
	rc("setuid(-1)", setuid((uid_t)-1));
	pid_t p = fork();
	if (p == 0) {
		show("child");
		rc("child setuid(1000)", setuid(1000));
		show("child dropped");
		rc("child setuid(0)", setuid(0));
		rc("child setreuid(-1, 0)", setreuid(-1, 0));
		rc("child setresuid(0, 0, 0)", setresuid(0, 0, 0));
		rc("child setgroups", setgroups(0, NULL));
		rc("child setgid(0)", setgid(0));
		rc("child setuid(1000) again", setuid(1000));
		_exit(0);
	}
	int st;
	waitpid(p, &st, 0);
	show("parent after child");
	rc("setgroups(0)", setgroups(0, NULL));
	rc("setgid(65534)", setgid(65534));
	rc("setuid(65534)", setuid(65534));
	show("dropped");
	rc("setuid(0)", setuid(0));
	rc("setgid(0)", setgid(0));
	rc("setresgid(65534, 65534, 65534)", setresgid(65534, 65534, 65534));
	printf("done\n");
	return 0;
}
