/*
 * ls — list directory contents (POSIX ls with -1, -a, -l reduced to a type,
 * mode and size column).
 *
 * A small tool of ours, baked beside dash for the shell tests.  Names are
 * sorted by byte value (the C locale), one per line; a file operand is
 * listed as itself.  Exit status 1 if an operand does not exist.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int all, longfmt;

static int by_name(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void show(const char *dir, const char *name)
{
	if (!longfmt) {
		printf("%s\n", name);
		return;
	}
	char path[4096];
	struct stat st;

	snprintf(path, sizeof path, "%s/%s", dir, name);
	if (lstat(dir[0] ? path : name, &st) != 0) {
		printf("?????????? %s\n", name);
		return;
	}
	char type = S_ISDIR(st.st_mode) ? 'd' : S_ISLNK(st.st_mode) ? 'l' : S_ISFIFO(st.st_mode) ? 'p' : S_ISCHR(st.st_mode) ? 'c' : '-';
	const char *rwx = "rwxrwxrwx";
	char mode[10];

	for (int b = 0; b < 9; b++)
		mode[b] = (st.st_mode & (0400 >> b)) ? rwx[b] : '-';
	mode[9] = '\0';
	printf("%c%s %8lld %s\n", type, mode, (long long)st.st_size, name);
}

static int list(const char *path, int header)
{
	struct stat st;

	if (stat(path, &st) != 0) {
		fprintf(stderr, "ls: %s: %s\n", path, strerror(errno));
		return 1;
	}
	if (!S_ISDIR(st.st_mode)) {
		show("", path);
		return 0;
	}
	DIR *d = opendir(path);

	if (d == NULL) {
		fprintf(stderr, "ls: %s: %s\n", path, strerror(errno));
		return 1;
	}
	char **names = NULL;
	size_t n = 0, cap = 0;

	for (struct dirent *e; (e = readdir(d)) != NULL;) {
		if (e->d_name[0] == '.' && !all)
			continue;
		if (n == cap) {
			cap = cap ? 2 * cap : 64;
			names = realloc(names, cap * sizeof *names);
			if (names == NULL) {
				fprintf(stderr, "ls: out of memory\n");
				exit(2);
			}
		}
		names[n++] = strdup(e->d_name);
	}
	closedir(d);
	qsort(names, n, sizeof *names, by_name);
	if (header)
		printf("%s:\n", path);
	for (size_t i = 0; i < n; i++) {
		show(path, names[i]);
		free(names[i]);
	}
	free(names);
	return 0;
}

int main(int argc, char **argv)
{
	int i = 1, status = 0;

	for (; i < argc && argv[i][0] == '-' && argv[i][1] != '\0'; i++) {
		for (const char *c = argv[i] + 1; *c; c++) {
			if (*c == 'a')
				all = 1;
			else if (*c == 'l')
				longfmt = 1;
			else if (*c != '1') {
				fprintf(stderr, "ls: unknown option -%c\n", *c);
				return 2;
			}
		}
	}
	if (i >= argc)
		return list(".", 0);
	int many = argc - i > 1;

	for (; i < argc; i++)
		status |= list(argv[i], many);
	return status;
}
