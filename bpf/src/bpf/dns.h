/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * DNS answers that may verify a destination's name.
 *
 * The packet path (cgroup_skb on the cgroup2 root) is the one the agent uses
 * wherever it attaches: an answer is read from the datagram as the kernel
 * received it and counts only if it answers a query the same socket sent,
 * from the address and port that query went to, with the query's id, once.
 * Which process asked is the task the kernel ran the query's send in. Nothing
 * is read from the application's memory, so a hostile application can neither
 * forge the source (a sockaddr of its own, addrlen 0) nor the payload (a buffer
 * it rewrites).
 *
 * The receive syscalls' tracepoints below are the fallback for a node where
 * no cgroup2 hierarchy takes the programs. They read the payload and source
 * from user memory, which a hostile application controls; doctor and the
 * agent's log say when that is what runs.
 */
#ifndef KLOAK_DNS_H
#define KLOAK_DNS_H

#include "conn.h"

#define IPPROTO_UDP 17
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define DNS_PORT_BE 0x3500 /* htons(53) */
#define DNS_HDR_LEN 12
/* Resolvers retry after a few seconds; an answer later than this answers
 * nothing the application still waits for. */
#define DNS_QUERY_TTL_NS (30ULL * 1000000000ULL)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} dns_events SEC(".maps");

/* ------------------------------------------------------------------ */
/* The packet path.                                                    */

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

/* A query a tracked socket sent: its cookie and the DNS id. The cookie is
 * the kernel's, unique for the boot, so a reused descriptor or port is
 * another key. */
struct dns_query_key {
	__u64 cookie;
	__u16 id;
	__u16 _pad[3];
};

struct dns_query {
	__u64 ts_ns;
	__u32 tgid;        /* the task that sent it */
	__u16 family;      /* enum addr_family */
	__be16 port;       /* where it went */
	__u8 addr[16];
};

/* LRU: a query never answered ages out under pressure instead of holding
 * a slot; an answer to a query evicted that way verifies nothing. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct dns_query_key);
	__type(value, struct dns_query);
} dns_queries SEC(".maps");

struct udp_pkt {
	__u16 family;
	__be16 sport;
	__be16 dport;
	__u16 _pad;
	__u32 off;        /* of the UDP payload */
	__u32 len;        /* UDP payload bytes */
	__u8 saddr[16];
	__u8 daddr[16];
};

/* The socket the packet belongs to, if it is a UDP one. */
static __always_inline struct sock *udp_sk_of(struct __sk_buff *skb)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	struct sock *sk = kskb->sk;
	if (!sk || sk->sk_protocol != IPPROTO_UDP)
		return 0;
	return sk;
}

/* cgroup_skb programs see the packet from its network header on. */
static __always_inline bool parse_udp(struct __sk_buff *skb, struct udp_pkt *p)
{
	__builtin_memset(p, 0, sizeof(*p));
	__u8 ip[40];
	__u32 l4;
	if (bpf_skb_load_bytes(skb, 0, ip, 20) < 0)
		return false;
	if ((ip[0] >> 4) == 4) {
		if (ip[9] != IPPROTO_UDP || ((ip[6] & 0x3f) | ip[7]) != 0)
			return false;
		p->family = AF_INET;
		__builtin_memcpy(p->saddr, ip + 12, 4);
		__builtin_memcpy(p->daddr, ip + 16, 4);
		l4 = (ip[0] & 0xf) * 4;
		if (l4 < 20)
			return false;
	} else if ((ip[0] >> 4) == 6) {
		if (bpf_skb_load_bytes(skb, 0, ip, 40) < 0)
			return false;
		/* Extension headers: no resolver sends them. */
		if (ip[6] != IPPROTO_UDP)
			return false;
		p->family = AF_INET6;
		__builtin_memcpy(p->saddr, ip + 8, 16);
		__builtin_memcpy(p->daddr, ip + 24, 16);
		l4 = 40;
	} else {
		return false;
	}
	__u8 uh[8];
	if (bpf_skb_load_bytes(skb, l4, uh, sizeof(uh)) < 0)
		return false;
	__builtin_memcpy(&p->sport, uh, 2);
	__builtin_memcpy(&p->dport, uh + 2, 2);
	__u32 ulen = ((__u32)uh[4] << 8) | uh[5];
	if (ulen < 8 + DNS_HDR_LEN)
		return false;
	p->off = l4 + 8;
	p->len = ulen - 8;
	return true;
}

/* A socket in a network namespace owned by another user namespace belongs to
 * whoever created that namespace, unprivileged users included: they may give
 * it any address, so "the resolver's address" means nothing there. */
static __always_inline bool sk_in_initial_userns(struct sock *sk)
{
	struct net *net = sk->__sk_common.skc_net.net;
	if (!net)
		return false;
	struct user_namespace *ns = net->user_ns;
	return ns && ns->level == 0;
}

SEC("cgroup_skb/egress")
int dns_egress(struct __sk_buff *skb)
{
	struct sock *sk = udp_sk_of(skb);
	if (!sk)
		return 1;
	struct udp_pkt p;
	if (!parse_udp(skb, &p) || p.dport != DNS_PORT_BE)
		return 1;
	/* The task running the send is the asker only if it is in the socket's
	 * cgroup; otherwise this is not process context we can name. */
	if (bpf_get_current_cgroup_id() != bpf_skb_cgroup_id(skb) || !tracked())
		return 1;
	if (!sk_in_initial_userns(sk)) {
		stat_add(ST_DNS_FOREIGN, 1);
		return 1;
	}
	__u8 h[DNS_HDR_LEN];
	if (bpf_skb_load_bytes(skb, p.off, h, sizeof(h)) < 0)
		return 1;
	/* A standard query (QR 0, opcode 0) with no answer or authority records:
	 * a resolver that echoes a malformed message back must not echo records
	 * the application wrote into it. */
	if ((h[2] & 0xf8) != 0 || (h[6] | h[7] | h[8] | h[9]) != 0)
		return 1;
	struct dns_query_key k = {};
	k.cookie = bpf_get_socket_cookie(skb);
	__builtin_memcpy(&k.id, h, 2);
	struct dns_query q = {};
	q.ts_ns = bpf_ktime_get_ns();
	q.tgid = bpf_get_current_pid_tgid() >> 32;
	q.family = p.family;
	q.port = p.dport;
	__builtin_memcpy(q.addr, p.daddr, 16);
	bpf_map_update_elem(&dns_queries, &k, &q, BPF_ANY);
	stat_add(ST_DNS_QUERIES, 1);
	return 1;
}

SEC("cgroup_skb/ingress")
int dns_ingress(struct __sk_buff *skb)
{
	if (!udp_sk_of(skb))
		return 1;
	struct udp_pkt p;
	if (!parse_udp(skb, &p) || p.sport != DNS_PORT_BE)
		return 1;
	__u8 h[4];
	if (bpf_skb_load_bytes(skb, p.off, h, sizeof(h)) < 0 || !(h[2] & 0x80))
		return 1;
	struct dns_query_key k = {};
	k.cookie = bpf_get_socket_cookie(skb);
	__builtin_memcpy(&k.id, h, 2);
	struct dns_query *qp = bpf_map_lookup_elem(&dns_queries, &k);
	if (!qp)
		return 1;
	struct dns_query q = *qp;
	__u64 now = bpf_ktime_get_ns();
	__u64 qa[2], pa[2];
	__builtin_memcpy(qa, q.addr, 16);
	__builtin_memcpy(pa, p.saddr, 16);
	if (q.family != p.family || q.port != p.sport || qa[0] != pa[0] || qa[1] != pa[1]) {
		stat_add(ST_DNS_MISMATCH, 1);
		return 1;
	}
	/* Once: of two answers racing on two CPUs, only the deleter counts. */
	if (bpf_map_delete_elem(&dns_queries, &k) != 0)
		return 1;
	if (now - q.ts_ns > DNS_QUERY_TTL_NS) {
		stat_add(ST_DNS_MISMATCH, 1);
		return 1;
	}
	struct dns_event *e = bpf_ringbuf_reserve(&dns_events, sizeof(*e), 0);
	if (!e) {
		stat_add(ST_LOST, 1);
		return 1;
	}
	e->ts_ns = now;
	e->tgid = q.tgid;
	e->family = p.family;
	e->port = p.sport;
	__builtin_memcpy(e->addr, p.saddr, 16);
	__u32 n = p.len > DNS_MAX_PAYLOAD ? DNS_MAX_PAYLOAD : p.len;
	e->len = n;
	e->_pad = 0;
	if (n < DNS_HDR_LEN || bpf_skb_load_bytes(skb, p.off, e->payload, n) < 0) {
		bpf_ringbuf_discard(e, 0);
		return 1;
	}
	bpf_ringbuf_submit(e, 0);
	stat_add(ST_DNS_ANSWERS, 1);
	return 1;
}

/* ------------------------------------------------------------------ */
/* The fallback: receive syscalls, reading user memory.                */

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

#endif
