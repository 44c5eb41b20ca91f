/*
 * prefork_http — a pre-forking HTTP/1.0 server (the Apache "prefork" pattern).
 *
 * The master binds and listens on one TCP port (-p, default 8080), forks W
 * workers (-w, default 4) that all block in accept() on the shared listening
 * socket, and re-forks a worker whenever one dies (SIGCHLD, waitpid WNOHANG).
 * Each worker serves one request per connection, then closes it:
 *
 *   GET /hello       200 "hello\n"
 *   GET /bytes/N     200, N bytes 'a'..'z' repeated
 *   GET /file        200, the file given with -f, sent with sendfile(2) (-m N: the
 *                    master first writes N bytes of numbered lines to it)
 *   GET /die         the worker kills itself with SIGKILL before answering
 *                    (a worker lost mid-load: its client sees the connection close)
 *   anything else    404; a connection closed before a request: closed
 *
 * SIGTERM to the master stops the workers, reaps them and exits 0.
 * Output: "prefork_http: listening on port P, W workers" on stdout (flushed);
 * on stderr a line per re-forked worker and, at the end, "stopped".
 * Locals only in the workers: it behaves the same with thread fork.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAXW 64

static volatile sig_atomic_t got_chld, got_term;
static pid_t workers[MAXW];
static int nworkers = 4;
static const char *file_path;

static void on_chld(int sig) { (void)sig; got_chld = 1; }
static void on_term(int sig) { (void)sig; got_term = 1; }

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static void header(int fd, int code, long len)
{
	char h[256];
	int n = snprintf(h, sizeof h,
			 "HTTP/1.0 %d %s\r\nServer: prefork_http\r\nContent-Type: text/plain\r\n"
			 "Content-Length: %ld\r\nConnection: close\r\n\r\n",
			 code, code == 200 ? "OK" : "Not Found", len);
	write_all(fd, h, (size_t)n);
}

static void serve(int c)
{
	char req[4096];
	size_t got = 0;
	while (got < sizeof req - 1) {
		ssize_t r = read(c, req + got, sizeof req - 1 - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		got += (size_t)r;
		req[got] = 0;
		if (strstr(req, "\r\n\r\n"))
			break;
	}
	req[got] = 0;
	char path[1024];
	if (got == 0 || sscanf(req, "GET %1023s", path) != 1)
		return; /* dropped before a request, or not a GET: just close */
	if (strcmp(path, "/hello") == 0) {
		header(c, 200, 6);
		write_all(c, "hello\n", 6);
	} else if (strncmp(path, "/bytes/", 7) == 0) {
		long n = atol(path + 7);
		header(c, 200, n);
		char buf[8192];
		for (long off = 0; off < n;) {
			long k = n - off < (long)sizeof buf ? n - off : (long)sizeof buf;
			for (long i = 0; i < k; i++)
				buf[i] = (char)('a' + (off + i) % 26);
			if (write_all(c, buf, (size_t)k) < 0)
				return;
			off += k;
		}
	} else if (strcmp(path, "/file") == 0 && file_path) {
		int fd = open(file_path, O_RDONLY);
		struct stat st;
		if (fd < 0 || fstat(fd, &st) < 0) {
			header(c, 404, 0);
		} else {
			header(c, 200, (long)st.st_size);
			off_t off = 0;
			while (off < st.st_size) {
				ssize_t s = sendfile(c, fd, &off, (size_t)(st.st_size - off));
				if (s < 0 && errno == EINTR)
					continue;
				if (s <= 0)
					break;
			}
		}
		if (fd >= 0)
			close(fd);
	} else if (strcmp(path, "/die") == 0) {
		kill(getpid(), SIGKILL);
	} else {
		header(c, 404, 0);
	}
}

static void worker(int lfd)
{
	sigset_t none;
	sigemptyset(&none);
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	signal(SIGCHLD, SIG_DFL);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (;;) {
		int c = accept(lfd, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("prefork_http: accept");
			_exit(1);
		}
		serve(c);
		close(c);
	}
}

static pid_t spawn(int lfd)
{
	pid_t p = fork();
	if (p < 0) {
		perror("prefork_http: fork");
		exit(1);
	}
	if (p == 0)
		worker(lfd);
	return p;
}

int main(int argc, char **argv)
{
	int port = 8080, opt;
	long make = -1;
	while ((opt = getopt(argc, argv, "p:w:f:m:")) != -1) {
		if (opt == 'p')
			port = atoi(optarg);
		else if (opt == 'w')
			nworkers = atoi(optarg);
		else if (opt == 'f')
			file_path = optarg;
		else if (opt == 'm')
			make = atol(optarg);
		else {
			fprintf(stderr, "usage: prefork_http [-p port] [-w workers] [-f file [-m bytes]]\n");
			return 2;
		}
	}
	if (nworkers < 1 || nworkers > MAXW) {
		fprintf(stderr, "prefork_http: 1..%d workers\n", MAXW);
		return 2;
	}
	if (file_path && make >= 0) {
		FILE *f = fopen(file_path, "w");
		if (!f) {
			perror(file_path);
			return 1;
		}
		for (long i = 0; i < make; i++)
			fputc(i % 64 == 63 ? '\n' : 'A' + (int)(i / 64 % 26), f);
		fclose(f);
	}
	signal(SIGPIPE, SIG_IGN);
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons((unsigned short)port);
	sa.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 128) < 0) {
		perror("prefork_http: bind/listen");
		return 1;
	}
	struct sigaction act;
	memset(&act, 0, sizeof act);
	act.sa_handler = on_chld;
	sigaction(SIGCHLD, &act, NULL);
	act.sa_handler = on_term;
	sigaction(SIGTERM, &act, NULL);
	sigaction(SIGINT, &act, NULL);
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGCHLD);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigprocmask(SIG_BLOCK, &block, &old);
	for (int i = 0; i < nworkers; i++)
		workers[i] = spawn(lfd);
	printf("prefork_http: listening on port %d, %d workers\n", port, nworkers);
	fflush(stdout);
	while (!got_term) {
		sigsuspend(&old);
		if (!got_chld)
			continue;
		got_chld = 0;
		int st;
		pid_t dead;
		while ((dead = waitpid(-1, &st, WNOHANG)) > 0) {
			for (int i = 0; i < nworkers; i++) {
				if (workers[i] != dead)
					continue;
				if (WIFSIGNALED(st))
					fprintf(stderr, "prefork_http: worker killed by signal %d, re-forked\n",
						WTERMSIG(st));
				else
					fprintf(stderr, "prefork_http: worker exited %d, re-forked\n",
						WEXITSTATUS(st));
				workers[i] = got_term ? 0 : spawn(lfd);
			}
		}
	}
	for (int i = 0; i < nworkers; i++)
		if (workers[i] > 0)
			kill(workers[i], SIGTERM);
	while (wait(NULL) > 0)
		;
	fprintf(stderr, "prefork_http: stopped\n");
	return 0;
}
