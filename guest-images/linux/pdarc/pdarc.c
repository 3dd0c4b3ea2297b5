// SPDX-License-Identifier: GPL-2.0
/*
 * pdarc: a ZFS ARC stand-in for the progdump Linux guest (a "fileserver").
 *
 * On a ZFS fileserver most of RAM is kernel memory: the ARC's data buffers
 * (kmem caches zio_data_buf_<size>, zio_buf_<size>, and on Linux
 * abd_chunk_cache) and its small metadata objects (arc_buf_hdr_t_full,
 * arc_buf_t, dmu_buf_impl_t, dnode_t). This module creates slab caches with
 * those names and, when "fill" is written to /proc/pdarc, fills them until
 * the data and metadata reach fill_pct percent of the kernel's RAM (module
 * parameter, default 60; "fill N" asks for N percent). Data buffers hold
 * pseudo-random bytes: the ARC keeps records compressed, so they do not
 * compress again. Reading /proc/pdarc prints what it holds.
 *
 * The caches are created with a usercopy region so SLUB never merges them
 * with another cache of the same size (6.1 has no SLAB_NO_MERGE): their
 * names stay visible in /proc/slabinfo and in every struct kmem_cache.
 * Built at image-build time against Debian's linux-headers package.
 */
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/sched.h>
#include <linux/uaccess.h>

static unsigned int fill_pct = 60;
module_param(fill_pct, uint, 0644);
MODULE_PARM_DESC(fill_pct, "share of RAM (percent) that \"fill\" brings the ARC to");

struct pdarc_cache {
	const char *name;
	unsigned int size;
	struct kmem_cache *cache;
	unsigned long objects;
};

/* data buffers, in the order a record's size is tried (a failed large one falls back) */
enum { ZIO_DATA_128K, ZIO_BUF_128K, ZIO_DATA_16K, ZIO_BUF_16K, ABD_CHUNK, NDATA };
static struct pdarc_cache data_caches[NDATA] = {
	{ "zio_data_buf_131072", 131072 },
	{ "zio_buf_131072", 131072 },
	{ "zio_data_buf_16384", 16384 },
	{ "zio_buf_16384", 16384 },
	{ "abd_chunk_cache", 4096 },
};

/* metadata objects, sized roughly as OpenZFS 2.1's on x86-64 */
struct arc_hdr {		/* arc_buf_hdr_t_full */
	struct list_head link;
	void *data;
	struct arc_buf *buf;
	struct dbuf *dbuf;
	u64 dva[2];
	u64 birth;
	u32 psize;
	u8 data_cache;
	u8 pad[184];
};
struct arc_buf {		/* arc_buf_t */
	struct arc_hdr *hdr;
	void *data;
	u64 flags;
	u8 pad[80 - 24];
};
struct dbuf {			/* dmu_buf_impl_t */
	u64 object;
	u64 blkid;
	struct arc_buf *buf;
	struct dnode *dnode;
	u8 pad[320 - 32];
};
struct dnode {			/* dnode_t */
	struct list_head link;
	u64 object;
	u64 nblocks;
	u8 phys[512];		/* the on-disk dnode_phys_t copy */
	u8 pad[960 - 512 - 32];
};

enum { HDR, BUF, DBUF, DNODE, NMETA };
static struct pdarc_cache meta_caches[NMETA] = {
	{ "arc_buf_hdr_t_full", sizeof(struct arc_hdr) },
	{ "arc_buf_t", sizeof(struct arc_buf) },
	{ "dmu_buf_impl_t", sizeof(struct dbuf) },
	{ "dnode_t", sizeof(struct dnode) },
};

static LIST_HEAD(records);
static LIST_HEAD(dnodes);
static DEFINE_MUTEX(lock);
static unsigned long held_bytes, target_bytes;
static u64 rng_state = 0x70646172632d3031ULL;	/* "pdarc-01" */

static u64 xorshift(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static void *cache_alloc(struct pdarc_cache *c)
{
	void *p = kmem_cache_alloc(c->cache, GFP_KERNEL | __GFP_NOWARN | __GFP_NORETRY);

	if (p) {
		c->objects++;
		held_bytes += c->size;
	}
	return p;
}

static void cache_free(struct pdarc_cache *c, void *p)
{
	kmem_cache_free(c->cache, p);
	c->objects--;
	held_bytes -= c->size;
}

/* one cached record: data buffer + header + arc_buf + dbuf; a dnode every 32 blocks */
static int add_record(unsigned long n)
{
	static const u8 mix[16] = { ZIO_DATA_128K, ZIO_DATA_128K, ZIO_DATA_128K, ZIO_DATA_16K, ZIO_BUF_16K,
				    ZIO_DATA_128K, ABD_CHUNK, ZIO_DATA_128K, ZIO_BUF_128K, ZIO_DATA_128K,
				    ZIO_DATA_16K, ZIO_DATA_128K, ABD_CHUNK, ZIO_BUF_16K, ZIO_DATA_128K, ZIO_DATA_16K };
	struct arc_hdr *h;
	struct dnode *dn = NULL;
	unsigned int d = mix[n % 16], i;
	u64 *w;

	if (n % 32 == 0) {
		dn = cache_alloc(&meta_caches[DNODE]);
		if (!dn)
			return -ENOMEM;
		dn->object = n / 32;
		dn->nblocks = 32;
		for (i = 0; i < sizeof(dn->phys) / 8; i++)
			((u64 *)dn->phys)[i] = xorshift();
		list_add(&dn->link, &dnodes);
	} else {
		dn = list_first_entry(&dnodes, struct dnode, link);
	}
	h = cache_alloc(&meta_caches[HDR]);
	if (!h)
		return -ENOMEM;
	memset(h, 0, sizeof(*h));
	for (; d < NDATA; d++) {	/* a large buffer may fail on fragmented memory: a smaller one */
		h->data = cache_alloc(&data_caches[d]);
		if (h->data)
			break;
	}
	h->buf = cache_alloc(&meta_caches[BUF]);
	h->dbuf = cache_alloc(&meta_caches[DBUF]);
	if (!h->data || !h->buf || !h->dbuf) {
		if (h->data)
			cache_free(&data_caches[d], h->data);
		if (h->buf)
			cache_free(&meta_caches[BUF], h->buf);
		if (h->dbuf)
			cache_free(&meta_caches[DBUF], h->dbuf);
		cache_free(&meta_caches[HDR], h);
		return -ENOMEM;
	}
	h->data_cache = d;
	h->psize = data_caches[d].size;
	h->dva[0] = xorshift();
	h->birth = n;
	w = h->data;
	for (i = 0; i < h->psize / 8; i++)
		w[i] = xorshift();
	h->buf->hdr = h;
	h->buf->data = h->data;
	h->dbuf->object = dn->object;
	h->dbuf->blkid = n % 32;
	h->dbuf->buf = h->buf;
	h->dbuf->dnode = dn;
	list_add_tail(&h->link, &records);
	return 0;
}

static unsigned long records_held;

static void fill(unsigned int pct)
{
	unsigned long n;

	target_bytes = (totalram_pages() << PAGE_SHIFT) / 100 * min(pct, 95U);
	for (n = records_held; held_bytes < target_bytes; n++) {
		if (add_record(n)) {
			pr_info("pdarc: allocation failed at %lu bytes (target %lu)\n", held_bytes, target_bytes);
			break;
		}
		records_held = n + 1;
		if (n % 64 == 0)
			cond_resched();
	}
}

static int pdarc_show(struct seq_file *m, void *v)
{
	int i;

	mutex_lock(&lock);
	seq_printf(m, "records %lu held_bytes %lu target_bytes %lu\n", records_held, held_bytes, target_bytes);
	for (i = 0; i < NDATA; i++)
		seq_printf(m, "%s %u %lu\n", data_caches[i].name, data_caches[i].size, data_caches[i].objects);
	for (i = 0; i < NMETA; i++)
		seq_printf(m, "%s %u %lu\n", meta_caches[i].name, meta_caches[i].size, meta_caches[i].objects);
	mutex_unlock(&lock);
	return 0;
}

static int pdarc_open(struct inode *inode, struct file *file)
{
	return single_open(file, pdarc_show, NULL);
}

static ssize_t pdarc_write(struct file *file, const char __user *buf, size_t len, loff_t *off)
{
	char cmd[32] = { 0 };
	unsigned int pct = fill_pct;

	if (copy_from_user(cmd, buf, min(len, sizeof(cmd) - 1)))
		return -EFAULT;
	if (strncmp(cmd, "fill", 4))
		return -EINVAL;
	if (cmd[4] == ' ' && kstrtouint(strim(cmd + 5), 10, &pct))
		return -EINVAL;
	mutex_lock(&lock);
	fill(pct);
	mutex_unlock(&lock);
	return len;
}

static const struct proc_ops pdarc_ops = {
	.proc_open = pdarc_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = pdarc_write,
};

static void destroy_caches(void)
{
	int i;

	for (i = 0; i < NDATA; i++)
		kmem_cache_destroy(data_caches[i].cache);
	for (i = 0; i < NMETA; i++)
		kmem_cache_destroy(meta_caches[i].cache);
}

static int create(struct pdarc_cache *c)
{
	/* usersize != 0: never aliased to another cache, so the name survives */
	c->cache = kmem_cache_create_usercopy(c->name, c->size, 0, 0, 0, c->size, NULL);
	return c->cache ? 0 : -ENOMEM;
}

static int __init pdarc_init(void)
{
	int i;

	for (i = 0; i < NDATA; i++)
		if (create(&data_caches[i]))
			goto fail;
	for (i = 0; i < NMETA; i++)
		if (create(&meta_caches[i]))
			goto fail;
	if (!proc_create("pdarc", 0600, NULL, &pdarc_ops))
		goto fail;
	return 0;
fail:
	destroy_caches();
	return -ENOMEM;
}

static void __exit pdarc_exit(void)
{
	struct arc_hdr *h, *t;
	struct dnode *dn, *dt;

	remove_proc_entry("pdarc", NULL);
	list_for_each_entry_safe(h, t, &records, link) {
		cache_free(&data_caches[h->data_cache], h->data);
		cache_free(&meta_caches[BUF], h->buf);
		cache_free(&meta_caches[DBUF], h->dbuf);
		list_del(&h->link);
		cache_free(&meta_caches[HDR], h);
	}
	list_for_each_entry_safe(dn, dt, &dnodes, link) {
		list_del(&dn->link);
		cache_free(&meta_caches[DNODE], dn);
	}
	destroy_caches();
}

module_init(pdarc_init);
module_exit(pdarc_exit);
MODULE_DESCRIPTION("progdump: a ZFS ARC stand-in (named kmem caches filled with file-like data)");
MODULE_LICENSE("GPL");
