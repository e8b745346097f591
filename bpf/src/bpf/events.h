/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* Records on tls_events, and the stop that hands a thread to the agent. */
#ifndef KLOAK_EVENTS_H
#define KLOAK_EVENTS_H

#include "scan.h"

#define SIGSTOP 19

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} tls_events SEC(".maps");

/* bpf_ringbuf_submit and bpf_ringbuf_query flags (uapi bpf.h). */
#define KLOAK_RB_NO_WAKEUP 1
#define KLOAK_RB_FORCE_WAKEUP 2
#define KLOAK_RB_AVAIL_DATA 0
#define KLOAK_RB_RING_SIZE 1

/* For records nobody waits on (what the wire armed, held or missed): wake
 * the agent only once a sixteenth of the ring is waiting (some 50 records
 * at the default size). It reads them in batches, at the latest at its
 * next poll (50 ms), instead of waking once per request. Not later: a write
 * whose report finds the ring full is not armed (every substitution is
 * traced). Records that leave a thread stopped always wake it. */
static __always_inline __u64 lazy_wakeup(void)
{
	__u64 avail = bpf_ringbuf_query(&tls_events, KLOAK_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(&tls_events, KLOAK_RB_RING_SIZE);
	/* Forced: the default would wake the agent only if it had read
	 * everything before this record, which the records held back say it
	 * has not. */
	return avail > size / 16 ? KLOAK_RB_FORCE_WAKEUP : KLOAK_RB_NO_WAKEUP;
}

/* For every other record. The kernel's default wakes the agent only when it
 * has read everything before this record, on the grounds that it was woken
 * for that earlier data; a record submitted by lazy_wakeup() broke that
 * promise, so when anything besides this record is waiting, wake it now.
 * Without this an exec or a decision could wait for the agent's next poll. */
static __always_inline __u64 wakeup(void)
{
	__u64 avail = bpf_ringbuf_query(&tls_events, KLOAK_RB_AVAIL_DATA);
	return avail > 2 * sizeof(struct tls_event) ? KLOAK_RB_FORCE_WAKEUP : 0;
}

static __always_inline struct tls_event *new_event(__u32 kind)
{
	struct tls_event *e = bpf_ringbuf_reserve(&tls_events, sizeof(*e), 0);
	if (!e) {
		stat_add(ST_LOST, 1);
		return 0;
	}
	__u64 pt = bpf_get_current_pid_tgid();
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup = current_group();
	e->kind = kind;
	e->tgid = pt >> 32;
	e->tid = (__u32)pt;
	e->buf = 0;
	e->len = 0;
	e->cookie = 0;
	e->dev = 0;
	e->ino = 0;
	e->nhits = 0;
	e->flags = 0;
	e->fd = -1;
	__builtin_memset(e->hits, 0, sizeof(e->hits));
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

static __always_inline void copy_hits(struct hit *dst, const struct hit *src, __u32 n)
{
#pragma unroll
	for (int j = 0; j < MAX_HITS; j++) {
		if (j < n)
			dst[j] = src[j];
	}
}

/* An event about this write that nothing waits on. */
static __always_inline struct tls_event *write_event(struct scan_ctx *c, __u32 kind)
{
	struct tls_event *e = new_event(kind);
	if (!e)
		return 0;
	e->buf = c->buf;
	e->len = c->len;
	e->cookie = c->cookie;
	e->fd = c->fd;
	return e;
}

static __always_inline void emit_unknown(struct scan_ctx *c)
{
	struct tls_event *e = write_event(c, EV_UNKNOWN);
	if (!e)
		return;
	e->nhits = c->nunknown;
	bpf_ringbuf_submit(e, wakeup());
}

static __always_inline void emit_split(struct scan_ctx *c)
{
	struct tls_event *e = write_event(c, EV_SPLIT);
	if (!e)
		return;
	e->nhits = 1;
	e->hits[0] = c->split;
	bpf_ringbuf_submit(e, wakeup());
}

/* Tokens that went out unchanged without stopping anyone: reported only. */
static __always_inline void emit_noted(struct scan_ctx *c)
{
	if (c->nunknown)
		emit_unknown(c);
	if (c->nsplit)
		emit_split(c);
}

static __always_inline void stop_self(void)
{
	stat_add(ST_STOPS, 1);
	bpf_send_signal_thread(SIGSTOP);
}

#endif
