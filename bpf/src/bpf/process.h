/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Following processes: forks inherit pid tracking, and exec and executable
 * mappings stop the thread until the agent has attached to whatever TLS
 * library they bring.
 */
#ifndef KLOAK_PROCESS_H
#define KLOAK_PROCESS_H

#include "events.h"

#define PROT_EXEC 0x4

/* Files the agent has already looked at; mapping them again needs no stop. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct inode_key);
	__type(value, __u8);
} known_inodes SEC(".maps");

struct mmap_pending {
	struct inode_key key;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct mmap_pending);
} mmap_args SEC(".maps");

SEC("tp/sched/sched_process_fork")
int on_fork(struct trace_event_raw_sched_process_fork *ctx)
{
	__u32 parent = bpf_get_current_pid_tgid() >> 32;
	__u64 *g = bpf_map_lookup_elem(&tracked_pids, &parent);
	if (!g)
		return 0;
	__u64 group = *g;
	__u32 child = ctx->child_pid;
	bpf_map_update_elem(&tracked_pids, &child, &group, BPF_ANY);
	return 0;
}

SEC("tp/sched/sched_process_exit")
int on_exit(void *ctx)
{
	__u64 pt = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pt;
	/* Whole processes only: the leader's exit. */
	if (tid == (pt >> 32) && tracked()) {
		struct tls_event *e = new_event(EV_EXIT);
		if (e)
			bpf_ringbuf_submit(e, wakeup());
	}
	bpf_map_delete_elem(&tracked_pids, &tid);
	return 0;
}

SEC("tp/sched/sched_process_exec")
int on_exec(void *ctx)
{
	if (!tracked())
		return 0;
	struct tls_event *e = new_event(EV_EXEC);
	if (!e)
		return 0;
	bpf_ringbuf_submit(e, wakeup());
	stop_self();
	return 0;
}

SEC("tp/syscalls/sys_enter_mmap")
int on_mmap_enter(struct trace_event_raw_sys_enter *ctx)
{
	unsigned long prot = ctx->args[2];
	long fd = (long)ctx->args[4];
	if (!(prot & PROT_EXEC) || fd < 0)
		return 0;
	if (!tracked())
		return 0;
	struct task_struct *task = (void *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = 0;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) < 0 || !f)
		return 0;
	struct mmap_pending mp = {};
	mp.key.ino = BPF_CORE_READ(f, f_inode, i_ino);
	mp.key.dev = BPF_CORE_READ(f, f_inode, i_sb, s_dev);
	if (bpf_map_lookup_elem(&known_inodes, &mp.key))
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&mmap_args, &tid, &mp, BPF_ANY);
	return 0;
}

SEC("tp/syscalls/sys_exit_mmap")
int on_mmap_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct mmap_pending *mp = bpf_map_lookup_elem(&mmap_args, &tid);
	if (!mp)
		return 0;
	struct inode_key key = mp->key;
	bpf_map_delete_elem(&mmap_args, &tid);
	if (ctx->ret < 0 && ctx->ret > -4096)
		return 0;
	struct tls_event *e = new_event(EV_MMAP);
	if (!e)
		return 0;
	e->dev = key.dev;
	e->ino = key.ino;
	e->buf = (__u64)ctx->ret;
	bpf_ringbuf_submit(e, wakeup());
	stop_self();
	return 0;
}

#endif
