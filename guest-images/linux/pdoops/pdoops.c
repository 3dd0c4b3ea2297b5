// SPDX-License-Identifier: GPL-2.0
/*
 * pdoops: a real kernel oops on demand, for the progdump Linux stand-in guest.
 *
 * The Debian cloud kernel has no LKDTM. Loading this module creates
 * /proc/pdoops; writing "oops" to it dereferences NULL in process context,
 * which the kernel reports as an oops ("BUG: kernel NULL pointer
 * dereference") and, with kernel.panic_on_oops=1, turns into a panic
 * ("Fatal exception"). Built at image-build time against Debian's
 * linux-headers package for the guest kernel.
 */
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/uaccess.h>

static ssize_t pdoops_write(struct file *file, const char __user *buf, size_t len, loff_t *off)
{
	char cmd[16] = { 0 };

	if (copy_from_user(cmd, buf, min(len, sizeof(cmd) - 1)))
		return -EFAULT;
	if (!strncmp(cmd, "oops", 4))
		*(volatile int *)NULL = 0x70646f6f;	/* "pdoo" */
	return len;
}

static const struct proc_ops pdoops_ops = {
	.proc_write = pdoops_write,
};

static int __init pdoops_init(void)
{
	return proc_create("pdoops", 0200, NULL, &pdoops_ops) ? 0 : -ENOMEM;
}

static void __exit pdoops_exit(void)
{
	remove_proc_entry("pdoops", NULL);
}

module_init(pdoops_init);
module_exit(pdoops_exit);
MODULE_DESCRIPTION("progdump: oops on demand through /proc/pdoops");
MODULE_LICENSE("GPL");
