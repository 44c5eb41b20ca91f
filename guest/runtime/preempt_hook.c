/*
 * preempt_hook.c — the emulator's time slices: built for the HOST (not the
 * guest) by the toolchain and loaded into every process that runs VMs.
 *
 * Unicorn calls unifork_block_hook before each translated block the guest
 * runs (a UC_HOOK_BLOCK hook, installed when the VM is made, so no block is
 * ever translated without it).  While a slice is armed (left > 0) each call
 * counts one block down; at zero it stops the emulator from inside the hook,
 * a stop that takes effect between two blocks (a stop from another thread
 * can replay an instruction: unicorn#1355).  Disarmed (left <= 0) it costs a
 * compare.  A C function because Unicorn would otherwise call Python once per
 * block; Unicorn's own instruction counter costs far more (a hook call per
 * instruction).
 */
#include <stdint.h>

struct unifork_slice {
	int64_t left;              /* blocks still to run; <= 0: not armed */
	void (*stop)(void *uc);    /* uc_emu_stop */
	int32_t fired;             /* set when the slice ran out */
};

void unifork_block_hook(void *uc, uint64_t address, uint32_t size, void *data)
{
	struct unifork_slice *s = data;

	(void)address;
	(void)size;
	if (s->left > 0 && --s->left == 0) {
		s->fired = 1;
		s->stop(uc);
	}
}
