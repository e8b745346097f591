/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* After the library returns, the placeholder goes back into the buffer. */
#ifndef KLOAK_SCRUB_H
#define KLOAK_SCRUB_H

#include "tls_write.h"

SEC("uretprobe")
int tls_write_return_pause(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending *p = bpf_map_lookup_elem(&pending_scrub, &tid);
	if (!p)
		return 0;
	struct tls_event *e = new_event(EV_SCRUB);
	if (e) {
		e->buf = p->buf;
		e->nhits = p->nmatch;
		copy_hits(e->hits, p->match, p->nmatch);
		bpf_ringbuf_submit(e, wakeup());
	}
	bpf_map_delete_elem(&pending_scrub, &tid);
	if (e)
		stop_self();
	return 0;
}

struct scrub_ctx {
	struct pending *p;
};

static long scrub_match(__u64 i, void *data)
{
	struct scrub_ctx *s = data;
	if (i >= MAX_HITS)
		return 1;
	struct hit *h = &s->p->match[i & (MAX_HITS - 1)];
	struct secret_val *v = bpf_map_lookup_elem(&secret_map, &h->key);
	if (!v)
		return 0;
	__u32 len = h->len;
	if (len < MIN_SECRET_LEN || len > MAX_SECRET_LEN || len != v->len)
		return 0;
	if (write_user((void *)(s->p->buf + h->off), v->placeholder, len) < 0)
		stat_add(ST_WRITE_FAIL, 1);
	return 0;
}

SEC("uretprobe")
int tls_write_return_inplace(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending *p = bpf_map_lookup_elem(&pending_scrub, &tid);
	if (!p)
		return 0;
	struct scrub_ctx s = { .p = p };
	bpf_loop(p->nmatch, scrub_match, &s, 0);
	struct tls_event *e = new_event(EV_SCRUBBED);
	if (e) {
		e->buf = p->buf;
		e->nhits = p->nmatch;
		copy_hits(e->hits, p->match, p->nmatch);
		bpf_ringbuf_submit(e, wakeup());
	}
	bpf_map_delete_elem(&pending_scrub, &tid);
	return 0;
}

#endif
