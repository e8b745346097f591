/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * Phase 2's scan: the whole buffer is read CHUNK bytes at a time with
 * bpf_loop, searched for "kloak:" a word at a time, and every candidate is
 * checked against secret_map byte for byte. What the kernel cannot settle
 * (unreadable pages, too many prefixes, Huffman-coded headers) is flagged
 * for a scan from user space.
 */
#ifndef KLOAK_SCAN_H
#define KLOAK_SCAN_H

#include "maps.h"

#define CHUNK 512             /* bytes read per bpf_loop iteration */
#define CHUNK_BUF (CHUNK + 8) /* a chunk plus the overlap a prefix can straddle */

struct scan_ctx {
	__u64 buf;
	__u64 len;
	__u64 cookie;
	__u64 obj;                   /* the TLS object (SSL*, Go *tls.Conn) of the write, 0 if none */
	__u64 g;                     /* Go: the writing goroutine (R14); 0 for every other library */
	__u64 cur_off;
	__u64 cur_n;
	__u32 tid;
	__u32 nhits;
	__u32 nmatch;
	__u32 nunknown;
	__u32 nsplit;                /* 0 or 1: only the tail can be cut */
	__u32 flags;
	__u32 wire_only;             /* bit per match: its secret requires the wire */
	__u32 wire_rules;            /* bit per match: SECRET_WIRE_RULES (decided at drop_wire_only) */
	__s32 fd;
	struct hit split;            /* off, len = bytes to the end, key = random characters seen */
	struct hit hits[MAX_HITS];   /* prefix positions */
	struct hit match[MAX_HITS];  /* verified placeholders */
	__u8 chunk[CHUNK_BUF] __attribute__((aligned(8)));
	__u8 cmp[MAX_SECRET_LEN] __attribute__((aligned(8)));
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scan_ctx);
} scan_scratch SEC(".maps");

/* bpf_loop's context must live on the stack; the scratch is a map value. */
struct lctx {
	struct scan_ctx *c;
};

static __always_inline bool is_prefix_at(struct scan_ctx *c, __u64 p)
{
	return c->chunk[p] == 'k' && c->chunk[p + 1] == 'l' && c->chunk[p + 2] == 'o' &&
	       c->chunk[p + 3] == 'a' && c->chunk[p + 4] == 'k' && c->chunk[p + 5] == ':';
}

#define HASZERO(v) (((v) - 0x0101010101010101ULL) & ~(v) & 0x8080808080808080ULL)
#define HASBYTE(x, b) HASZERO((x) ^ (0x0101010101010101ULL * (__u8)(b)))

static __always_inline bool huff_sig_at(struct scan_ctx *c, __u64 p)
{
	__u8 b0 = c->chunk[p], b1 = c->chunk[p + 1], b2 = c->chunk[p + 2];
#pragma unroll
	for (int a = 0; a < 8; a++)
		if (b0 == cfg_huff_sig[a][0] && b1 == cfg_huff_sig[a][1] && b2 == cfg_huff_sig[a][2])
			return true;
	return false;
}

/* Flags the write for a user-space scan when an HPACK Huffman-coded prefix
 * may be in this word: the kernel does not decode bit strings. */
static __always_inline void huffman_candidates(struct scan_ctx *c, __u64 x, __u64 base)
{
	if (!cfg_huff_sig[0][0] || (c->flags & EVF_HUFFMAN))
		return;
	__u64 any = 0;
#pragma unroll
	for (int a = 0; a < 8; a++)
		any |= HASBYTE(x, cfg_huff_sig[a][0]);
	if (!any)
		return;
#pragma unroll
	for (int b = 0; b < 8; b++) {
		__u64 p = base + b;
		if (p + 3 > c->cur_n)
			return;
		if (huff_sig_at(c, p)) {
			c->flags |= EVF_HUFFMAN;
			return;
		}
	}
}

static long scan_word(__u64 w, void *data)
{
	struct scan_ctx *c = ((struct lctx *)data)->c;
	__u64 base = w * 8;
	if (base >= c->cur_n || base > CHUNK - 8)
		return 1;
	__u64 x = *(__u64 *)(c->chunk + base);
	huffman_candidates(c, x, base);
	__u64 y = x ^ 0x6b6b6b6b6b6b6b6bULL; /* zero byte where x has 'k' */
	if (!((y - 0x0101010101010101ULL) & ~y & 0x8080808080808080ULL))
		return 0;
#pragma unroll
	for (int b = 0; b < 8; b++) {
		__u64 p = base + b;
		if (p + PREFIX_LEN > c->cur_n)
			return 1;
		if (!is_prefix_at(c, p))
			continue;
		if (c->nhits >= MAX_HITS) {
			c->flags |= EVF_OVERFLOW;
			return 1;
		}
		c->hits[c->nhits & (MAX_HITS - 1)].off = (__u32)(c->cur_off + p);
		c->nhits++;
	}
	return 0;
}

static long scan_chunk(__u64 i, void *data)
{
	struct scan_ctx *c = ((struct lctx *)data)->c;
	__u64 off = i * CHUNK;
	if (off >= c->len)
		return 1;
	__u64 n = c->len - off;
	if (n > CHUNK + PREFIX_LEN)
		n = CHUNK + PREFIX_LEN;
	if (bpf_probe_read_user(c->chunk, n, (void *)(c->buf + off)) < 0) {
		/* Not faulted in yet, most likely: the agent scans it instead. */
		c->flags |= EVF_UNREADABLE;
		return 1;
	}
	c->cur_off = off;
	c->cur_n = n;
	bpf_loop(CHUNK / 8, scan_word, data, 0);
	return (c->flags & EVF_OVERFLOW) ? 1 : 0;
}

/* Full comparison of a placeholder with the bytes read at a hit. */
static __always_inline bool same_bytes(const __u8 *a, const __u8 *b, __u32 len)
{
#pragma unroll
	for (int j = 0; j < MAX_SECRET_LEN / 8; j++) {
		__u32 start = j * 8;
		if (start >= len)
			break;
		__u64 d = *(const __u64 *)(a + start) ^ *(const __u64 *)(b + start);
		__u32 left = len - start;
		if (left < 8)
			d &= (1ULL << (left * 8)) - 1;
		if (d)
			return false;
	}
	return true;
}

/* What the generator draws from: Crockford base32, widened for HPACK to
 * letters, digits, '-' and '_'. */
static __always_inline bool is_placeholder_char(__u8 ch)
{
	return (ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
	       ch == '-' || ch == '_';
}

/* A "kloak:" token at the end of the write that matched nothing: if what
 * follows the prefix could begin a placeholder, the write probably cut one
 * in two. Either part goes out unchanged; the agent reports it. */
static __always_inline bool note_split(struct scan_ctx *c, const struct secret_key *seen,
				       __u32 off, __u64 avail)
{
	/* Every byte after the prefix, not just the key's: a token that ends
	 * before the write does was not cut. Rare path; c->cmp holds them. */
#pragma unroll
	for (int j = PREFIX_LEN; j < MAX_SECRET_LEN; j++) {
		if (j >= avail)
			break;
		if (!is_placeholder_char(c->cmp[j]))
			return false;
	}
	c->split.off = off;
	c->split.id = 0;
	c->split.len = (__u32)avail;
	c->split.key = *seen;
	c->nsplit = 1;
	return true;
}

/* The write ends in "klo", "kloa" or "kloak": the start of a prefix. Shorter
 * tails ("k", "kl") are too common in ordinary text to call a split. */
static __always_inline void tail_prefix(struct scan_ctx *c)
{
	if (c->nsplit || c->len < 5 || (c->flags & EVF_UNREADABLE))
		return;
	__u8 t[5];
	if (bpf_probe_read_user(t, sizeof(t), (void *)(c->buf + c->len - 5)) < 0)
		return;
	__u32 n = 0;
	if (t[0] == 'k' && t[1] == 'l' && t[2] == 'o' && t[3] == 'a' && t[4] == 'k')
		n = 5;
	else if (t[1] == 'k' && t[2] == 'l' && t[3] == 'o' && t[4] == 'a')
		n = 4;
	else if (t[2] == 'k' && t[3] == 'l' && t[4] == 'o')
		n = 3;
	if (!n)
		return;
	c->split.off = (__u32)(c->len - n);
	c->split.id = 0;
	c->split.len = n;
	__builtin_memset(&c->split.key, 0, sizeof(c->split.key));
	c->nsplit = 1;
}

static long verify_hit(__u64 i, void *data)
{
	struct scan_ctx *c = ((struct lctx *)data)->c;
	if (i >= MAX_HITS)
		return 1;
	__u32 off = c->hits[i & (MAX_HITS - 1)].off;
	if (off >= c->len)
		return 0;
	__u64 avail = c->len - off;
	if (avail > MAX_SECRET_LEN)
		avail = MAX_SECRET_LEN;
	/* Zero first: same_bytes reads whole words. */
	__builtin_memset(c->cmp, 0, sizeof(c->cmp));
	if (bpf_probe_read_user(c->cmp, avail, (void *)(c->buf + off)) < 0) {
		c->flags |= EVF_UNREADABLE;
		return 0;
	}

	/* The map key is the random part, up to KEY_LEN characters, zero padded.
	 * A short placeholder has fewer than KEY_LEN random characters, so try
	 * the longest key first: the generator keeps no placeholder a prefix of
	 * another, so at most one length matches. */
	__u32 nrand = avail - PREFIX_LEN;
	if (nrand > KEY_LEN)
		nrand = KEY_LEN;
	struct secret_key k = {};
#pragma unroll
	for (int j = 0; j < KEY_LEN; j++)
		if (j < nrand)
			k.b[j] = c->cmp[PREFIX_LEN + j];
	struct secret_key seen = k;
	/* Runs to the end of the write: a placeholder there may be cut short. */
	bool tail = off + avail == c->len && avail < MAX_SECRET_LEN;
	if (avail < MIN_SECRET_LEN) {
		if (!(tail && note_split(c, &seen, off, avail)))
			c->nunknown++;
		return 0;
	}

#pragma unroll
	for (int klen = KEY_LEN; klen >= MIN_SECRET_LEN - PREFIX_LEN; klen--) {
		if (klen < KEY_LEN)
			k.b[klen] = 0;
		if (klen > nrand)
			continue;
		struct secret_val *v = bpf_map_lookup_elem(&secret_map, &k);
		if (!v)
			continue;
		__u32 len = v->len;
		if (len < MIN_SECRET_LEN || len > avail || len > MAX_SECRET_LEN)
			continue;
		if (!same_bytes(v->placeholder, c->cmp, len))
			continue;
		__u32 m = c->nmatch;
		if (m >= MAX_HITS)
			return 1;
		c->match[m].off = off;
		c->match[m].id = v->id;
		c->match[m].len = len;
		c->match[m].key = k;
		if (v->flags & SECRET_REQUIRE_WIRE)
			c->wire_only |= 1u << m;
		else if (v->flags & SECRET_WIRE_RULES)
			c->wire_rules |= 1u << m;
		c->nmatch = m + 1;
		return 0;
	}
	if (!(tail && note_split(c, &seen, off, avail)))
		c->nunknown++;
	return 0;
}

static __always_inline struct scan_ctx *scan(void)
{
	__u32 zero = 0;
	struct scan_ctx *c = bpf_map_lookup_elem(&scan_scratch, &zero);
	if (!c || c->tid != (__u32)bpf_get_current_pid_tgid())
		return 0;
	__u64 nchunks = (c->len + CHUNK - 1) / CHUNK;
	stat_add(ST_WRITES, 1);
	stat_add(ST_BYTES, c->len);
	struct lctx l = { .c = c };
	bpf_loop(nchunks, scan_chunk, &l, 0);
	if (c->nhits)
		bpf_loop(c->nhits, verify_hit, &l, 0);
	tail_prefix(c);
	if (c->nmatch)
		stat_add(ST_HITS, c->nmatch);
	if (c->nunknown)
		stat_add(ST_UNKNOWN, c->nunknown);
	if (c->flags & EVF_UNREADABLE)
		stat_add(ST_UNREADABLE, 1);
	if (c->flags & EVF_OVERFLOW)
		stat_add(ST_OVERFLOW, 1);
	if (c->flags & EVF_HUFFMAN)
		stat_add(ST_HUFFMAN, 1);
	if (c->nsplit)
		stat_add(ST_SPLIT, 1);
	return c;
}

#endif
