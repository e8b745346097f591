/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * DNS answers: UDP datagrams from port 53 that tracked processes read, from
 * the receive syscalls' tracepoints or, where the kernel has kprobes, the
 * seed's hook on udp_recvmsg/udpv6_recvmsg.
 */
#ifndef KLOAK_DNS_H
#define KLOAK_DNS_H

#include "conn.h"

#define IPPROTO_UDP 17
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define DNS_PORT_BE 0x3500 /* htons(53) */

struct recv_arg {
	__u64 buf;   /* payload buffer (recvfrom, read) */
	__u64 addr;  /* sockaddr the kernel fills (recvfrom), or the msghdr (recvmsg) */
	__s32 fd;
	__u32 kind;
};

#define RECV_FROM 1
#define RECV_MSG 2
#define RECV_READ 3
#define RECV_MMSG 4
#define RECV_READV 5

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct recv_arg);
} recv_args SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} dns_events SEC(".maps");

static __always_inline struct sock *udp_sock_of(long fd)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = 0;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) < 0 || !f)
		return 0;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	struct socket *so = BPF_CORE_READ(f, private_data);
	struct sock *sk = so ? BPF_CORE_READ(so, sk) : 0;
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_UDP)
		return 0;
	return sk;
}

static __always_inline void recv_enter(long fd, __u64 buf, __u64 addr, __u32 kind)
{
	if (!tracked() || !udp_sock_of(fd))
		return;
	struct recv_arg a = { .buf = buf, .addr = addr, .fd = (__s32)fd, .kind = kind };
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&recv_args, &tid, &a, BPF_ANY);
}

SEC("tp/syscalls/sys_enter_recvfrom")
int on_recvfrom_enter(struct trace_event_raw_sys_enter *ctx)
{
	recv_enter((long)ctx->args[0], ctx->args[1], ctx->args[4], RECV_FROM);
	return 0;
}

SEC("tp/syscalls/sys_enter_recvmsg")
int on_recvmsg_enter(struct trace_event_raw_sys_enter *ctx)
{
	recv_enter((long)ctx->args[0], 0, ctx->args[1], RECV_MSG);
	return 0;
}

SEC("tp/syscalls/sys_enter_recvmmsg")
int on_recvmmsg_enter(struct trace_event_raw_sys_enter *ctx)
{
	recv_enter((long)ctx->args[0], 0, ctx->args[1], RECV_MMSG);
	return 0;
}

SEC("tp/syscalls/sys_enter_readv")
int on_readv_enter(struct trace_event_raw_sys_enter *ctx)
{
	recv_enter((long)ctx->args[0], ctx->args[1], 0, RECV_READV);
	return 0;
}

SEC("tp/syscalls/sys_enter_read")
int on_read_enter(struct trace_event_raw_sys_enter *ctx)
{
	recv_enter((long)ctx->args[0], ctx->args[1], 0, RECV_READ);
	return 0;
}

static __always_inline int emit_dns(struct conn_val *srcp, __u64 payload, long ret);

/* struct user_msghdr / iovec as user space lays them out on x86_64. */
struct umsg {
	__u64 name;
	__u32 namelen;
	__u32 _pad;
	__u64 iov;
	__u64 iovlen;
};

static __always_inline int recv_exit(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct recv_arg *ap = bpf_map_lookup_elem(&recv_args, &tid);
	if (!ap)
		return 0;
	struct recv_arg a = *ap;
	bpf_map_delete_elem(&recv_args, &tid);
	if (ret <= 12) /* shorter than a DNS header */
		return 0;

	struct conn_val src = {};
	__u64 payload = a.buf;
	__u64 from = 0;
	if (a.kind == RECV_FROM) {
		from = a.addr;
	} else if (a.kind == RECV_READV) {
		__u64 iov[2];
		if (bpf_probe_read_user(iov, sizeof(iov), (void *)a.buf) < 0)
			return 0;
		payload = iov[0];
		if (ret > iov[1])
			ret = iov[1];
	} else if (a.kind == RECV_MSG || a.kind == RECV_MMSG) {
		/* recvmmsg: the first message; its length follows the 56-byte msghdr. */
		if (a.kind == RECV_MMSG) {
			__u32 len = 0;
			if (bpf_probe_read_user(&len, sizeof(len), (void *)(a.addr + 56)) < 0)
				return 0;
			ret = len;
		}
		struct umsg m;
		__u64 iov[2];
		if (bpf_probe_read_user(&m, sizeof(m), (void *)a.addr) < 0 || !m.iovlen)
			return 0;
		if (bpf_probe_read_user(iov, sizeof(iov), (void *)m.iov) < 0)
			return 0;
		from = m.name;
		payload = iov[0];
		if (ret > iov[1])
			ret = iov[1];
	}
	if (!from || !read_sockaddr(from, &src)) {
		/* A connected socket (read, or recvfrom without an address): its peer. */
		struct sock *sk = udp_sock_of(a.fd);
		if (!sk)
			return 0;
		src.family = BPF_CORE_READ(sk, __sk_common.skc_family);
		src.port = BPF_CORE_READ(sk, __sk_common.skc_dport);
		if (src.family == AF_INET) {
			__be32 d = BPF_CORE_READ(sk, __sk_common.skc_daddr);
			__builtin_memcpy(src.addr, &d, 4);
		} else if (src.family == AF_INET6) {
			BPF_CORE_READ_INTO(&src.addr, sk, __sk_common.skc_v6_daddr);
		} else {
			return 0;
		}
	}
	return emit_dns(&src, payload, ret);
}

/* One DNS datagram from `src` whose first `ret` bytes are at user `payload`. */
static __always_inline int emit_dns(struct conn_val *srcp, __u64 payload, long ret)
{
	struct conn_val src = *srcp;
	if (src.port != DNS_PORT_BE || ret <= 12)
		return 0;

	struct dns_event *e = bpf_ringbuf_reserve(&dns_events, sizeof(*e), 0);
	if (!e) {
		stat_add(ST_LOST, 1);
		return 0;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->family = src.family;
	e->port = src.port;
	__builtin_memcpy(e->addr, src.addr, 16);
	__u32 n = ret > DNS_MAX_PAYLOAD ? DNS_MAX_PAYLOAD : (__u32)ret;
	e->len = n;
	e->_pad = 0;
	if (bpf_probe_read_user(e->payload, n, (void *)payload) < 0) {
		bpf_ringbuf_discard(e, 0);
		return 0;
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp/syscalls/sys_exit_recvfrom")
int on_recvfrom_exit(struct trace_event_raw_sys_exit *ctx)
{
	return recv_exit(ctx->ret);
}

SEC("tp/syscalls/sys_exit_recvmsg")
int on_recvmsg_exit(struct trace_event_raw_sys_exit *ctx)
{
	return recv_exit(ctx->ret);
}

SEC("tp/syscalls/sys_exit_recvmmsg")
int on_recvmmsg_exit(struct trace_event_raw_sys_exit *ctx)
{
	/* ret counts messages; recv_exit takes the first one's length. */
	return ctx->ret > 0 ? recv_exit(DNS_MAX_PAYLOAD) : 0;
}

SEC("tp/syscalls/sys_exit_readv")
int on_readv_exit(struct trace_event_raw_sys_exit *ctx)
{
	return recv_exit(ctx->ret);
}

SEC("tp/syscalls/sys_exit_read")
int on_read_exit(struct trace_event_raw_sys_exit *ctx)
{
	return recv_exit(ctx->ret);
}

/* ------------------------------------------------------------------ */
/* The seed's hook, where the kernel has kprobes: udp_recvmsg and      */
/* udpv6_recvmsg see every UDP receive, io_uring's included. The agent */
/* uses these instead of the syscall tracepoints when they attach.     */

struct kp_arg {
	__u64 sk;
	__u64 msg;
	__u64 ubuf;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct kp_arg);
} kp_args SEC(".maps");

/* The user buffer a receive copies into, from the kernel's iov_iter. */
static __always_inline __u64 iter_user_base(struct msghdr *msg)
{
	__u8 type = BPF_CORE_READ(msg, msg_iter.iter_type);
	if (bpf_core_field_exists(msg->msg_iter.ubuf) && type == bpf_core_enum_value(enum iter_type, ITER_UBUF))
		return (__u64)BPF_CORE_READ(msg, msg_iter.ubuf);
	const struct iovec *iov;
	if (bpf_core_field_exists(msg->msg_iter.__iov))
		iov = BPF_CORE_READ(msg, msg_iter.__iov);
	else
		iov = BPF_CORE_READ((struct msghdr___old *)msg, msg_iter.iov);
	return iov ? (__u64)BPF_CORE_READ(iov, iov_base) : 0;
}

SEC("kprobe")
int kp_udp_recvmsg(struct pt_regs *ctx)
{
	if (!tracked())
		return 0;
	struct kp_arg a = { .sk = ctx->di, .msg = ctx->si };
	a.ubuf = iter_user_base((struct msghdr *)a.msg);
	if (!a.ubuf)
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&kp_args, &tid, &a, BPF_ANY);
	return 0;
}

SEC("kretprobe")
int kp_udp_recvmsg_ret(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct kp_arg *ap = bpf_map_lookup_elem(&kp_args, &tid);
	if (!ap)
		return 0;
	struct kp_arg a = *ap;
	bpf_map_delete_elem(&kp_args, &tid);
	long ret = (long)ctx->ax;
	if (ret <= 12)
		return 0;
	struct conn_val src = {};
	/* msg_name is the kernel's copy of the source address, filled on return. */
	/* Plain locals: BPF_CORE_READ must not see kp_arg, which has no kernel BTF. */
	struct msghdr *msg = (struct msghdr *)a.msg;
	void *name = BPF_CORE_READ(msg, msg_name);
	__u8 sa[24] = {};
	if (name && bpf_probe_read_kernel(sa, sizeof(sa), name) == 0 && (sa[0] | (sa[1] << 8))) {
		src.family = sa[0] | (sa[1] << 8);
		src.port = sa[2] | (sa[3] << 8);
		if (src.family == AF_INET)
			__builtin_memcpy(src.addr, &sa[4], 4);
		else if (src.family == AF_INET6)
			__builtin_memcpy(src.addr, &sa[8], 16);
		else
			return 0;
	} else {
		struct sock *sk = (struct sock *)a.sk;
		src.family = BPF_CORE_READ(sk, __sk_common.skc_family);
		src.port = BPF_CORE_READ(sk, __sk_common.skc_dport);
		if (src.family == AF_INET) {
			__be32 d = BPF_CORE_READ(sk, __sk_common.skc_daddr);
			__builtin_memcpy(src.addr, &d, 4);
		} else if (src.family == AF_INET6) {
			BPF_CORE_READ_INTO(&src.addr, sk, __sk_common.skc_v6_daddr);
		} else {
			return 0;
		}
	}
	return emit_dns(&src, a.ubuf, ret);
}

#endif
