/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The probes on TLS write functions. Phase 1 (tls_write_enter) filters by
 * tracking, takes buffer and length from the registers the cookie's ABI names
 * and tail calls the chosen backend's phase 2: the pause backend stops the
 * thread for the agent to patch (lockdown-safe), the in-place backend writes
 * the real bytes itself (needs bpf_probe_write_user).
 */
#ifndef KLOAK_TLS_WRITE_H
#define KLOAK_TLS_WRITE_H

#include "wire.h"
#include "conn.h"

/* Slot 0: the phase 2 program of the chosen backend. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} phase2_progs SEC(".maps");

/* Go: *tls.Conn -> conn net.Conn (itab, data) -> *net.TCPConn -> conn.fd
 * *netFD -> pfd.Sysfd, after pfd.fdmu (16 bytes). These layouts have held
 * since Go 1.9; a failed read gives -1 (unknown), which blocks. */
static __always_inline __s32 go_conn_fd(__u64 tls_conn)
{
	__u64 iface[2], netfd;
	__s64 sysfd;
	if (bpf_probe_read_user(iface, sizeof(iface), (void *)tls_conn) < 0 || !iface[1])
		return -1;
	if (bpf_probe_read_user(&netfd, sizeof(netfd), (void *)iface[1]) < 0 || !netfd)
		return -1;
	if (bpf_probe_read_user(&sysfd, sizeof(sysfd), (void *)(netfd + 16)) < 0)
		return -1;
	return sysfd >= 0 && sysfd < 0x7fffffff ? (__s32)sysfd : -1;
}

SEC("uprobe")
int tls_write_enter(struct pt_regs *ctx)
{
	if (!tracked())
		return 0;

	__u64 cookie = bpf_get_attach_cookie(ctx);
	/* Read every candidate register up front with fixed offsets: the
	 * verifier refuses loads through a ctx pointer clang has offset. */
	__u64 di = ctx->di, si = ctx->si, dx = ctx->dx, ax = ctx->ax, bx = ctx->bx, cx = ctx->cx;
	__u64 r14 = ctx->r14;
	__u64 buf, len;
	/* Keys derived from here on are this object's, even in a write too
	 * short to scan: openssl s_client runs its handshake in a write of
	 * zero bytes. */
	if (cfg_wire && ((cookie & ABI_MASK) == ABI_SSL_WRITE || (cookie & ABI_MASK) == ABI_SSL_WRITE_EX))
		set_cur_ssl(di);
	switch (cookie & ABI_MASK) {
	case ABI_SSL_WRITE: /* SysV: rdi ssl, rsi buf, edx num */
		if ((int)dx <= 0)
			return 0;
		buf = si;
		len = (__u64)(int)dx;
		break;
	case ABI_SSL_WRITE_EX:
	case ABI_GNUTLS_SEND:
	case ABI_RUSTLS_WRITE:
		buf = si;
		len = dx;
		break;
	case ABI_GO_TLS_WRITE:
		buf = bx;
		len = cx;
		if (cfg_wire)
			go_enter_conn(ax, r14);
		break;
	default:
		return 0;
	}
	if (cfg_wire && ((cookie & ABI_MASK) == ABI_SSL_WRITE || (cookie & ABI_MASK) == ABI_SSL_WRITE_EX))
		wire_count(di, len);
	if (len < MIN_SECRET_LEN || !buf)
		return 0;

	__u32 zero = 0;
	struct scan_ctx *c = bpf_map_lookup_elem(&scan_scratch, &zero);
	if (!c)
		return 0;
	c->buf = buf;
	c->len = len;
	c->cookie = cookie;
	c->tid = (__u32)bpf_get_current_pid_tgid();
	c->nhits = 0;
	c->nmatch = 0;
	c->nunknown = 0;
	c->nsplit = 0;
	c->flags = 0;
	c->wire_only = 0;
	c->wire_rules = 0;
	bool go = (cookie & ABI_MASK) == ABI_GO_TLS_WRITE;
	c->fd = go ? go_conn_fd(ax) : ssl_to_fd(di);
	/* Go: the *tls.Conn is the object wire_keys knows the connection by. */
	c->obj = go ? ax : di;
	c->g = go ? r14 : 0;
	if (cfg_wire) {
		if (go) {
			go_write_begins(c->g);
		} else {
			wire_write_begins(c->tid, di, len);
		}
	}

	bpf_tail_call(ctx, &phase2_progs, 0);
	stat_add(ST_TAILCALL_FAIL, 1);
	return 0;
}

static __always_inline bool has_ret_probe(__u64 cookie)
{
	/* Go gets no return probe: uretprobes corrupt its moving stacks. */
	return (cookie & ABI_MASK) != ABI_GO_TLS_WRITE;
}

static __always_inline void remember_for_scrub(struct scan_ctx *c)
{
	if (!cfg_scrub || !has_ret_probe(c->cookie) || !c->nmatch)
		return;
	struct pending p = {};
	p.buf = c->buf;
	p.nmatch = c->nmatch;
	copy_hits(p.match, c->match, c->nmatch);
	bpf_map_update_elem(&pending_scrub, &c->tid, &p, BPF_ANY);
}

/* Stops the writer with its hits for the agent: `kind` EV_REWRITE or
 * EV_SCAN patch its memory (pause), EV_DECIDE only decides (wire). */
static __always_inline void stop_for_agent(struct scan_ctx *c, __u32 kind)
{
	struct tls_event *e = new_event(kind);
	if (!e)
		return; /* no agent will hear of it: let the placeholder go out */
	e->buf = c->buf;
	e->len = c->len;
	e->cookie = c->cookie;
	e->fd = c->fd;
	e->flags = c->flags;
	e->nhits = c->nmatch;
	copy_hits(e->hits, c->match, c->nmatch);
	bpf_ringbuf_submit(e, wakeup());
	if (kind != EV_DECIDE)
		remember_for_scrub(c);
	stop_self();
}

/* Takes the hits of require-wire secrets out of a write no wire patch
 * serves: no other backend may write their values, so they go out
 * unchanged, reported and counted. */
/* Whether pause may still serve a SECRET_WIRE_RULES secret in this write:
 * the writer is in cfg_pause_netns (host-network pods under the node agent,
 * which the wire cannot reach), or the socket was connected before this
 * agent loaded (its handshake, and so its keys and suite, went by unseen;
 * the destination is the one the state file restored into conn_ip_map). */
static __always_inline bool pause_may_serve_rules(struct scan_ctx *c)
{
	if (cfg_pause_netns) {
		struct task_struct *t = (void *)bpf_get_current_task();
		if (BPF_CORE_READ(t, nsproxy, net_ns, ns.inum) == cfg_pause_netns)
			return true;
	}
	struct conn_key k = { .tgid = bpf_get_current_pid_tgid() >> 32, .fd = c->fd };
	struct conn_val *v = bpf_map_lookup_elem(&conn_ip_map, &k);
	return v && v->ts_ns && v->ts_ns < cfg_loaded_ns;
}

static __always_inline void drop_wire_only(struct scan_ctx *c)
{
	if (c->wire_rules && !pause_may_serve_rules(c))
		c->wire_only |= c->wire_rules;
	c->wire_rules = 0;
	if (!c->wire_only)
		return;
	struct tls_event *e = write_event(c, EV_REQUIRE_WIRE);
	__u32 kept = 0, dropped = 0;
#pragma unroll
	for (int i = 0; i < MAX_HITS; i++) {
		if (i >= c->nmatch)
			break;
		if (c->wire_only & (1u << i)) {
			if (e)
				e->hits[dropped & (MAX_HITS - 1)] = c->match[i];
			dropped++;
			continue;
		}
		if (kept != i)
			c->match[kept & (MAX_HITS - 1)] = c->match[i];
		kept++;
	}
	c->nmatch = kept;
	c->wire_only = 0;
	stat_add(ST_REQUIRE_WIRE, dropped);
	if (e) {
		e->nhits = dropped;
		bpf_ringbuf_submit(e, wakeup());
	}
}

static __always_inline bool needs_full_scan(struct scan_ctx *c)
{
	return c->flags & (EVF_UNREADABLE | EVF_OVERFLOW | EVF_HUFFMAN);
}

SEC("uprobe")
int tls_write_scan_pause(struct pt_regs *ctx)
{
	struct scan_ctx *c = scan();
	if (!c)
		return 0;
	bool full_scan = needs_full_scan(c);
	/* A full scan in user space reports its own unknown and split tokens,
	 * and refuses require-wire secrets itself. */
	if (!full_scan) {
		emit_noted(c);
		drop_wire_only(c);
		if (!c->nmatch)
			return 0;
	}
	stop_for_agent(c, full_scan ? EV_SCAN : EV_REWRITE);
	return 0;
}

/* The wire backend's phase 2: no stop when the record can be patched on
 * the wire; the pause backend serves what it cannot, except require-wire
 * secrets, which then go out unchanged. */
SEC("uprobe")
int tls_write_scan_wire(struct pt_regs *ctx)
{
	struct scan_ctx *c = scan();
	if (!c)
		return 0;
	bool full_scan = needs_full_scan(c);
	if (!full_scan)
		emit_noted(c);
	if (!c->nmatch && !full_scan)
		return 0;
	if (!full_scan) {
		__u32 v = wire_arm(c);
		if (v == WIRE_SERVED)
			return 0;
		if (v == WIRE_DECIDE) {
			stop_for_agent(c, EV_DECIDE);
			return 0;
		}
		drop_wire_only(c);
		if (!c->nmatch)
			return 0;
	}
	stat_add(ST_WIRE_FALLBACK, 1);
	stop_for_agent(c, full_scan ? EV_SCAN : EV_REWRITE);
	return 0;
}

/*
 * The in-place write. The verifier-only build swaps the helper for one with
 * the same argument checks on the source bytes, so the program's shape is
 * verified on kernels whose lockdown refuses bpf_probe_write_user.
 */
#ifdef KLOAK_VERIFY_ONLY
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} verify_sink SEC(".maps");
#define write_user(dst, src, len) \
	({ (void)(dst); bpf_ringbuf_output(&verify_sink, (void *)(src), (len), 0); })
#else
#define write_user(dst, src, len) bpf_probe_write_user((dst), (src), (len))
#endif

static long write_match(__u64 i, void *data)
{
	struct scan_ctx *c = ((struct lctx *)data)->c;
	if (i >= MAX_HITS)
		return 1;
	struct hit *h = &c->match[i & (MAX_HITS - 1)];
	struct secret_val *v = bpf_map_lookup_elem(&secret_map, &h->key);
	if (!v)
		return 0;
	__u32 len = h->len;
	if (len < MIN_SECRET_LEN || len > MAX_SECRET_LEN || len != v->len)
		return 0;
	if (write_user((void *)(c->buf + h->off), v->value, len) < 0)
		stat_add(ST_WRITE_FAIL, 1);
	return 0;
}

SEC("uprobe")
int tls_write_scan_inplace(struct pt_regs *ctx)
{
	struct scan_ctx *c = scan();
	if (!c)
		return 0;
	emit_noted(c);
	drop_wire_only(c);
	if (!c->nmatch)
		return 0;
	struct lctx l = { .c = c };
	bpf_loop(c->nmatch, write_match, &l, 0);
	remember_for_scrub(c);
	struct tls_event *e = new_event(EV_REWRITTEN);
	if (!e)
		return 0;
	e->buf = c->buf;
	e->len = c->len;
	e->cookie = c->cookie;
	e->fd = c->fd;
	e->flags = c->flags;
	e->nhits = c->nmatch;
	copy_hits(e->hits, c->match, c->nmatch);
	bpf_ringbuf_submit(e, wakeup());
	return 0;
}

#endif
