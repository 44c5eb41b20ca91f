/*
 * unifork's vDSO: clock_gettime without a syscall, as Linux's vDSO gives it.
 *
 * musl finds __vdso_clock_gettime (version LINUX_2.6) through AT_SYSINFO_EHDR
 * and calls it before any clock_gettime/gettimeofday/time syscall.  The page
 * just below this image (the "vvar" page) is written by the kernel
 * (tender_service/machine/vclock.py): time = base + (tsc - tsc_base) * mult >> shift.
 * The guest's rdtsc is the host's TSC (Unicorn passes it through), so the
 * clock advances while the guest computes, with no exit to the kernel.
 * Clocks it does not keep return -ENOSYS: musl then makes the syscall.
 *
 * Built with -nostdlib (no libc in a vDSO), so the few types are spelled here.
 */
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

struct timespec { s64 tv_sec; s64 tv_nsec; };

enum {
    CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID,
    CLOCK_MONOTONIC_RAW, CLOCK_REALTIME_COARSE, CLOCK_MONOTONIC_COARSE, CLOCK_BOOTTIME,
};
#define ENOSYS 38
#define KEPT (1u << CLOCK_REALTIME | 1u << CLOCK_REALTIME_COARSE | 1u << CLOCK_MONOTONIC \
              | 1u << CLOCK_MONOTONIC_RAW | 1u << CLOCK_MONOTONIC_COARSE | 1u << CLOCK_BOOTTIME)
#define REAL (1u << CLOCK_REALTIME | 1u << CLOCK_REALTIME_COARSE)

/* the layout of tender_service/machine/vclock.py:VVAR */
struct vvar {
    u32 seq;        /* 0: not kept (use the syscall); bumped by every rewrite */
    u32 shift;
    u64 tsc_base;
    u64 mult;
    s64 mono_base;  /* CLOCK_MONOTONIC at tsc_base, ns */
    s64 real_base;  /* CLOCK_REALTIME at tsc_base, ns */
};

/* the image's first byte (lld defines it); the vvar page is the page before */
extern const char __ehdr_start[] __attribute__((visibility("hidden")));

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

int __vdso_clock_gettime(int clk, struct timespec *ts)
{
    /* volatile: the kernel rewrites the page between two instructions of ours
     * (a time slice ends), so every field is read inside the seq loop */
    const volatile struct vvar *v = (const volatile struct vvar *)(__ehdr_start - 4096);
    int real;
    u32 seq;
    s64 ns;

    /* a bit mask, not a switch: a jump table would need relocations, and a vDSO has none */
    if (clk < 0 || clk > CLOCK_BOOTTIME || !(KEPT & 1u << clk))
        return -ENOSYS;
    real = (REAL & 1u << clk) != 0;
    do {
        seq = v->seq;
        ns = (real ? v->real_base : v->mono_base)
             + (s64)(((unsigned __int128)(rdtsc() - v->tsc_base) * v->mult) >> v->shift);
    } while (seq != v->seq);
    if (!seq)
        return -ENOSYS;
    ts->tv_sec = ns / 1000000000;
    ts->tv_nsec = ns % 1000000000;
    return 0;
}
