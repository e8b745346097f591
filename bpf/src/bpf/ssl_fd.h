/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* Which socket a TLS object writes to. */
#ifndef KLOAK_SSL_FD_H
#define KLOAK_SSL_FD_H

#include "conn.h"

/* tid -> SSL* whose handshake the thread is running. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} hs_ssl SEC(".maps");

/* A TLS object gets its socket: the cookie says which register holds the
 * fd. GnuTLS's pointer setters carry an fd cast to a pointer by convention;
 * anything that does not look like an fd is left alone. */
SEC("uprobe")
int ssl_set_fd(struct pt_regs *ctx)
{
	if (!tracked())
		return 0;
	__u64 ssl = ctx->di, si = ctx->si, dx = ctx->dx;
	__u64 v = bpf_get_attach_cookie(ctx) == FD_ARG_RDX ? dx : si;
	if (v >= (1 << 20))
		return 0;
	__s32 fd = (__s32)v;
	struct obj_key k = obj_key_of(ssl);
	bpf_map_update_elem(&ssl_fd, &k, &fd, BPF_ANY);
	emit_ssl(&k, fd);
	return 0;
}

SEC("uprobe")
int ssl_handshake_enter(struct pt_regs *ctx)
{
	if (!tracked())
		return 0;
	__u64 ssl = ctx->di;
	if (cfg_wire)
		set_cur_ssl(ssl);
	struct obj_key k = obj_key_of(ssl);
	if (bpf_map_lookup_elem(&ssl_fd, &k))
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&hs_ssl, &tid, &ssl, BPF_ANY);
	return 0;
}

/* Wire backend: an SSL_free ends the object's key material, whether or not
 * a patched record ever made a flow that TCP_CLOSE would clean up; and an
 * address reused by a later SSL_new starts with no keys. */
SEC("uprobe")
int ssl_free_enter(struct pt_regs *ctx)
{
	if (!cfg_wire)
		return 0;
	struct obj_key k = obj_key_of(ctx->di);
	bpf_map_delete_elem(&wire_keys, &k);
	return 0;
}

SEC("uretprobe")
int ssl_handshake_exit(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_delete_elem(&hs_ssl, &tid);
	return 0;
}

/* (tgid, BIO*) -> fd, for socket BIOs made with BIO_new_socket (openssl s_client). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct obj_key);
	__type(value, __s32);
} bio_fd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __s32);
} bio_args SEC(".maps");

SEC("uprobe")
int bio_new_socket_enter(struct pt_regs *ctx)
{
	if (!tracked())
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__s32 fd = (__s32)ctx->di;
	bpf_map_update_elem(&bio_args, &tid, &fd, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int bio_new_socket_exit(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__s32 *fd = bpf_map_lookup_elem(&bio_args, &tid);
	if (!fd)
		return 0;
	__s32 v = *fd;
	__u64 bio = ctx->ax;
	bpf_map_delete_elem(&bio_args, &tid);
	if (bio) {
		struct obj_key k = obj_key_of(bio);
		bpf_map_update_elem(&bio_fd, &k, &v, BPF_ANY);
	}
	return 0;
}

/* SSL_set_bio(ssl, rbio, wbio): the write BIO's socket is the SSL*'s. */
SEC("uprobe")
int ssl_set_bio(struct pt_regs *ctx)
{
	if (!tracked())
		return 0;
	__u64 ssl = ctx->di, wbio = ctx->dx;
	struct obj_key bk = obj_key_of(wbio);
	__s32 *fd = bpf_map_lookup_elem(&bio_fd, &bk);
	if (fd) {
		__s32 v = *fd;
		struct obj_key k = obj_key_of(ssl);
		bpf_map_update_elem(&ssl_fd, &k, &v, BPF_ANY);
		emit_ssl(&k, v);
	}
	return 0;
}

/* A handshake's first socket write (custom BIOs such as curl's) names the fd. */
static __always_inline void handshake_write(long fd)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *ssl = bpf_map_lookup_elem(&hs_ssl, &tid);
	if (!ssl)
		return;
	struct obj_key key = obj_key_of(*ssl);
	__s32 v = (__s32)fd;
	if (bpf_map_update_elem(&ssl_fd, &key, &v, BPF_NOEXIST) == 0)
		emit_ssl(&key, v);
	bpf_map_delete_elem(&hs_ssl, &tid);
}

/* The four socket-write tracepoints hand the wire's work to one program
 * by tail call, so the verifier checks wire_send once instead of four times
 * (seconds each): only writes of threads with pending hits get there. */
struct send_args {
	__s64 fd;
	__u64 buf;
	__u64 len;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct send_args);
} wire_send_args SEC(".maps");

/* Slot 0: wire_send_prog, when the wire backend is loaded. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} wire_send_progs SEC(".maps");

static __always_inline void wire_send_call(void *ctx, long fd, __u64 buf, __u64 len)
{
	if (!cfg_wire || !buf || !len)
		return;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	/* A Go goroutine's record moves into the thread's slot first. */
	go_take(tid, fd);
	if (!bpf_map_lookup_elem(&wire_pending, &tid))
		return;
	__u32 zero = 0;
	struct send_args *a = bpf_map_lookup_elem(&wire_send_args, &zero);
	if (!a)
		return;
	a->fd = fd;
	a->buf = buf;
	a->len = len;
	/* Does not return when the program is there; when it is not, the
	 * record goes out unpatched and the placeholder arrives. */
	bpf_tail_call(ctx, &wire_send_progs, 0);
}

/* Bare "tp": never attached by itself, only reached by tail call. */
SEC("tp")
int wire_send_prog(struct trace_event_raw_sys_enter *ctx)
{
	__u32 zero = 0;
	struct send_args *a = bpf_map_lookup_elem(&wire_send_args, &zero);
	if (a)
		wire_send(a->fd, a->buf, a->len);
	return 0;
}

SEC("tp/syscalls/sys_enter_write")
int on_write_enter(struct trace_event_raw_sys_enter *ctx)
{
	handshake_write((long)ctx->args[0]);
	wire_send_call(ctx, (long)ctx->args[0], ctx->args[1], ctx->args[2]);
	return 0;
}

SEC("tp/syscalls/sys_enter_sendto")
int on_sendto_enter(struct trace_event_raw_sys_enter *ctx)
{
	handshake_write((long)ctx->args[0]);
	wire_send_call(ctx, (long)ctx->args[0], ctx->args[1], ctx->args[2]);
	return 0;
}

/* The first iovec: where a TLS library's record writes put the record. */
static __always_inline void wire_send_iov(void *ctx, long fd, __u64 iov)
{
	if (!cfg_wire || !iov)
		return;
	__u64 v[2];
	if (bpf_probe_read_user(v, sizeof(v), (void *)iov) < 0)
		return;
	wire_send_call(ctx, fd, v[0], v[1]);
}

SEC("tp/syscalls/sys_enter_sendmsg")
int on_sendmsg_enter(struct trace_event_raw_sys_enter *ctx)
{
	handshake_write((long)ctx->args[0]);
	if (cfg_wire && ctx->args[1]) {
		/* struct msghdr: msg_iov at 16 */
		__u64 iov = 0;
		bpf_probe_read_user(&iov, sizeof(iov), (void *)(ctx->args[1] + 16));
		wire_send_iov(ctx, (long)ctx->args[0], iov);
	}
	return 0;
}

SEC("tp/syscalls/sys_enter_writev")
int on_writev_enter(struct trace_event_raw_sys_enter *ctx)
{
	handshake_write((long)ctx->args[0]);
	wire_send_iov(ctx, (long)ctx->args[0], ctx->args[1]);
	return 0;
}

#endif
