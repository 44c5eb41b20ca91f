/*
 * Process groups and sessions as Linux rules them, and waitpid(0) / waitpid(-pgid)
 * after children change group (their own setsid/setpgid, or the parent's setpgid).
 *
 *   setpgid(0, -1) = -1 EINVAL; setpgid(no such pid) = -1 ESRCH
 *   setpgid(0, 0) makes the parent a group leader; then setsid() = -1 EPERM; it can
 *     go back to the group it started in (a VM's: init's group) and lead again
 *   a child that calls setsid() leads a new session: the parent's waitpid(0) no longer
 *     sees it (ECHILD with WNOHANG) and setpgid(child, parent's group) = -1 EPERM
 *   a child the parent moves with setpgid(child, child): waitpid(0) ECHILD,
 *     waitpid(-child) finds it
 *   a child that moves itself with setpgid(0, 0): waitpid(0) ECHILD, waitpid(-child) finds it
 *   setpgid(child, a group that does not exist) = -1 EPERM
 *
 * Only the parent prints (in the thread-fork VM stdio is shared); children report
 * through pipes and exit statuses.  Exit status 0 if every line is as expected.
 */
#define PROG "pgroup_rules"
#include "guest_common.h"

static int ok = 1;

static void expect(const char *what, int got, int want_errno)
{
	int e = get_errno();

	if (want_errno == 0 ? got >= 0 : (got == -1 && e == want_errno)) {
		printf("%s: %s\n", what, want_errno ? strerror(want_errno) : "ok");
	} else {
		printf("%s: got %d (%s)\n", what, got, got < 0 ? strerror(e) : "no error");
		ok = 0;
	}
}

static void sync_read(int fd)
{
	char c;

	if (read(fd, &c, 1) != 1)
		die("read from the sync pipe");
}

/* fork a child that runs step(), tells the parent on `ready`, then waits for `go` to close */
static pid_t child(void (*step)(void), int ready[2], int go[2])
{
	if (pipe(ready) || pipe(go))
		die("pipe");
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		char c = 'r';
		close(ready[0]);
		close(go[1]);
		if (step)
			step();
		if (write(ready[1], &c, 1) != 1)
			_exit(3);
		if (read(go[0], &c, 1) != 0)
			_exit(4);
		_exit(0);
	}
	close(ready[1]);
	close(go[0]);
	sync_read(ready[0]);
	close(ready[0]);
	return pid;
}

static void finish(const char *what, pid_t pid, int go[2], pid_t wait_for)
{
	int status;

	close(go[1]);
	pid_t got = waitpid(wait_for, &status, 0);
	if (got == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
		printf("%s: reaped, exit 0\n", what);
	} else {
		printf("%s: waitpid gave %d, status 0x%x\n", what, (int)got, status);
		ok = 0;
	}
}

static void do_setsid(void)
{
	if (setsid() != getpid())
		_exit(2);
}

static void do_own_group(void)
{
	if (setpgid(0, 0) != 0 || getpgid(0) != getpid())
		_exit(2);
}

int main(void)
{
	int ready[2], go[2], status;

	top_pid = getpid();
	setvbuf(stdout, NULL, _IOLBF, 0);
	pid_t first_group = getpgrp();
	expect("setpgid(0, -1)", setpgid(0, -1), EINVAL);
	expect("setpgid(no such pid, 0)", setpgid(0x3ffffff0, 0), ESRCH);
	expect("setpgid(0, 0)", setpgid(0, 0), 0);
	expect("setsid() as a group leader", setsid(), EPERM);
	/* back into the group it started in (in a VM: init's, which only init may hold
	 * besides us), then a leader again for the rest */
	expect("setpgid(0, the group it started in)", setpgid(0, first_group), 0);
	expect("setpgid(0, 0) again", setpgid(0, 0), 0);
	pid_t me = getpid();

	pid_t c = child(do_setsid, ready, go);
	expect("waitpid(0) after the child's setsid", waitpid(0, &status, WNOHANG), ECHILD);
	expect("setpgid(child in another session, my group)", setpgid(c, me), EPERM);
	finish("child with its own session", c, go, c);

	c = child(NULL, ready, go);
	expect("setpgid(child, 0x3ffffff1: no such group)", setpgid(c, 0x3ffffff1), EPERM);
	expect("setpgid(child, child)", setpgid(c, c), 0);
	expect("waitpid(0) after moving the child", waitpid(0, &status, WNOHANG), ECHILD);
	expect("waitpid(-child) while it runs", waitpid(-c, &status, WNOHANG), 0);
	finish("child moved by its parent, waitpid(-child)", c, go, -c);

	c = child(do_own_group, ready, go);
	expect("waitpid(0) after the child's setpgid(0, 0)", waitpid(0, &status, WNOHANG), ECHILD);
	finish("child in a group of its own, waitpid(-child)", c, go, -c);

	c = child(NULL, ready, go);
	expect("waitpid(0) with a child in my group", waitpid(0, &status, WNOHANG), 0);
	finish("child in my group, waitpid(0)", c, go, 0);
	return ok ? 0 : 1;
}
