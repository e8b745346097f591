/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Where tracked sockets point: connect(2) fills conn_ip_map, close(2) empties
 * it, and conn_events mirrors both (and each TLS object's socket) to the
 * agent, so a restarted agent knows where open sockets go.
 */
#ifndef KLOAK_CONN_H
#define KLOAK_CONN_H

#include "maps.h"

#define EINPROGRESS 115

/* (tgid, fd) -> where connect(2) pointed the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct conn_key);
	__type(value, struct conn_val);
} conn_ip_map SEC(".maps");

struct connect_arg {
	__u64 addr;
	__s32 fd;
	__u32 len;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct connect_arg);
} connect_args SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} conn_events SEC(".maps");

/* Best effort: a full ring loses mirroring of this socket, never data. */
static __always_inline void emit_conn(__u32 kind, struct conn_key *k, struct conn_val *v)
{
	struct conn_event *e = bpf_ringbuf_reserve(&conn_events, sizeof(*e), 0);
	if (!e)
		return;
	e->kind = kind;
	e->tgid = k->tgid;
	e->fd = k->fd;
	e->_pad = 0;
	e->obj = 0;
	e->v = *v;
	e->group = current_group();
	bpf_ringbuf_submit(e, 0);
}

/* The mirror follows which socket each TLS object writes to, too: a
 * restarted agent could not learn it again until the next handshake. */
static __always_inline void emit_ssl(struct obj_key *k, __s32 fd)
{
	struct conn_event *e = bpf_ringbuf_reserve(&conn_events, sizeof(*e), 0);
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = CONN_SSL;
	e->tgid = k->tgid;
	e->fd = fd;
	e->obj = k->ptr;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline bool read_sockaddr(__u64 uaddr, struct conn_val *v)
{
	__u8 sa[24] = {};
	if (!uaddr || bpf_probe_read_user(sa, sizeof(sa), (void *)uaddr) < 0)
		return false;
	__u16 family = sa[0] | (sa[1] << 8);
	v->family = family;
	v->port = sa[2] | (sa[3] << 8); /* stays in network order */
	if (family == AF_INET) {
		__builtin_memcpy(v->addr, &sa[4], 4);
		return true;
	}
	if (family == AF_INET6) {
		__builtin_memcpy(v->addr, &sa[8], 16);
		return true;
	}
	return false;
}

SEC("tp/syscalls/sys_enter_connect")
int on_connect_enter(struct trace_event_raw_sys_enter *ctx)
{
	if (!tracked())
		return 0;
	struct connect_arg a = { .fd = (__s32)ctx->args[0], .addr = ctx->args[1], .len = (__u32)ctx->args[2] };
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&connect_args, &tid, &a, BPF_ANY);
	return 0;
}

SEC("tp/syscalls/sys_exit_connect")
int on_connect_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct connect_arg *a = bpf_map_lookup_elem(&connect_args, &tid);
	if (!a)
		return 0;
	struct connect_arg arg = *a;
	bpf_map_delete_elem(&connect_args, &tid);
	if (ctx->ret != 0 && ctx->ret != -EINPROGRESS)
		return 0;
	struct conn_val v = {};
	if (!read_sockaddr(arg.addr, &v))
		return 0;
	v.ts_ns = bpf_ktime_get_ns();
	struct conn_key k = { .tgid = bpf_get_current_pid_tgid() >> 32, .fd = arg.fd };
	bpf_map_update_elem(&conn_ip_map, &k, &v, BPF_ANY);
	emit_conn(CONN_OPEN, &k, &v);
	return 0;
}

SEC("tp/syscalls/sys_enter_close")
int on_close(struct trace_event_raw_sys_enter *ctx)
{
	if (!tracked())
		return 0;
	struct conn_key k = { .tgid = bpf_get_current_pid_tgid() >> 32, .fd = (__s32)ctx->args[0] };
	/* Most closed fds were never connected sockets: only real ones are news. */
	if (bpf_map_delete_elem(&conn_ip_map, &k) == 0) {
		struct conn_val none = {};
		emit_conn(CONN_CLOSE, &k, &none);
	}
	return 0;
}

#endif
