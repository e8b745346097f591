// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * Kloak's TLS write programs.
 *
 * Phase 1 (tls_write_enter) runs on entry to a TLS library's write function,
 * filters by cgroup, captures buffer and length into per-CPU scratch and tail
 * calls phase 2. Phase 2 scans the whole buffer with bpf_loop for "kloak:",
 * verifies every candidate against secret_map byte for byte, and then either
 * stops the thread for the agent to patch (pause backend, lockdown-safe) or
 * writes the real bytes itself (in-place backend, needs bpf_probe_write_user).
 *
 * Anything uncertain leaves the buffer alone: a full ring buffer, a token
 * that matches nothing, a scratch slot clobbered by another task.
 */
#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "kloak.h"

char LICENSE[] SEC("license") = "GPL";

#define SIGSTOP 19
#define PROT_EXEC 0x4

/* Set by the loader through rodata. */
const volatile __u32 cfg_scrub = 1;
const volatile __u32 cfg_agent_tgid = 0;
/* "kloak:" HPACK Huffman-coded starting at bit offset a (0-7) of a byte: the
 * first three bytes it fully covers. Computed by the loader from the HPACK
 * table; all zero disables the Huffman search. */
const volatile __u8 cfg_huff_sig[8][3] = {};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct secret_key);
	__type(value, struct secret_val);
} secret_map SEC(".maps");

/* cgroup v2 ids whose processes are ours to rewrite. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} tracked_cgroups SEC(".maps");

/* Processes tracked by pid, for containers that exist only in cgroup v1
 * hierarchies (no cgroup v2 id to match): tgid, or the tid of a thread a
 * tracked process created, -> the agent's id for the container. Forks are
 * followed here; exits remove. LRU: under pressure an entry goes, and that
 * process's placeholders go out unchanged. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} tracked_pids SEC(".maps");

/* Files the agent has already looked at; mapping them again needs no stop. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct inode_key);
	__type(value, __u8);
} known_inodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} tls_events SEC(".maps");

struct scan_ctx {
	__u64 buf;
	__u64 len;
	__u64 cookie;
	__u64 cur_off;
	__u64 cur_n;
	__u32 tid;
	__u32 nhits;
	__u32 nmatch;
	__u32 nunknown;
	__u32 nsplit;                /* 0 or 1: only the tail can be cut */
	__u32 flags;
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

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Hits a thread's current write carries, for the scrub on return. */
struct pending {
	__u64 buf;
	__u32 nmatch;
	__u32 _pad;
	struct hit match[MAX_HITS];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct pending);
} pending_scrub SEC(".maps");

struct mmap_pending {
	struct inode_key key;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct mmap_pending);
} mmap_args SEC(".maps");

/* Slot 0: the phase 2 program of the chosen backend. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} phase2_progs SEC(".maps");

/* ---- destinations ---- */

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_UDP 17
#define S_IFMT 00170000
#define S_IFSOCK 0140000
#define EINPROGRESS 115
#define DNS_PORT_BE 0x3500 /* htons(53) */

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

/* (tgid, SSL*) -> socket fd, from SSL_set_fd or the first socket write of a handshake. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct obj_key);
	__type(value, __s32);
} ssl_fd SEC(".maps");

/* tid -> SSL* whose handshake the thread is running. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} hs_ssl SEC(".maps");

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

/* Give the skeleton Rust types for the event layouts. */
struct conn_event _conn_event_type = {};
struct obj_key _obj_key_type = {};
struct tls_event _event_type = {};
struct dns_event _dns_event_type = {};
struct conn_val _conn_val_type = {};

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += n;
}

static __always_inline bool tracked(void)
{
	__u64 pt = bpf_get_current_pid_tgid();
	__u32 tgid = pt >> 32;
	if (tgid == cfg_agent_tgid)
		return false;
	__u64 cg = bpf_get_current_cgroup_id();
	if (bpf_map_lookup_elem(&tracked_cgroups, &cg))
		return true;
	return bpf_map_lookup_elem(&tracked_pids, &tgid) != 0;
}

/* What events report as the writer's group: the container id the agent
 * gave a pid-tracked process, else the cgroup v2 id. */
static __always_inline __u64 current_group(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 *g = bpf_map_lookup_elem(&tracked_pids, &tgid);
	return g ? *g : bpf_get_current_cgroup_id();
}

/* ------------------------------------------------------------------ */
/* Phase 1                                                             */

static __always_inline struct obj_key obj_key_of(__u64 ptr)
{
	struct obj_key k = { .tgid = bpf_get_current_pid_tgid() >> 32, ._pad = 0, .ptr = ptr };
	return k;
}

static __always_inline __s32 ssl_to_fd(__u64 ssl)
{
	struct obj_key k = obj_key_of(ssl);
	__s32 *fd = bpf_map_lookup_elem(&ssl_fd, &k);
	return fd ? *fd : -1;
}

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
	__u64 buf, len;
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
		break;
	default:
		return 0;
	}
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
	c->fd = (cookie & ABI_MASK) == ABI_GO_TLS_WRITE ? go_conn_fd(ax) : ssl_to_fd(di);

	bpf_tail_call(ctx, &phase2_progs, 0);
	stat_add(ST_TAILCALL_FAIL, 1);
	return 0;
}

/* ------------------------------------------------------------------ */
/* Phase 2: scan                                                       */

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
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void emit_split(struct scan_ctx *c)
{
	struct tls_event *e = write_event(c, EV_SPLIT);
	if (!e)
		return;
	e->nhits = 1;
	e->hits[0] = c->split;
	bpf_ringbuf_submit(e, 0);
}

/* Tokens that went out unchanged without stopping anyone: reported only. */
static __always_inline void emit_noted(struct scan_ctx *c)
{
	if (c->nunknown)
		emit_unknown(c);
	if (c->nsplit)
		emit_split(c);
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

static __always_inline void stop_self(void)
{
	stat_add(ST_STOPS, 1);
	bpf_send_signal_thread(SIGSTOP);
}

SEC("uprobe")
int tls_write_scan_pause(struct pt_regs *ctx)
{
	struct scan_ctx *c = scan();
	if (!c)
		return 0;
	bool full_scan = c->flags & (EVF_UNREADABLE | EVF_OVERFLOW | EVF_HUFFMAN);
	/* A full scan in user space reports its own unknown and split tokens. */
	if (!full_scan)
		emit_noted(c);
	if (!c->nmatch && !full_scan)
		return 0;

	struct tls_event *e = new_event(full_scan ? EV_SCAN : EV_REWRITE);
	if (!e)
		return 0; /* no agent will hear of it: let the placeholder go out */
	e->buf = c->buf;
	e->len = c->len;
	e->cookie = c->cookie;
	e->fd = c->fd;
	e->flags = c->flags;
	e->nhits = c->nmatch;
	copy_hits(e->hits, c->match, c->nmatch);
	bpf_ringbuf_submit(e, 0);
	remember_for_scrub(c);
	stop_self();
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
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* ------------------------------------------------------------------ */
/* Scrub: after the library returns, the placeholder goes back.        */

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
		bpf_ringbuf_submit(e, 0);
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
		bpf_ringbuf_submit(e, 0);
	}
	bpf_map_delete_elem(&pending_scrub, &tid);
	return 0;
}

/* ------------------------------------------------------------------ */
/* Following processes: exec and executable mappings stop the thread   */
/* until the agent has attached to whatever TLS library they bring.    */

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
			bpf_ringbuf_submit(e, 0);
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
	bpf_ringbuf_submit(e, 0);
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
	bpf_ringbuf_submit(e, 0);
	stop_self();
	return 0;
}

/* ------------------------------------------------------------------ */
/* Which socket an SSL* writes to                                      */

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
	struct obj_key k = obj_key_of(ssl);
	if (bpf_map_lookup_elem(&ssl_fd, &k))
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&hs_ssl, &tid, &ssl, BPF_ANY);
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

SEC("tp/syscalls/sys_enter_write")
int on_write_enter(struct trace_event_raw_sys_enter *ctx)
{
	handshake_write((long)ctx->args[0]);
	return 0;
}

SEC("tp/syscalls/sys_enter_sendto")
int on_sendto_enter(struct trace_event_raw_sys_enter *ctx)
{
	handshake_write((long)ctx->args[0]);
	return 0;
}

SEC("tp/syscalls/sys_enter_sendmsg")
int on_sendmsg_enter(struct trace_event_raw_sys_enter *ctx)
{
	handshake_write((long)ctx->args[0]);
	return 0;
}

/* ------------------------------------------------------------------ */
/* connect / close                                                     */

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

/* ------------------------------------------------------------------ */
/* DNS answers: UDP datagrams from port 53 that tracked processes read */

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
