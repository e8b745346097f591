/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The wire backend: the real value never enters the application. The
 * application encrypts the placeholder; on its way out, a tc program XORs
 * (placeholder ^ value) into the record's ciphertext and corrects the tag.
 *
 * 1. Keys: EVP_KDF_derive (libcrypto's exported KDF entry point) derives
 *    every TLS 1.3 traffic key and the TLS 1.2 key block; its parameters
 *    are public OSSL_PARAM arrays naming the label, so no library struct
 *    offset is read. Keys go to wire_keys per (process, SSL*).
 * 2. Suite: the tc programs read the cipher suite from the ServerHello,
 *    which travels in clear, into wire_suites per client-side 4-tuple.
 * 3. The TLS write probe scans the plaintext (scan.h) and, when this
 *    connection's keys, suite and destination decision are known, leaves
 *    the hits in wire_pending for the thread instead of stopping it.
 * 4. The thread's next socket writes carry the records: the record headers
 *    are in clear in the buffer the kernel receives, and the socket's
 *    write_seq gives each byte's TCP sequence number. For each record, the
 *    plaintext range it carries gives the hits' ciphertext bytes; their
 *    XOR masks and the tag's correction go to wire_flows by sequence number.
 *    The destination is checked here, on the kernel's socket.
 * 5. tc patches every packet of the flow that carries those sequence
 *    numbers, retransmissions included (the kernel resends from its own,
 *    unpatched queue), until they are acknowledged or the flow closes.
 *
 * Anything uncertain leaves the record alone: the placeholder arrives and
 * the TLS stream stays valid. A packet that must be patched and cannot be
 * is dropped, so TCP sends it again.
 */
#ifndef KLOAK_WIRE_H
#define KLOAK_WIRE_H

#include <bpf/bpf_endian.h>
#include "gcm.h"
#include "chacha.h"
#include "events.h"
#include "conn.h"

#define IPPROTO_TCP 6
#define ETH_HLEN 14
#define ETH_P_IP_BE 0x0008   /* htons(0x0800) */
#define ETH_P_IPV6_BE 0xdd86 /* htons(0x86dd) */
#define TC_ACT_SHOT 2
/* TCX: let the next program on the device see the packet. TC_ACT_OK (0)
 * is TCX_PASS there, which ends the chain: a second Kloak on the host (two
 * `kloak run`, or one beside the node agent) would then never see a
 * packet, learn no suite, and send every write to pause. */
#define TCX_NEXT -1
#define TCP_CLOSE 7
#define BPF_F_RECOMPUTE_CSUM 1
#define TLS_HDR 5
#define TLS_TAG 16
#define TLS_MAX_REC (16384 + 256)
#define WIRE_SLOTS 16
#define WIRE_MASK MAX_SECRET_LEN
#define WIRE_RECORDS 16      /* records parsed per socket write */

/* Set by the loader: the wire backend is on. */
const volatile __u32 cfg_wire = 0;

/* A TCP connection as the client's socket sees it: source is the client. */
struct flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u16 family;
	__u16 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, __u32);
} wire_suites SEC(".maps");

/* XOR mask bytes for TCP sequence numbers [seq, seq + len). */
struct wire_patch {
	__u32 seq;
	__u32 len;
	__u8 mask[WIRE_MASK];
};

struct wire_flow {
	__u64 ssl;
	__u32 tgid;
	__u32 _pad;
	struct wire_patch p[WIRE_SLOTS];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2048);
	__type(key, struct flow_key);
	__type(value, struct wire_flow);
} wire_flows SEC(".maps");

/* Key material of one TLS object's sending side. */
struct wire_keys {
	__u8 c_fp[16];       /* first bytes of the client's current traffic secret */
	__u8 s_fp[16];
	__u8 key[32];        /* TLS 1.3 client write key */
	__u32 key_len;
	__u32 tls12;         /* key holds nothing; block holds the TLS 1.2 key block */
	__u8 block[128];
	__u32 block_len;
	__u32 h_suite;       /* suite pow was computed for; 0 = none */
	struct gf_pow pow;
	__u8 iv[12];         /* TLS 1.3 client write IV (ChaCha20's nonce base) */
	__u32 iv_set;
	/* Records the client has written under the current key, as counted at
	 * SSL_write: the estimate of the next record's sequence number, which
	 * a ChaCha20-Poly1305 record's own tag then proves or corrects. */
	__u64 next;
	__u32 epoch;         /* bumped when the write key changes */
	__u32 _pad2;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obj_key);
	__type(value, struct wire_keys);
} wire_keys SEC(".maps");

/* tid -> the SSL* whose call the thread is in (handshake, write). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} cur_ssl SEC(".maps");

enum kdf_kind {
	KDF_C_TRAFFIC = 1,
	KDF_S_TRAFFIC = 2,
	KDF_UPDATE = 3,
	KDF_KEY = 4,
	KDF_KEYBLOCK = 5,
	KDF_IV = 6,
};

struct kdf_arg {
	__u64 out;
	__u64 outlen;
	__u64 ssl;
	__u32 kind;
	__u32 _pad;
	__u8 in_fp[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct kdf_arg);
} kdf_args SEC(".maps");

/* (process, secret, destination) -> ALLOW_YES / ALLOW_NO, written by the
 * agent from its rules, bindings and trusted DNS answers; keyed by the
 * address the kernel's socket holds. */
struct allow_key {
	__u32 tgid;
	__u32 id;
	__u16 family;
	__be16 port;
	__u32 _pad;
	__u8 addr[16];
};

enum allow_val {
	ALLOW_YES = 1,
	ALLOW_NO = 2,
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct allow_key);
	__type(value, __u8);
} wire_allow SEC(".maps");

/* Secret ids every destination may receive, with no decision to wait for:
 * written by `kloak run` for secrets without rules (no per-pod bindings
 * there), never by the node agent, whose bindings are per pod. Without it
 * a process's first write could race the agent's decision at connect(2)
 * and stop for it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} wire_any_dest SEC(".maps");

/* Hits of a thread's TLS write, waiting for the records that carry them. */
struct wire_pending {
	__u64 ssl;
	__u64 buf;
	__u64 num;
	__u64 cursor;        /* plaintext bytes of the write already seen in records */
	__u64 cookie;
	__s32 fd;
	__u32 nmatch;
	__u32 placed;        /* bit per hit: every byte of it is in a record */
	__u32 epoch;         /* the key's epoch at SSL_write */
	__u64 rseq;          /* estimated sequence number of the write's first record */
	__u64 recs;          /* records of the write seen so far */
	/* Go: the writing goroutine, and the one record its last encrypt made
	 * (rec_ok), which the goroutine's next socket write carries. */
	__u64 g;
	__u32 rec_ok;
	__u32 rec_len;       /* that record's plaintext bytes */
	__u32 flags;         /* PEND_* */
	__u32 _pad;
	struct hit match[MAX_HITS];
};

enum {
	/* SSL_write began with no key for its object: the handshake runs inside
	 * it (an implicit handshake: openssl s_client, Node). Its records wait
	 * for the key, and nothing of it goes to pause. */
	PEND_DEFERRED = 1,
	/* The write's records are the last ones of the socket write that
	 * carries them, not the first: a memory BIO (Node) flushes the
	 * handshake's last records, or earlier writes, in the same write. */
	PEND_SUFFIX = 2,
	/* A memory BIO whose socket is not known yet: its first writes, which
	 * may also run the end of the handshake (TLS 1.2, where the key comes
	 * before the handshake ends). */
	PEND_UNBOUND = 4,
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct wire_pending);
} wire_pending SEC(".maps");

/* (process, SSL*) -> the socket its records were found on, for TLS objects
 * whose own fd is unknown (memory BIOs: Node): learned from the kernel's
 * socket write that carried a PEND_SUFFIX write's records. Used only to
 * look up the flow's suite and decision at SSL_write; the socket write
 * checks everything again on its own socket. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obj_key);
	__type(value, __s32);
} wire_mem_fd SEC(".maps");

/*
 * Go crypto/tls. A goroutine moves between threads, so Go's state is keyed
 * by goroutine (R14 in Go's register ABI), never by thread, and no return
 * probe is used (they corrupt Go's moving stacks).
 */

/* (process, goroutine) -> the *tls.Conn it last wrote to, handshook on or
 * took a KeyUpdate on: the three places where a goroutine encrypts records
 * or sets keys. Write is the one probe every request already pays for; the
 * handshake and KeyUpdate probes fire once per connection or key, not per
 * Read and Write as handshakeContext (their common entry) would. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obj_key);
	__type(value, __u64);
} go_g_conn SEC(".maps");

/* (process, goroutine) -> the halfConn whose setTrafficSecret (TLS 1.3) it
 * is in: the next AEAD it builds is that halfConn's. */
struct go_hc_arg {
	__u64 hc;
	__u64 conn;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obj_key);
	__type(value, struct go_hc_arg);
} go_g_hc SEC(".maps");

/* One AEAD key as crypto/tls built it, with its IV: TLS 1.3 nonce mask
 * (12 bytes), TLS 1.2 AES-GCM nonce prefix (4) or ChaCha20 IV (12). */
struct go_key {
	__u8 key[32];
	__u8 iv[12];
	__u32 klen;
	__u32 ivlen;
	__u32 _pad;
} __attribute__((aligned(8)));

/* (process, goroutine) -> the TLS 1.2 keys its handshake built (client's
 * and server's, in an order nothing here relies on). The halfConn that
 * encrypts with the one whose IV its cipher holds is the sending side. */
struct go_cands {
	struct go_key c[2];
	__u32 n;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct obj_key);
	__type(value, struct go_cands);
} go_g_cands SEC(".maps");

/* The key of one halfConn of a *tls.Conn. */
struct go_half {
	__u64 hc;
	__u64 cobj;          /* the AEAD object its cipher held when the IV proved the key; 0 = not yet */
	__u64 next;          /* records encrypted under this key */
	struct go_key k;
	__u32 has;           /* k holds the halfConn's current key */
	__u32 tls12;
	__u32 epoch;
	__u32 _pad;
};

/* (process, *tls.Conn) -> its two halfConns' keys (in and out: the one
 * that encrypts is out). */
struct go_conn_keys {
	struct go_half h[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obj_key);
	__type(value, struct go_conn_keys);
} go_keys SEC(".maps");

/* (process, goroutine) -> its Write's hits; wire_pending is per thread. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct obj_key);
	__type(value, struct wire_pending);
} go_pending SEC(".maps");

/* Source of key epochs, per CPU so no two programs race for one (clang 14
 * cannot use an atomic add's result): the CPU in the top byte. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} wire_epoch SEC(".maps");

static __always_inline __u32 new_epoch(void)
{
	__u32 zero = 0;
	__u32 *e = bpf_map_lookup_elem(&wire_epoch, &zero);
	if (!e)
		return 0;
	*e += 1;
	/* Never 0: a new wire_keys entry's epoch. */
	__u32 v = (bpf_get_smp_processor_id() << 24) | (*e & 0xffffff);
	return v ? v : 1;
}

/* What the ChaCha20 re-tag reads and answers, kept in the scratch map: the
 * re-tag is a global function the verifier checks once, on its own, and
 * such a function takes only pointers to plain memory. */
struct retag {
	__u64 ct;            /* user address of the record's ciphertext */
	__u64 s0;            /* the record's estimated sequence number */
	__u64 found;         /* the sequence number its tag proved, or ~0 */
	__u32 clen;          /* ciphertext bytes the tag covers */
	__u32 rlen;
	__u32 cseq;          /* TCP sequence number of the ciphertext's first byte */
	__u32 rslots;        /* bit per patch slot armed in this record */
	__u32 tls12;
	__u32 bseq;          /* sequence number of the block being masked */
};

struct wire_scratch {
	struct aes_ctx aes;
	__u8 params[320];
	__u8 kdf_out[128];
	__u8 pkt[256];       /* a hit's mask; 256 so any slice of it is in bounds */
	__u8 old[256];
	__u8 new[256];
	__u8 blk[16];
	__u8 rtag[16];
	struct chacha_in cin;
	struct poly poly;
	struct retag rt;
	struct gf acc;
	struct gf d;
	struct gf tag;
	/* find_suffix: the socket write's records, header offset and length
	 * (0 for one that is not application data). */
	__u32 roff[WIRE_RECORDS];
	__u32 rlen[WIRE_RECORDS];
	/* Never written: the zero value new map entries start from (they are
	 * too big for the stack). */
	__u8 zero[2304];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct wire_scratch);
} wire_scratch SEC(".maps");

static __always_inline struct wire_scratch *scratch(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&wire_scratch, &zero);
}

/* ---- 1. keys ---------------------------------------------------------- */

static __always_inline void set_cur_ssl(__u64 ssl)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&cur_ssl, &tid, &ssl, BPF_ANY);
}

/* The little-endian word of the first n (<= 8) bytes of s. */
#define WORD(s, n) ((n) >= 8 ? *(const __u64 *)(s) : (*(const __u64 *)(s) & ((1ULL << (8 * (n))) - 1)))

static __always_inline __u32 label_kind(const __u8 *l, __u64 n)
{
	/* "c hs traffic", "c ap traffic", "s hs traffic", "s ap traffic" */
	if (n == 12 && l[1] == ' ' && l[4] == ' ' && l[5] == 't' && l[6] == 'r' && l[7] == 'a' &&
	    l[8] == 'f' && l[9] == 'f' && l[10] == 'i' && l[11] == 'c' &&
	    ((l[2] == 'h' && l[3] == 's') || (l[2] == 'a' && l[3] == 'p'))) {
		if (l[0] == 'c')
			return KDF_C_TRAFFIC;
		if (l[0] == 's')
			return KDF_S_TRAFFIC;
	}
	if (n == 11 && l[0] == 't' && l[1] == 'r' && l[7] == ' ' && l[8] == 'u' && l[9] == 'p' &&
	    l[10] == 'd')
		return KDF_UPDATE;
	if (n == 3 && l[0] == 'k' && l[1] == 'e' && l[2] == 'y')
		return KDF_KEY;
	if (n == 2 && l[0] == 'i' && l[1] == 'v')
		return KDF_IV;
	if (n == 13 && l[0] == 'k' && l[1] == 'e' && l[2] == 'y' && l[3] == ' ' && l[4] == 'e' &&
	    l[5] == 'x' && l[12] == 'n')
		return KDF_KEYBLOCK;
	return 0;
}

/* int EVP_KDF_derive(EVP_KDF_CTX *ctx, unsigned char *key, size_t keylen,
 *                    const OSSL_PARAM params[]) */
SEC("uprobe")
int kdf_enter(struct pt_regs *ctx)
{
	if (!cfg_wire || !tracked())
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *ssl = bpf_map_lookup_elem(&cur_ssl, &tid);
	if (!ssl)
		return 0;
	__u64 out = ctx->si, outlen = ctx->dx, params = ctx->cx;
	struct wire_scratch *w = scratch();
	if (!w || !params || outlen == 0 || outlen > 128)
		return 0;
	struct kdf_arg a = { .out = out, .outlen = outlen, .ssl = *ssl };
	/* OSSL_PARAM { const char *key; unsigned int data_type; void *data;
	 * size_t data_size; size_t return_size; }: public and 40 bytes. */
#pragma unroll
	for (int i = 0; i < 8; i++) {
		__u64 p[5];
		if (bpf_probe_read_user(p, sizeof(p), (void *)(params + 40 * i)) < 0 || !p[0])
			break;
		char name[8] = {};
		bpf_probe_read_user(name, sizeof(name), (void *)p[0]);
		__u64 size = p[3];
		__u8 d[16] = {};
		bool is_label = name[0] == 'l' && name[1] == 'a' && name[2] == 'b' && name[3] == 'e' &&
				name[4] == 'l' && name[5] == 0;
		bool is_seed = name[0] == 's' && name[1] == 'e' && name[2] == 'e' && name[3] == 'd' &&
			       name[4] == 0;
		bool is_key = name[0] == 'k' && name[1] == 'e' && name[2] == 'y' && name[3] == 0;
		if (!(is_label || is_seed || is_key) || !p[2])
			continue;
		if (bpf_probe_read_user(d, sizeof(d), (void *)p[2]) < 0)
			continue;
		if (is_key) {
			__builtin_memcpy(a.in_fp, d, 16);
		} else if (!a.kind) {
			__u32 k = label_kind(d, size);
			if (is_seed && k != KDF_KEYBLOCK)
				k = 0;
			if (is_label && k == KDF_KEYBLOCK)
				k = 0;
			a.kind = k;
		}
	}
	if (!a.kind)
		return 0;
	bpf_map_update_elem(&kdf_args, &tid, &a, BPF_ANY);
	return 0;
}

static __always_inline bool same16(const __u8 *a, const __u8 *b)
{
	return *(const __u64 *)a == *(const __u64 *)b && *(const __u64 *)(a + 8) == *(const __u64 *)(b + 8) &&
	       (*(const __u64 *)a | *(const __u64 *)(a + 8));
}

SEC("uretprobe")
int kdf_exit(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct kdf_arg *ap = bpf_map_lookup_elem(&kdf_args, &tid);
	if (!ap)
		return 0;
	struct kdf_arg a = *ap;
	bpf_map_delete_elem(&kdf_args, &tid);
	if ((int)ctx->ax != 1)
		return 0;
	struct wire_scratch *w = scratch();
	if (!w)
		return 0;
	__u64 n = a.outlen;
	if (n == 0 || n > 128)
		return 0;
	if (bpf_probe_read_user(w->kdf_out, n, (void *)a.out) < 0)
		return 0;
	struct obj_key k = obj_key_of(a.ssl);
	struct wire_keys *ks = bpf_map_lookup_elem(&wire_keys, &k);
	if (!ks) {
		_Static_assert(sizeof(struct wire_keys) <= sizeof(w->zero), "zero holds a wire_keys");
		bpf_map_update_elem(&wire_keys, &k, w->zero, BPF_NOEXIST);
		ks = bpf_map_lookup_elem(&wire_keys, &k);
		if (!ks)
			return 0;
	}
	switch (a.kind) {
	case KDF_C_TRAFFIC:
		__builtin_memcpy(ks->c_fp, w->kdf_out, 16);
		break;
	case KDF_S_TRAFFIC:
		__builtin_memcpy(ks->s_fp, w->kdf_out, 16);
		break;
	case KDF_UPDATE:
		if (same16(a.in_fp, ks->c_fp))
			__builtin_memcpy(ks->c_fp, w->kdf_out, 16);
		else if (same16(a.in_fp, ks->s_fp))
			__builtin_memcpy(ks->s_fp, w->kdf_out, 16);
		break;
	case KDF_KEY:
		if (!same16(a.in_fp, ks->c_fp) || (n != 16 && n != 32))
			break;
		__builtin_memcpy(ks->key, w->kdf_out, 32);
		ks->key_len = n;
		ks->tls12 = 0;
		ks->h_suite = 0;
		ks->iv_set = 0;
		/* TLS 1.3: a new key's records count from 0. */
		ks->next = 0;
		ks->epoch++;
		break;
	case KDF_IV:
		if (!same16(a.in_fp, ks->c_fp) || n != 12)
			break;
		__builtin_memcpy(ks->iv, w->kdf_out, 12);
		ks->iv_set = 1;
		break;
	case KDF_KEYBLOCK:
		__builtin_memcpy(ks->block, w->kdf_out, 128);
		ks->block_len = n;
		ks->tls12 = 1;
		ks->h_suite = 0;
		/* TLS 1.2: the client's Finished is record 0 of the new keys. */
		ks->next = 1;
		ks->epoch++;
		break;
	}
	return 0;
}

/* ---- suites ----------------------------------------------------------- */

struct suite_info {
	__u32 nk;        /* AES key words: 4 or 8 */
	__u32 explicit;  /* explicit nonce bytes before the ciphertext */
	__u32 inner;     /* content type byte after the content (TLS 1.3) */
	__u32 chacha;    /* ChaCha20-Poly1305: the tag is recomputed, not corrected */
};

/* AEAD suites only: AES-GCM (tag corrected by GHASH's linearity) and
 * ChaCha20-Poly1305 (tag recomputed). CBC suites are the pause backend's. */
static __always_inline bool suite_info(__u32 s, struct suite_info *i)
{
	switch (s) {
	case SUITE_TLS13_AES_128_GCM:
		*i = (struct suite_info){ 4, 0, 1, 0 };
		return true;
	case SUITE_TLS13_AES_256_GCM:
		*i = (struct suite_info){ 8, 0, 1, 0 };
		return true;
	case SUITE_TLS13_CHACHA20:
		*i = (struct suite_info){ 8, 0, 1, 1 };
		return true;
	case 0x009c: case 0x009e: case 0xc02b: case 0xc02f: /* *_AES_128_GCM_SHA256 */
		*i = (struct suite_info){ 4, 8, 0, 0 };
		return true;
	case 0x009d: case 0x009f: case 0xc02c: case 0xc030: /* *_AES_256_GCM_SHA384 */
		*i = (struct suite_info){ 8, 8, 0, 0 };
		return true;
	case 0xcca8: case 0xcca9: case 0xccaa: /* *_CHACHA20_POLY1305_SHA256 */
		*i = (struct suite_info){ 8, 0, 0, 1 };
		return true;
	}
	return false;
}

/* The client's write key for the suite, and H's powers for it. */
static __always_inline bool ensure_h(struct wire_keys *ks, __u32 suite, struct suite_info *si,
				     struct wire_scratch *w)
{
	if (ks->h_suite == suite)
		return true;
	__u32 klen = si->nk * 4;
	if (si->chacha) {
		/* TLS 1.2 key block: two 32-byte keys, two 12-byte IVs. */
		if (si->inner)
			return !ks->tls12 && ks->key_len == 32 && ks->iv_set;
		return ks->tls12 && ks->block_len == 2 * 32 + 2 * 12;
	}
	if (si->inner) {
		if (ks->tls12 || ks->key_len != klen)
			return false;
		aes_zero_block(&w->aes, (const struct aes_key *)ks->key, si->nk);
	} else {
		/* TLS 1.2 AEAD key block: client key, server key, client IV, server IV. */
		if (!ks->tls12 || ks->block_len != 2 * klen + 8)
			return false;
		aes_zero_block(&w->aes, (const struct aes_key *)ks->block, si->nk);
	}
	gcm_powers(&ks->pow, &w->aes);
	ks->h_suite = suite;
	return true;
}

/* ---- sockets ----------------------------------------------------------- */

static __always_inline struct sock *tcp_sock_of(long fd)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || fd < 0 || (unsigned int)fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = 0;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) < 0 || !f)
		return 0;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & 00170000) != 0140000)
		return 0;
	struct socket *so = BPF_CORE_READ(f, private_data);
	if (!so || BPF_CORE_READ(so, file) != f)
		return 0;
	struct sock *sk = BPF_CORE_READ(so, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	return sk;
}

static __always_inline bool flow_of(struct sock *sk, struct flow_key *f)
{
	__builtin_memset(f, 0, sizeof(*f));
	__u16 fam = BPF_CORE_READ(sk, __sk_common.skc_family);
	f->family = fam;
	f->sport = bpf_htons(BPF_CORE_READ(sk, __sk_common.skc_num));
	f->dport = BPF_CORE_READ(sk, __sk_common.skc_dport);
	if (fam == AF_INET) {
		__be32 s = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__be32 d = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(f->saddr, &s, 4);
		__builtin_memcpy(f->daddr, &d, 4);
		return true;
	}
	if (fam == AF_INET6) {
		BPF_CORE_READ_INTO(&f->saddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&f->daddr, sk, __sk_common.skc_v6_daddr);
		/* A v4-mapped v6 socket sends IPv4 packets: key it as tc sees it. */
		if (*(__u64 *)f->daddr == 0 && *(__u32 *)(f->daddr + 8) == 0xffff0000) {
			f->family = AF_INET;
			__builtin_memcpy(f->saddr, f->saddr + 12, 4);
			__builtin_memcpy(f->daddr, f->daddr + 12, 4);
			__builtin_memset(f->saddr + 4, 0, 12);
			__builtin_memset(f->daddr + 4, 0, 12);
		}
		return true;
	}
	return false;
}

static __always_inline __u8 allowed(__u32 tgid, __u32 id, struct flow_key *f)
{
	if (bpf_map_lookup_elem(&wire_any_dest, &id))
		return ALLOW_YES;
	struct allow_key k = { .tgid = tgid, .id = id, .family = f->family, .port = f->dport };
	__builtin_memcpy(k.addr, f->daddr, 16);
	__u8 *v = bpf_map_lookup_elem(&wire_allow, &k);
	return v ? *v : 0;
}

static __always_inline bool seq_before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

/* ---- 3. the write: serve it on the wire, or say why not ---------------- */

/* Whether this object's handshake, and so its key, can still be seen: its
 * socket was connected after this agent loaded, or (a memory BIO, no socket
 * known) its process started after. A connection older than the agent
 * (a restart under traffic) has had its handshake already: its writes
 * would wait for a key that never comes, so they stay with pause. */
static __always_inline bool handshake_ahead(__s32 fd)
{
	if (fd >= 0) {
		struct conn_key ck = { .tgid = bpf_get_current_pid_tgid() >> 32, .fd = fd };
		struct conn_val *v = bpf_map_lookup_elem(&conn_ip_map, &ck);
		return v && v->ts_ns >= cfg_loaded_ns;
	}
	struct task_struct *t = (void *)bpf_get_current_task();
	return BPF_CORE_READ(t, group_leader, start_time) >= cfg_loaded_ns;
}


/* Records OpenSSL makes of one write: 16 KiB of plaintext each, its default
 * max_send_fragment. Anything else (a smaller fragment, a retried write)
 * only moves the estimate, which ChaCha20's tag check then corrects. */
static __always_inline __u64 records_of(__u64 len)
{
	return (len + 16383) >> 14;
}

/* Every SSL_write, placeholder or not, counts its records. */
static __always_inline void wire_count(__u64 ssl, __u64 len)
{
	struct obj_key k = obj_key_of(ssl);
	struct wire_keys *ks = bpf_map_lookup_elem(&wire_keys, &k);
	if (ks)
		ks->next += records_of(len);
}

enum wire_verdict {
	WIRE_SERVED = 0,   /* pending for the socket writes; no stop */
	WIRE_DECIDE = 1,   /* pending, but the agent must decide a destination first */
	WIRE_PAUSE = 2,    /* the wire cannot serve it: the pause backend does */
};

static __always_inline __u32 wire_arm(struct scan_ctx *c)
{
	__u32 abi = c->cookie & ABI_MASK;
	bool go = abi == ABI_GO_TLS_WRITE;
	if (abi != ABI_SSL_WRITE && abi != ABI_SSL_WRITE_EX && !go)
		return WIRE_PAUSE;
	if (go && !c->g)
		return WIRE_PAUSE;
	struct obj_key k = obj_key_of(c->obj);
	struct wire_keys *ks = bpf_map_lookup_elem(&wire_keys, &k);
	bool keyed = ks && (ks->key_len || ks->tls12);
	__s32 fd = c->fd;
	__u32 flags = 0;
	if (!go && fd < 0) {
		/* A memory BIO: the socket its records went out on before, if
		 * any; either way they are looked for at the end of a socket
		 * write of this thread. */
		__s32 *mfd = bpf_map_lookup_elem(&wire_mem_fd, &k);
		if (mfd)
			fd = *mfd;
		flags |= PEND_SUFFIX;
	}
	__u32 verdict = WIRE_SERVED;
	if (!keyed || fd < 0) {
		/* The key comes during this write (its handshake runs inside
		 * it), or the socket is not known yet: only where the library's
		 * key derivation is probed, and then never by pause. */
		if (go || !cfg_wire_implicit || !(c->cookie & ABI_KEYS) ||
		    (!keyed && !handshake_ahead(fd)))
			return WIRE_PAUSE;
		if (!keyed)
			flags |= PEND_DEFERRED | PEND_SUFFIX;
		if (fd < 0)
			flags |= PEND_UNBOUND;
	} else {
		struct sock *sk = tcp_sock_of(fd);
		struct flow_key f;
		if (!sk || !flow_of(sk, &f))
			return WIRE_PAUSE;
		__u32 *suite = bpf_map_lookup_elem(&wire_suites, &f);
		struct suite_info si;
		if (!suite || !suite_info(*suite, &si))
			return WIRE_PAUSE;
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
#pragma unroll
		for (int i = 0; i < MAX_HITS; i++) {
			if (i >= c->nmatch)
				break;
			if (!allowed(tgid, c->match[i].id, &f))
				verdict = WIRE_DECIDE;
		}
	}
	struct wire_pending *p = (void *)c->chunk; /* scratch big enough, see the assert below */
	_Static_assert(sizeof(struct wire_pending) <= CHUNK_BUF, "wire_pending fits the chunk scratch");
	__builtin_memset(p, 0, sizeof(*p));
	p->ssl = c->obj;
	p->buf = c->buf;
	p->num = c->len;
	p->cookie = c->cookie;
	p->fd = fd;
	p->nmatch = c->nmatch;
	p->flags = flags;
	if (keyed) {
		p->epoch = ks->epoch;
		__u64 nrec = records_of(c->len);
		p->rseq = ks->next > nrec ? ks->next - nrec : 0;
	}
	copy_hits(p->match, c->match, c->nmatch);
	if (go) {
		/* Sequence number and epoch are set by each record's encrypt. */
		p->g = c->g;
		struct obj_key gk = obj_key_of(c->g);
		bpf_map_update_elem(&go_pending, &gk, p, BPF_ANY);
		return verdict;
	}
	__u32 tid = c->tid;
	bpf_map_update_elem(&wire_pending, &tid, p, BPF_ANY);
	return verdict;
}

/* ---- 4. the socket write: place the hits in records -------------------- */

struct rec_ctx {
	struct wire_pending *p;
	struct wire_keys *ks;
	struct wire_flow *fl;
	struct wire_scratch *w;
	struct flow_key *f;
	__u64 buf;
	__u64 len;
	__u64 off;           /* of the next record header in the buffer */
	__u32 seq0;          /* sequence number of the buffer's first byte */
	__u32 tgid;
	struct suite_info si;
	__u32 armed;         /* bit per hit: armed in this write */
	__u32 held;          /* bit per hit: destination not allowed */
	__u32 miss;          /* bit per hit: could not be placed */
	/* per record */
	__u64 rstart;        /* plaintext offset (in the write) of the record's first byte */
	__u64 plen;
	__u32 cseq;          /* sequence number of the record's first ciphertext byte */
	__u32 v;             /* ciphertext blocks GHASH covers */
	__u32 parts;
	__s32 slot;          /* free_slot's answer */
	__u32 hi;            /* hit being placed */
	__u32 a, b;          /* its part: plaintext offsets in the record */
	__u32 j;             /* block of the part being folded */
	/* ChaCha20-Poly1305 */
	__u32 rslots;        /* bit per patch slot armed in this record */
	__u32 rbits;         /* bit per hit with a part in this record */
	__u32 rlen;
};

static long find_free(__u64 i, void *data)
{
	struct rec_ctx *r = data;
	if (i >= WIRE_SLOTS)
		return 1;
	if (r->fl->p[i & (WIRE_SLOTS - 1)].len)
		return 0;
	r->slot = (__s32)i;
	return 1;
}

/* A free patch slot, found in a loop the verifier sees once: a slot
 * pointer per branch would multiply every path after it. */
static __always_inline struct wire_patch *free_slot(struct rec_ctx *r)
{
	r->slot = -1;
	bpf_loop(WIRE_SLOTS, find_free, r, 0);
	if (r->slot < 0)
		return 0;
	return &r->fl->p[r->slot & (WIRE_SLOTS - 1)];
}

static __always_inline __u32 free_slots(struct wire_flow *fl)
{
	__u32 n = 0;
#pragma unroll
	for (int i = 0; i < WIRE_SLOTS; i++)
		if (!fl->p[i].len)
			n++;
	return n;
}

/* One block of the part: acc = (acc ^ d_j) * H. */
static long fold_block(__u64 i, void *data)
{
	struct rec_ctx *r = data;
	struct wire_scratch *w = r->w;
	__u32 j = r->j + (__u32)i;          /* 0-based block in the record */
	__u32 lo = j * 16, hi = lo + 16;
	if (lo >= r->b)
		return 1;
	__builtin_memset(w->blk, 0, 16);
	struct hit *h = &r->p->match[r->hi & (MAX_HITS - 1)];
	/* The block's bytes [from, to) are the part's; mask byte m of the hit
	 * sits at record offset (h->off - rstart) + m. */
	__u32 from = lo > r->a ? lo : r->a, to = hi < r->b ? hi : r->b;
	if (from < to) {
		__u32 m = (__u32)(r->rstart + from - h->off) & (WIRE_MASK - 1);
		__u32 n = ((to - from - 1) & 15) + 1;
		bpf_probe_read_kernel(w->blk + ((from - lo) & 15), n, w->pkt + m);
	}
	w->d.hi = be64_load(w->blk) ^ w->acc.hi;
	w->d.lo = be64_load(w->blk + 8) ^ w->acc.lo;
	gf_mul(&w->acc, &w->d, &r->ks->pow.p[0]);
	return 0;
}

/* Arms hit r->hi's part [a, b) of the current record. */
static __always_inline bool arm_part(struct rec_ctx *r)
{
	struct hit *h = &r->p->match[r->hi & (MAX_HITS - 1)];
	struct secret_val *v = bpf_map_lookup_elem(&secret_map, &h->key);
	if (!v || v->len != h->len || h->len > WIRE_MASK)
		return false;
	struct wire_scratch *w = r->w;
	/* The hit's whole mask; the part is a slice of it. */
#pragma unroll
	for (int m = 0; m < WIRE_MASK; m += 8)
		*(__u64 *)(w->pkt + m) = *(__u64 *)(v->placeholder + m) ^ *(__u64 *)(v->value + m);
	struct wire_patch *slot = free_slot(r);
	if (!slot)
		return false;
	__u32 from = (__u32)(r->rstart + r->a - h->off);
	__u32 n = r->b - r->a;
	if (from >= WIRE_MASK || n == 0 || n > WIRE_MASK)
		return false;
	from &= WIRE_MASK - 1;
	n = ((n - 1) & (WIRE_MASK - 1)) + 1;
	bpf_probe_read_kernel(slot->mask, n, w->pkt + from);
	slot->seq = r->cseq + r->a;
	slot->len = n;
	r->rslots |= 1u << (r->slot & (WIRE_SLOTS - 1));
	if (r->si.chacha) {
		/* The tag is recomputed once the record's parts are all armed. */
		r->parts++;
		return true;
	}

	/* The tag: sum of d_j * H^(v - j + 2), j 1-based; Horner from the
	 * part's first block to its last (jb), then * H^(v - jb + 1). */
	__u32 ja = r->a / 16, jb = (r->b - 1) / 16; /* 0-based */
	w->acc.hi = 0;
	w->acc.lo = 0;
	r->j = ja;
	bpf_loop(jb - ja + 1, fold_block, r, 0);
	__u32 e = r->v - (jb + 1) + 1;
	gf_mul_pow(&w->acc, &r->ks->pow, e);
	w->tag.hi ^= w->acc.hi;
	w->tag.lo ^= w->acc.lo;
	r->parts++;
	return true;
}

static long place_hit(__u64 i, void *data)
{
	struct rec_ctx *r = data;
	if (i >= MAX_HITS || i >= r->p->nmatch)
		return 1;
	__u32 bit = 1u << i;
	if ((r->p->placed | r->held | r->miss) & bit)
		return 0;
	struct hit *h = &r->p->match[i & (MAX_HITS - 1)];
	__u64 hs = h->off, he = h->off + h->len;
	__u64 rs = r->rstart, re = r->rstart + r->plen;
	if (he <= rs || hs >= re)
		return 0;
	if (allowed(r->tgid, h->id, r->f) != ALLOW_YES) {
		r->held |= bit;
		return 0;
	}
	r->hi = i;
	r->a = (hs > rs ? hs : rs) - rs;
	r->b = (he < re ? he : re) - rs;
	if (!arm_part(r)) {
		r->miss |= bit;
		stat_add(ST_WIRE_FULL, 1);
		return 0;
	}
	r->rbits |= bit;
	if (he <= re) {
		r->p->placed |= bit;
		r->armed |= bit;
	}
	return 0;
}

struct retag_ctx {
	struct wire_scratch *w;
	const struct wire_keys *ks;
	const struct wire_flow *fl;
};

/* XORs into poly.b the mask bytes of armed slot i that fall in the
 * ciphertext block at sequence number rt.bseq. */
static long mask_slot(__u64 i, void *data)
{
	struct retag_ctx *x = data;
	struct wire_scratch *w = x->w;
	if (i >= WIRE_SLOTS)
		return 1;
	if (!(w->rt.rslots & (1u << i)))
		return 0;
	const struct wire_patch *sl = &x->fl->p[i & (WIRE_SLOTS - 1)];
	__s32 rel = (__s32)(sl->seq - w->rt.bseq);
	__s32 end = rel + (__s32)sl->len;
	if (rel >= 16 || end <= 0)
		return 0;
	__u32 from = rel > 0 ? rel : 0, to = end < 16 ? end : 16;
	__u32 m = from - rel, n = ((to - from - 1) & 15) + 1;
	__builtin_memset(w->blk, 0, 16);
	bpf_probe_read_kernel(w->blk + (from & 15), n, sl->mask + (m & (WIRE_MASK - 1)));
	*(__u64 *)w->poly.b ^= *(__u64 *)w->blk;
	*(__u64 *)(w->poly.b + 8) ^= *(__u64 *)(w->blk + 8);
	return 0;
}

/* One ciphertext block into both accumulators: as written, and patched. */
static long poly_ct_block(__u64 i, void *data)
{
	struct retag_ctx *x = data;
	struct wire_scratch *w = x->w;
	__u32 o = (__u32)i * 16;
	if (o >= w->rt.clen)
		return 1;
	__u32 n = w->rt.clen - o;
	n = n > 16 ? 16 : n;
	__builtin_memset(w->poly.a, 0, 16);
	if (bpf_probe_read_user(w->poly.a, ((n - 1) & 15) + 1, (void *)(w->rt.ct + o)) < 0)
		return 1;
	__builtin_memcpy(w->poly.b, w->poly.a, 16);
	if (w->rt.rslots) {
		w->rt.bseq = w->rt.cseq + o;
		bpf_loop(WIRE_SLOTS, mask_slot, x, 0);
	}
	poly_blocks(&w->poly);
	return 0;
}

/* Candidate i of the record's sequence number: the estimate, then 1, 2,
 * 3 either side. Stops at the one whose tag over the unpatched ciphertext
 * is the record's own; w->tag then holds that tag ^ the patched one. */
static long try_seq(__u64 i, void *data)
{
	struct retag_ctx *x = data;
	struct wire_scratch *w = x->w;
	const struct wire_keys *ks = x->ks;
	__s64 d = (i & 1) ? -(__s64)((i + 1) / 2) : (__s64)(i / 2);
	if (d < 0 && w->rt.s0 < (__u64)-d)
		return 0;
	__u64 seq = w->rt.s0 + d;
	bool tls12 = w->rt.tls12;
	/* nonce = IV ^ (0^32 || seq, big-endian) */
	__builtin_memcpy(w->cin.key, tls12 ? ks->block : ks->key, 32);
	__builtin_memcpy(w->cin.nonce, tls12 ? ks->block + 64 : ks->iv, 12);
	__u8 sb[8];
	be64_store(sb, seq);
	__u8 *nb = (__u8 *)w->cin.nonce;
#pragma unroll
	for (int k = 0; k < 8; k++)
		nb[4 + k] ^= sb[k];
	poly_init(&w->poly, &w->cin);
	/* The additional data: TLS 1.3 the record header; TLS 1.2 the
	 * sequence number, type, version and plaintext length. */
	__builtin_memset(w->poly.a, 0, 16);
	__u64 alen;
	if (tls12) {
		__builtin_memcpy(w->poly.a, sb, 8);
		w->poly.a[8] = 0x17;
		w->poly.a[9] = 3;
		w->poly.a[10] = 3;
		w->poly.a[11] = w->rt.clen >> 8;
		w->poly.a[12] = w->rt.clen;
		alen = 13;
	} else {
		w->poly.a[0] = 0x17;
		w->poly.a[1] = 3;
		w->poly.a[2] = 3;
		w->poly.a[3] = w->rt.rlen >> 8;
		w->poly.a[4] = w->rt.rlen;
		alen = 5;
	}
	__builtin_memcpy(w->poly.b, w->poly.a, 16);
	poly_blocks(&w->poly);
	bpf_loop((TLS_MAX_REC + 15) / 16, poly_ct_block, x, 0);
	*(__u64 *)w->poly.a = alen;
	*(__u64 *)(w->poly.a + 8) = w->rt.clen;
	__builtin_memcpy(w->poly.b, w->poly.a, 16);
	poly_blocks(&w->poly);
	poly_tags(&w->poly);
	if (*(__u64 *)w->poly.th != *(__u64 *)w->rtag ||
	    *(__u64 *)(w->poly.th + 8) != *(__u64 *)(w->rtag + 8))
		return 0;
	w->tag.hi = be64_load(w->poly.th) ^ be64_load(w->poly.tg);
	w->tag.lo = be64_load(w->poly.th + 8) ^ be64_load(w->poly.tg + 8);
	w->rt.found = seq;
	return 1;
}

/* Finds the record's sequence number near w->rt.s0 and the tag's delta. */
__noinline int chacha_retag_g(struct wire_scratch *w, const struct wire_keys *ks,
			      const struct wire_flow *fl)
{
	if (!w || !ks || !fl)
		return 0;
	struct retag_ctx x = { .w = w, .ks = ks, .fl = fl };
	w->rt.found = ~0ULL;
	bpf_loop(7, try_seq, &x, 0);
	return 0;
}

/* Re-tags a ChaCha20-Poly1305 record whose parts are armed, or says it
 * cannot: an unproven key or sequence number must not touch the record. */
static __always_inline bool chacha_retag(struct rec_ctx *r)
{
	struct wire_pending *p = r->p;
	struct wire_keys *ks = r->ks;
	struct wire_scratch *w = r->w;
	/* The whole record, tag included, must be in this write. */
	if (r->off + TLS_HDR + r->rlen > r->len)
		return false;
	w->rt.clen = r->rlen - TLS_TAG;
	w->rt.rlen = r->rlen;
	w->rt.ct = r->buf + r->off + TLS_HDR;
	w->rt.cseq = r->cseq;
	w->rt.rslots = r->rslots;
	w->rt.tls12 = !r->si.inner;
	if (bpf_probe_read_user(w->rtag, 16, (void *)(w->rt.ct + w->rt.clen)) < 0)
		return false;
	/* A key change inside the write restarts the count. */
	w->rt.s0 = p->epoch == ks->epoch ? p->rseq + p->recs : 0;
	chacha_retag_g(w, ks, r->fl);
	if (w->rt.found == ~0ULL) {
		stat_add(ST_WIRE_UNPROVEN, 1);
		return false;
	}
	/* Correct the estimate for this write's later records and the next write. */
	if (p->epoch == ks->epoch) {
		__s64 d = (__s64)(w->rt.found - w->rt.s0);
		p->rseq += d;
		ks->next += d;
	}
	return true;
}

static __always_inline void disarm_record(struct rec_ctx *r)
{
#pragma unroll
	for (int k = 0; k < WIRE_SLOTS; k++)
		if (r->rslots & (1u << k))
			r->fl->p[k].len = 0;
	r->armed &= ~r->rbits;
	r->p->placed &= ~r->rbits;
	r->miss |= r->rbits;
	r->parts = 0;
}

static long place_record(__u64 i, void *data)
{
	struct rec_ctx *r = data;
	if (r->off + TLS_HDR > r->len)
		return 1;
	__u8 hdr[TLS_HDR];
	if (bpf_probe_read_user(hdr, sizeof(hdr), (void *)(r->buf + r->off)) < 0)
		return 1;
	__u32 rlen = ((__u32)hdr[3] << 8) | hdr[4];
	if (hdr[0] != 0x17 || hdr[1] != 3 || hdr[2] != 3 || rlen > TLS_MAX_REC)
		return 1; /* not at a record boundary (a resumed partial write): nothing to place */
	__u32 over = TLS_TAG + r->si.explicit + r->si.inner;
	if (rlen <= over)
		return 1;
	__u64 plen = rlen - over;
	struct wire_pending *p = r->p;
	if (p->cursor + plen > p->num) {
		/* Padding or records of another write: the ranges cannot be trusted. */
		r->miss = ((1u << p->nmatch) - 1) & ~p->placed & ~r->held;
		p->cursor = p->num;
		return 1;
	}
	r->rstart = p->cursor;
	r->plen = plen;
	r->cseq = r->seq0 + (__u32)r->off + TLS_HDR + r->si.explicit;
	r->v = (__u32)((plen + r->si.inner + 15) / 16);
	r->parts = 0;
	r->rslots = 0;
	r->rbits = 0;
	r->rlen = rlen;
	r->w->tag.hi = 0;
	r->w->tag.lo = 0;
	/* Room for every part of this record and its tag, or none is armed:
	 * a patched ciphertext without its tag would kill the connection. */
	if (free_slots(r->fl) < p->nmatch + 1) {
		r->miss |= ((1u << p->nmatch) - 1) & ~p->placed & ~r->held;
		stat_add(ST_WIRE_FULL, 1);
	} else {
		bpf_loop(MAX_HITS, place_hit, r, 0);
	}
	if (r->parts && r->si.chacha && !chacha_retag(r))
		disarm_record(r);
	if (r->parts) {
		struct wire_patch *slot = free_slot(r);
		if (!slot)
			return 1; /* cannot happen: room was checked */
		__builtin_memset(slot->mask, 0, sizeof(slot->mask));
		be64_store(slot->mask, r->w->tag.hi);
		be64_store(slot->mask + 8, r->w->tag.lo);
		slot->seq = r->cseq + (__u32)plen + r->si.inner;
		slot->len = TLS_TAG;
	}
	p->cursor += plen;
	p->recs++;
	r->off += TLS_HDR + rlen;
	return p->cursor >= p->num;
}

static __always_inline void fill_report(struct tls_event *e, struct wire_pending *p, __u32 bits,
					long fd)
{
	e->buf = p->buf;
	e->len = p->num;
	e->cookie = p->cookie;
	e->fd = (__s32)fd;
	__u32 n = 0;
#pragma unroll
	for (int i = 0; i < MAX_HITS; i++) {
		if (!(bits & (1u << i)))
			continue;
		e->hits[n & (MAX_HITS - 1)] = p->match[i];
		n++;
	}
	e->nhits = n;
}

static __always_inline void report(struct wire_pending *p, __u32 kind, __u32 bits, long fd)
{
	if (!bits)
		return;
	struct tls_event *e = new_event(kind);
	if (!e)
		return;
	fill_report(e, p, bits, fd);
	bpf_ringbuf_submit(e, lazy_wakeup());
}

static __always_inline void prune(struct wire_flow *fl, __u32 una)
{
#pragma unroll
	for (int i = 0; i < WIRE_SLOTS; i++) {
		struct wire_patch *s = &fl->p[i];
		if (s->len && !seq_before(una, s->seq + s->len))
			s->len = 0;
	}
}

/* The user R14 of the current task at a system call: Go's goroutine
 * register (Go's syscall path is register-ABI code up to SYSCALL). */
static __always_inline __u64 user_r14(void)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	__u64 v = 0;
	if (regs)
		bpf_probe_read_kernel(&v, sizeof(v), &regs->r14);
	return v;
}

/* After a socket write: a finished write's hits go; a Go write's state goes
 * back to its goroutine (the thread's slot only served this record). */
static __always_inline void pending_end(struct wire_pending *p, __u32 tid, bool done)
{
	if (p->g) {
		struct obj_key gk = obj_key_of(p->g);
		if (done)
			bpf_map_delete_elem(&go_pending, &gk);
		else
			bpf_map_update_elem(&go_pending, &gk, p, BPF_EXIST);
	} else if (!done) {
		return;
	}
	bpf_map_delete_elem(&wire_pending, &tid);
}

/* Go: the record the goroutine making this system call (R14) encrypted
 * last, into the thread's slot, so one code path serves both. A Go copy
 * left in the slot is never another record's. */
static __noinline void go_take(__u32 tid, long fd)
{
	struct wire_pending *p = bpf_map_lookup_elem(&wire_pending, &tid);
	if (p) {
		if (!p->g)
			return;
		bpf_map_delete_elem(&wire_pending, &tid);
	}
	struct obj_key gk = obj_key_of(user_r14());
	struct wire_pending *gp = bpf_map_lookup_elem(&go_pending, &gk);
	if (!gp || !gp->rec_ok || gp->fd != fd)
		return;
	/* One record per encrypt: a resumed partial write is not a record. */
	gp->rec_ok = 0;
	bpf_map_update_elem(&wire_pending, &tid, gp, BPF_ANY);
}

struct sfx_ctx {
	struct wire_scratch *w;
	__u64 buf;
	__u64 len;
	__u64 off;
	__u32 n;             /* records collected */
	__u32 over;          /* record bytes that are not plaintext */
	__u64 num;           /* the write's plaintext bytes */
	__u64 sum;
	__s32 start;         /* index of the write's first record, or -1 */
	bool bad;
};

/* Collects the socket write's records (every one whole); stops at anything
 * that is not a record boundary. */
static long sfx_collect(__u64 i, void *data)
{
	struct sfx_ctx *x = data;
	if (i >= WIRE_RECORDS || x->off + TLS_HDR > x->len)
		return 1;
	__u8 hdr[TLS_HDR];
	if (bpf_probe_read_user(hdr, sizeof(hdr), (void *)(x->buf + x->off)) < 0) {
		x->bad = true;
		return 1;
	}
	__u32 rlen = ((__u32)hdr[3] << 8) | hdr[4];
	if (hdr[0] < 0x14 || hdr[0] > 0x17 || hdr[1] != 3 || rlen > TLS_MAX_REC ||
	    x->off + TLS_HDR + rlen > x->len) {
		x->bad = true;
		return 1;
	}
	x->w->roff[i & (WIRE_RECORDS - 1)] = (__u32)x->off;
	x->w->rlen[i & (WIRE_RECORDS - 1)] = hdr[0] == 0x17 ? rlen : 0;
	x->n = (__u32)i + 1;
	x->off += TLS_HDR + rlen;
	return 0;
}

/* From the last record back: the records whose plaintext adds up to the
 * write's exactly, each but the last a full 16 KiB (how OpenSSL cuts a
 * write), all application data. */
static long sfx_match(__u64 i, void *data)
{
	struct sfx_ctx *x = data;
	if (i >= x->n || i >= WIRE_RECORDS)
		return 1;
	__u32 k = (x->n - 1 - (__u32)i) & (WIRE_RECORDS - 1);
	__u32 rlen = x->w->rlen[k];
	if (rlen <= x->over)
		return 1;
	__u64 plen = rlen - x->over;
	if (i > 0 && plen != 16384)
		return 1;
	x->sum += plen;
	if (x->sum == x->num) {
		x->start = (__s32)k;
		return 1;
	}
	return x->sum > x->num;
}

/* Where a PEND_SUFFIX write's records begin in this socket write, or -1:
 * they must end it, and nothing else may add up to them. */
static __always_inline __s64 find_suffix(struct rec_ctx *r)
{
	struct sfx_ctx x = { .w = r->w, .buf = r->buf, .len = r->len,
			     .over = TLS_TAG + r->si.explicit + r->si.inner,
			     .num = r->p->num, .start = -1 };
	bpf_loop(WIRE_RECORDS, sfx_collect, &x, 0);
	/* More than WIRE_RECORDS records, or bytes after the last whole one:
	 * the end of this write is not in sight. */
	if (x.bad || !x.n || x.off != x.len)
		return -1;
	bpf_loop(WIRE_RECORDS, sfx_match, &x, 0);
	if (x.start < 0)
		return -1;
	return r->w->roff[x.start & (WIRE_RECORDS - 1)];
}

static __always_inline void wire_send(long fd, __u64 buf, __u64 len)
{
	if (!cfg_wire || !buf || !len)
		return;
	/* go_take already ran, in the socket write's own program: it reads
	 * the syscall's registers (wire_send_call, ssl_fd.h). */
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct wire_pending *p = bpf_map_lookup_elem(&wire_pending, &tid);
	if (!p)
		return;
	if (p->fd >= 0 && p->fd != fd)
		return;
	struct sock *sk = tcp_sock_of(fd);
	struct flow_key f;
	if (!sk || !flow_of(sk, &f)) {
		pending_end(p, tid, false);
		return;
	}
	struct wire_scratch *w = scratch();
	if (!w) {
		pending_end(p, tid, false);
		return;
	}
	__u32 all = (1u << (p->nmatch & 0xf)) - 1;
	struct obj_key k = obj_key_of(p->ssl);
	struct wire_keys *ks = bpf_map_lookup_elem(&wire_keys, &k);
	__u32 *suite = bpf_map_lookup_elem(&wire_suites, &f);
	struct rec_ctx r = { .p = p, .ks = ks, .w = w, .f = &f, .buf = buf, .len = len,
			     .tgid = bpf_get_current_pid_tgid() >> 32 };
	/* A write waiting for its key, or whose socket is not known: this
	 * socket write may belong to another connection, or come before the
	 * key; it waits for one that carries it, until its thread's next
	 * SSL_write. */
	if (p->flags & PEND_SUFFIX) {
		if (!suite || !suite_info(*suite, &r.si))
			return;
		if (!ks || (!ks->key_len && !ks->tls12)) {
			/* Its own socket carries records that add up to it, and
			 * still no key: they go out as written, and that is said. */
			if (p->fd >= 0 && p->fd == fd && find_suffix(&r) >= 0) {
				report(p, EV_WIRE_MISS, all & ~p->placed, fd);
				stat_add(ST_WIRE_MISS, p->nmatch);
				pending_end(p, tid, true);
			}
			return;
		}
	}
	/* Go: the key installed must be the one this record's encrypt proved. */
	if (!ks || !suite || (p->g && p->epoch != ks->epoch) || !suite_info(*suite, &r.si) ||
	    !ensure_h(ks, *suite, &r.si, w)) {
		report(p, EV_WIRE_MISS, all & ~p->placed, fd);
		stat_add(ST_WIRE_MISS, p->nmatch);
		pending_end(p, tid, true);
		return;
	}
	struct wire_flow *fl = bpf_map_lookup_elem(&wire_flows, &f);
	if (!fl) {
		_Static_assert(sizeof(struct wire_flow) <= sizeof(w->zero), "zero holds a wire_flow");
		bpf_map_update_elem(&wire_flows, &f, w->zero, BPF_NOEXIST);
		fl = bpf_map_lookup_elem(&wire_flows, &f);
		if (!fl) {
			pending_end(p, tid, false);
			return;
		}
	}
	fl->ssl = p->ssl;
	fl->tgid = r.tgid;
	r.fl = fl;
	struct tcp_sock *tp = (void *)sk;
	r.seq0 = BPF_CORE_READ(tp, write_seq);
	prune(fl, BPF_CORE_READ(tp, snd_una));

	if (p->flags & PEND_SUFFIX) {
		/* TLS 1.3: a client's Finished (4 + 32 or 48 bytes) travels in
		 * an application-data record, under the handshake key, maybe
		 * alone in its socket write: a waiting write of its length could
		 * be taken for it. Such a write is not armed. */
		if ((p->flags & (PEND_DEFERRED | PEND_UNBOUND)) && r.si.inner &&
		    (p->num == 36 || p->num == 52)) {
			report(p, EV_WIRE_MISS, all & ~p->placed, fd);
			stat_add(ST_WIRE_MISS, p->nmatch);
			pending_end(p, tid, true);
			return;
		}
		__s64 start = find_suffix(&r);
		if (start < 0)
			return;
		r.off = (__u64)start;
	}
	/* Every substitution is traceable: with no room in the ring buffer to
	 * say what was armed, nothing is, and the placeholders go out. */
	struct tls_event *ev = new_event(EV_ARMED);
	if (!ev) {
		pending_end(p, tid, true);
		return;
	}
	/* Go: one socket write, one record, the one its encrypt announced. */
	__u32 nrec = WIRE_RECORDS;
	if (p->g) {
		nrec = 1;
		__u8 hdr[TLS_HDR];
		__u32 over = TLS_TAG + r.si.explicit + r.si.inner;
		if (bpf_probe_read_user(hdr, sizeof(hdr), (void *)buf) < 0 ||
		    (((__u32)hdr[3] << 8) | hdr[4]) != p->rec_len + over) {
			r.miss = all & ~p->placed;
			p->cursor = p->num;
			nrec = 0;
		}
	}
	bpf_loop(nrec, place_record, &r, 0);

	if (r.armed) {
		fill_report(ev, p, r.armed, fd);
		bpf_ringbuf_submit(ev, lazy_wakeup());
	} else {
		bpf_ringbuf_discard(ev, 0);
	}
	report(p, EV_HELD, r.held, fd);
	report(p, EV_WIRE_MISS, r.miss, fd);
	__u32 narmed = __builtin_popcount(r.armed);
	if (narmed)
		stat_add(ST_WIRE_ARMED, narmed);
	if (r.miss)
		stat_add(ST_WIRE_MISS, __builtin_popcount(r.miss));
	p->placed |= r.held | r.miss;
	/* The object's records went out on this socket: its later writes
	 * know their flow at SSL_write (their fd is still -1 to OpenSSL). */
	if ((p->flags & PEND_SUFFIX) && p->recs) {
		__s32 v = (__s32)fd;
		bpf_map_update_elem(&wire_mem_fd, &k, &v, BPF_ANY);
	}
	/* A write that began before its key was not counted at SSL_write. */
	if ((p->flags & PEND_DEFERRED) && p->recs) {
		ks->next += p->recs;
		p->flags &= ~PEND_DEFERRED;
	}
	pending_end(p, tid, p->cursor >= p->num || (p->placed & all) == all);
}

/* A new write replaces one whose hits never all reached a record. A write
 * retried on the same object with the same length (OpenSSL's rule after
 * WANT_READ/WRITE, as a handshake inside SSL_write returns; Node passes a
 * fresh copy of the data) made no records the first time: nothing of it
 * was missed. Only a write still waiting for its key or its socket is
 * taken for a retry, so an identical request that really went out
 * unpatched is still counted. */
static __always_inline void wire_write_begins(__u32 tid, __u64 ssl, __u64 len)
{
	struct wire_pending *p = bpf_map_lookup_elem(&wire_pending, &tid);
	if (!p)
		return;
	__u32 all = (1u << (p->nmatch & 0xf)) - 1;
	bool retried = (p->flags & (PEND_DEFERRED | PEND_UNBOUND)) && !p->recs && p->ssl == ssl &&
		       p->num == len;
	if (p->placed != all && !retried) {
		report(p, EV_WIRE_MISS, all & ~p->placed, p->fd);
		stat_add(ST_WIRE_MISS, __builtin_popcount(all & ~p->placed));
	}
	bpf_map_delete_elem(&wire_pending, &tid);
}

/* ---- Go crypto/tls: keys, the sending side, record by record ----------- */

/* A halfConn lies inside its *tls.Conn (fields in and out): anything else
 * is not the connection this goroutine is in. */
#define GO_CONN_MAX 4096
/* halfConn.cipher's data word: the AEAD object. Read only to compare its
 * first 12 bytes (prefixNonceAEAD.nonce, xorNonceAEAD.nonceMask) with an
 * IV captured from the AEAD's constructor: another layout matches nothing,
 * and no key is installed. */
#define GO_HC_CIPHER_DATA 40

static __always_inline bool go_in_conn(__u64 hc, __u64 conn)
{
	return conn && hc > conn && hc - conn < GO_CONN_MAX;
}

static __always_inline int go_slot(struct go_conn_keys *gc, __u64 hc)
{
	if (gc->h[0].hc == hc)
		return 0;
	if (gc->h[1].hc == hc)
		return 1;
	return -1;
}

/* A slot for hc: its own, or a free one. */
static __always_inline int go_slot_for(struct go_conn_keys *gc, __u64 hc)
{
	int i = go_slot(gc, hc);
	if (i >= 0)
		return i;
	if (!gc->h[0].hc)
		return 0;
	if (!gc->h[1].hc)
		return 1;
	return -1;
}

static __always_inline struct go_conn_keys *go_keys_of(struct obj_key *ck, bool create)
{
	struct go_conn_keys *gc = bpf_map_lookup_elem(&go_keys, ck);
	if (gc || !create)
		return gc;
	struct wire_scratch *w = scratch();
	if (!w)
		return 0;
	_Static_assert(sizeof(struct go_conn_keys) <= sizeof(w->zero), "zero holds a go_conn_keys");
	bpf_map_update_elem(&go_keys, ck, w->zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&go_keys, ck);
}

/* Whether the 12 nonce bytes of an AEAD object are those of key k. */
static __always_inline bool go_iv_is(const struct go_key *k, const __u8 *n)
{
	if (k->ivlen == 12)
		return *(const __u64 *)n == *(const __u64 *)k->iv &&
		       *(const __u32 *)(n + 8) == *(const __u32 *)(k->iv + 8);
	/* TLS 1.2 AES-GCM: the 4-byte prefix, then the zero explicit part. */
	return k->ivlen == 4 && *(const __u32 *)n == *(const __u32 *)k->iv &&
	       *(const __u32 *)(n + 4) == 0 && *(const __u32 *)(n + 8) == 0;
}

static __always_inline void go_fill(struct go_half *h, __u64 hc, const struct go_key *k,
				    __u32 tls12, __u64 cobj)
{
	h->hc = hc;
	h->k = *k;
	h->has = 1;
	h->tls12 = tls12;
	h->cobj = cobj;
	h->next = 0;
	h->epoch = new_epoch();
}

/* The goroutine is now in conn (a Write). */
static __always_inline void go_enter_conn(__u64 conn, __u64 g)
{
	if (!g)
		return;
	struct obj_key gk = obj_key_of(g);
	__u64 *cur = bpf_map_lookup_elem(&go_g_conn, &gk);
	if (cur && *cur == conn)
		return;
	bpf_map_update_elem(&go_g_conn, &gk, &conn, BPF_ANY);
}

/* func (c *Conn) clientHandshake(ctx) / serverHandshake(ctx) /
 * handleKeyUpdate(msg): RAX = c. Where keys are set, a handshake's (or a
 * renegotiation's) and a KeyUpdate's. */
SEC("uprobe")
int go_handshake_enter(struct pt_regs *ctx)
{
	__u64 conn = ctx->ax, g = ctx->r14;
	if (!cfg_wire || !tracked() || !g)
		return 0;
	struct obj_key gk = obj_key_of(g);
	bpf_map_update_elem(&go_g_conn, &gk, &conn, BPF_ANY);
	/* A handshake's TLS 1.2 keys are taken before it returns; older ones
	 * on this goroutine belong to nothing any more. */
	bpf_map_delete_elem(&go_g_cands, &gk);
	return 0;
}

/* func (hc *halfConn) setTrafficSecret(suite, level, secret): RAX = hc.
 * The halfConn's key changes now: its old one is forgotten before the new
 * one is known, so no record is ever matched with a key it no longer has. */
SEC("uprobe")
int go_set_secret(struct pt_regs *ctx)
{
	__u64 hc = ctx->ax, g = ctx->r14;
	if (!cfg_wire || !tracked() || !g)
		return 0;
	struct obj_key gk = obj_key_of(g);
	__u64 *connp = bpf_map_lookup_elem(&go_g_conn, &gk);
	__u64 conn = connp ? *connp : 0;
	if (!go_in_conn(hc, conn)) {
		bpf_map_delete_elem(&go_g_hc, &gk);
		return 0;
	}
	struct obj_key ck = obj_key_of(conn);
	struct go_conn_keys *gc = go_keys_of(&ck, false);
	if (gc) {
		int i = go_slot(gc, hc);
		if (i >= 0) {
			gc->h[i & 1].has = 0;
			gc->h[i & 1].cobj = 0;
		}
	}
	struct go_hc_arg a = { .hc = hc, .conn = conn };
	bpf_map_update_elem(&go_g_hc, &gk, &a, BPF_ANY);
	return 0;
}

/* aeadAESGCMTLS13, aeadAESGCM, aeadChaCha20Poly1305(key, nonce []byte):
 * key in RAX/RBX, nonce in RDI/RSI. */
SEC("uprobe")
int go_aead(struct pt_regs *ctx)
{
	__u64 kp = ctx->ax, klen = ctx->bx, ivp = ctx->di, ivlen = ctx->si, g = ctx->r14;
	if (!cfg_wire || !tracked() || !g)
		return 0;
	if ((klen != 16 && klen != 32) || (ivlen != 4 && ivlen != 12))
		return 0;
	struct go_key k = {};
	k.klen = klen;
	k.ivlen = ivlen;
	if (bpf_probe_read_user(k.key, klen == 16 ? 16 : 32, (void *)kp) < 0 ||
	    bpf_probe_read_user(k.iv, ivlen == 4 ? 4 : 12, (void *)ivp) < 0)
		return 0;
	struct obj_key gk = obj_key_of(g);
	struct go_hc_arg *a = bpf_map_lookup_elem(&go_g_hc, &gk);
	if (a) {
		/* TLS 1.3: setTrafficSecret's own AEAD. */
		struct go_hc_arg arg = *a;
		bpf_map_delete_elem(&go_g_hc, &gk);
		if (ivlen != 12)
			return 0;
		struct obj_key ck = obj_key_of(arg.conn);
		struct go_conn_keys *gc = go_keys_of(&ck, true);
		if (!gc)
			return 0;
		int i = go_slot_for(gc, arg.hc);
		if (i < 0)
			return 0;
		go_fill(&gc->h[i & 1], arg.hc, &k, 0, 0);
		return 0;
	}
	/* TLS 1.2: one of the handshake's two keys; the encrypt that uses it
	 * says whose. */
	struct go_cands *c = bpf_map_lookup_elem(&go_g_cands, &gk);
	if (!c) {
		struct wire_scratch *w = scratch();
		if (!w)
			return 0;
		_Static_assert(sizeof(struct go_cands) <= sizeof(w->zero), "zero holds go_cands");
		bpf_map_update_elem(&go_g_cands, &gk, w->zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&go_g_cands, &gk);
		if (!c)
			return 0;
	}
	c->c[c->n & 1] = k;
	c->n++;
	return 0;
}

/* The goroutine's write is over for the wire: its unplaced hits go out
 * unchanged, said and counted. */
static __always_inline void go_pending_drop(struct wire_pending *p, struct obj_key *gk)
{
	__u32 all = (1u << (p->nmatch & 0xf)) - 1;
	if (p->placed != all) {
		report(p, EV_WIRE_MISS, all & ~p->placed, p->fd);
		stat_add(ST_WIRE_MISS, __builtin_popcount(all & ~p->placed));
	}
	bpf_map_delete_elem(&go_pending, gk);
}

/* A new Write replaces the goroutine's previous one. */
static __always_inline void go_write_begins(__u64 g)
{
	struct obj_key gk = obj_key_of(g);
	struct wire_pending *p = bpf_map_lookup_elem(&go_pending, &gk);
	if (p)
		go_pending_drop(p, &gk);
}

/* func (hc *halfConn) encrypt(record, payload []byte, rand io.Reader):
 * RAX = hc, payload in RSI/R8. Only a sending halfConn encrypts, and each
 * call seals exactly one record, so here the out side's key is proved (by
 * the IV its cipher holds), installed for the Conn, and the record counted;
 * and a pending Write learns which of its bytes this record carries. */
SEC("uprobe")
int go_encrypt(struct pt_regs *ctx)
{
	__u64 hc = ctx->ax, payload = ctx->si, plen = ctx->r8, g = ctx->r14;
	if (!cfg_wire || !tracked() || !g)
		return 0;
	struct obj_key gk = obj_key_of(g);
	__u64 *connp = bpf_map_lookup_elem(&go_g_conn, &gk);
	__u64 conn = connp ? *connp : 0;
	struct wire_pending *p = bpf_map_lookup_elem(&go_pending, &gk);
	if (!go_in_conn(hc, conn)) {
		/* Not the connection the goroutine's Write is on (a Close's alert). */
		if (p && p->ssl != conn)
			go_pending_drop(p, &gk);
		return 0;
	}
	struct obj_key ck = obj_key_of(conn);
	__u64 cobj = 0;
	bpf_probe_read_user(&cobj, sizeof(cobj), (void *)(hc + GO_HC_CIPHER_DATA));
	struct go_conn_keys *gc = go_keys_of(&ck, false);
	int i = gc ? go_slot(gc, hc) : -1;
	bool proved = cobj && i >= 0 && gc->h[i & 1].has && gc->h[i & 1].cobj == cobj;
	if (!proved && cobj) {
		__u64 nw[2] = {};
		__u8 *n = (__u8 *)nw;
		if (bpf_probe_read_user(n, 12, (void *)cobj) < 0)
			nw[0] = nw[1] = ~0ULL;
		if (i >= 0 && gc->h[i & 1].has && go_iv_is(&gc->h[i & 1].k, n)) {
			gc->h[i & 1].cobj = cobj;
			proved = true;
		} else {
			struct go_cands *c = bpf_map_lookup_elem(&go_g_cands, &gk);
			if (c) {
				bool m0 = c->n > 0 && go_iv_is(&c->c[0], n);
				bool m1 = c->n > 1 && go_iv_is(&c->c[1], n);
				/* Both would be a coincidence of IVs: ambiguous, so neither. */
				if (m0 != m1) {
					gc = go_keys_of(&ck, true);
					i = gc ? go_slot_for(gc, hc) : -1;
					if (i >= 0) {
						go_fill(&gc->h[i & 1], hc, &c->c[m0 ? 0 : 1], 1, cobj);
						proved = true;
					}
					bpf_map_delete_elem(&go_g_cands, &gk);
				}
			}
			/* A cipher whose key is unknown: this halfConn has none. */
			if (!proved && gc && i >= 0 && gc->h[i & 1].hc == hc) {
				gc->h[i & 1].has = 0;
				gc->h[i & 1].cobj = 0;
			}
		}
	}
	if (!proved || !gc || i < 0) {
		/* No proved key (a nil cipher in the handshake, or unknown): a
		 * Write's record under it is not the wire's. */
		if (p && (cobj || p->ssl == conn))
			go_pending_drop(p, &gk);
		return 0;
	}
	struct go_half *h = &gc->h[i & 1];
	__u64 seq = h->next++;
	struct obj_key kk = obj_key_of(conn);
	struct wire_keys *ks = bpf_map_lookup_elem(&wire_keys, &kk);
	if (!ks) {
		struct wire_scratch *w = scratch();
		if (!w)
			return 0;
		bpf_map_update_elem(&wire_keys, &kk, w->zero, BPF_NOEXIST);
		ks = bpf_map_lookup_elem(&wire_keys, &kk);
		if (!ks)
			return 0;
	}
	/* The key bytes too: an epoch is unique only until its counter wraps. */
	const __u8 *cur = ks->tls12 ? ks->block : ks->key;
	if (ks->epoch != h->epoch || ks->tls12 != h->tls12 ||
	    *(const __u64 *)cur != *(const __u64 *)h->k.key) {
		__u32 klen = h->k.klen == 16 ? 16 : 32;
		ks->h_suite = 0;
		if (h->tls12) {
			/* The TLS 1.2 key block as ensure_h and the re-tag read it:
			 * client key first, client IV after both keys (ChaCha20). */
			__builtin_memset(ks->block, 0, sizeof(ks->block));
			__builtin_memcpy(ks->block, h->k.key, 32);
			if (h->k.ivlen == 12) {
				__builtin_memcpy(ks->block + 64, h->k.iv, 12);
				ks->block_len = 2 * 32 + 2 * 12;
			} else {
				ks->block_len = 2 * klen + 8;
			}
			ks->tls12 = 1;
			ks->key_len = 0;
			ks->iv_set = 0;
		} else {
			__builtin_memcpy(ks->key, h->k.key, 32);
			__builtin_memcpy(ks->iv, h->k.iv, 12);
			ks->key_len = klen;
			ks->iv_set = 1;
			ks->tls12 = 0;
			ks->block_len = 0;
		}
		ks->epoch = h->epoch;
	}
	ks->next = h->next;
	if (!p)
		return 0;
	if (p->ssl != conn) {
		go_pending_drop(p, &gk);
		return 0;
	}
	/* The record must carry the write's next unplaced bytes. */
	__u64 off = payload - p->buf;
	if (payload < p->buf || off != p->cursor || plen == 0 || plen > p->num - off ||
	    plen > TLS_MAX_REC) {
		go_pending_drop(p, &gk);
		return 0;
	}
	p->rec_ok = 1;
	p->rec_len = plen;
	p->rseq = seq - p->recs;
	p->epoch = ks->epoch;
	return 0;
}

/* func (c *Conn) Close() error: RAX = c. The Conn's keys end here. */
SEC("uprobe")
int go_close_enter(struct pt_regs *ctx)
{
	if (!cfg_wire)
		return 0;
	struct obj_key k = obj_key_of(ctx->ax);
	bpf_map_delete_elem(&wire_keys, &k);
	bpf_map_delete_elem(&go_keys, &k);
	return 0;
}

/* ---- 5. tc: learn suites, patch packets ---------------------------------- */

struct pkt {
	struct flow_key f;   /* as sent: source is the sender */
	__u32 seq;
	__u32 off;           /* of the TCP payload */
	__u32 l4;            /* of the TCP header */
	__u32 len;           /* payload bytes */
};

static __always_inline bool parse(struct __sk_buff *skb, struct pkt *k)
{
	__builtin_memset(&k->f, 0, sizeof(k->f));
	__u32 l3 = ETH_HLEN, l4;
	if (skb->protocol == ETH_P_IP_BE) {
		__u8 ip[20];
		if (bpf_skb_load_bytes(skb, l3, ip, sizeof(ip)) < 0)
			return false;
		if ((ip[0] >> 4) != 4 || ip[9] != IPPROTO_TCP)
			return false;
		/* Fragments carry no TCP header to go by. */
		if (((ip[6] & 0x3f) | ip[7]) != 0)
			return false;
		k->f.family = AF_INET;
		__builtin_memcpy(k->f.saddr, ip + 12, 4);
		__builtin_memcpy(k->f.daddr, ip + 16, 4);
		l4 = l3 + (ip[0] & 0xf) * 4;
	} else if (skb->protocol == ETH_P_IPV6_BE) {
		__u8 ip[40];
		if (bpf_skb_load_bytes(skb, l3, ip, sizeof(ip)) < 0)
			return false;
		if (ip[6] != IPPROTO_TCP) /* extension headers: not ours to patch */
			return false;
		k->f.family = AF_INET6;
		__builtin_memcpy(k->f.saddr, ip + 8, 16);
		__builtin_memcpy(k->f.daddr, ip + 24, 16);
		l4 = l3 + 40;
	} else {
		return false;
	}
	__u8 th[16];
	if (bpf_skb_load_bytes(skb, l4, th, sizeof(th)) < 0)
		return false;
	__builtin_memcpy(&k->f.sport, th, 2);
	__builtin_memcpy(&k->f.dport, th + 2, 2);
	k->seq = ((__u32)th[4] << 24) | ((__u32)th[5] << 16) | ((__u32)th[6] << 8) | th[7];
	k->l4 = l4;
	k->off = l4 + (th[12] >> 4) * 4;
	k->len = skb->len > k->off ? skb->len - k->off : 0;
	return true;
}

/* A ServerHello: its cipher suite, keyed by the client's side of the flow. */
static __always_inline void learn_suite(struct __sk_buff *skb, struct pkt *k)
{
	if (k->len < 48)
		return;
	__u8 h[44];
	if (bpf_skb_load_bytes(skb, k->off, h, sizeof(h)) < 0)
		return;
	/* record: handshake, 3.x; message: ServerHello (2), legacy version 3.3 */
	if (h[0] != 0x16 || h[1] != 3 || h[5] != 2 || h[9] != 3 || h[10] != 3)
		return;
	__u32 sid = h[43];
	if (sid > 32)
		return;
	__u8 cs[2];
	if (bpf_skb_load_bytes(skb, k->off + 44 + sid, cs, 2) < 0)
		return;
	__u32 suite = ((__u32)cs[0] << 8) | cs[1];
	struct flow_key c = { .family = k->f.family, .sport = k->f.dport, .dport = k->f.sport };
	__builtin_memcpy(c.saddr, k->f.daddr, 16);
	__builtin_memcpy(c.daddr, k->f.saddr, 16);
	bpf_map_update_elem(&wire_suites, &c, &suite, BPF_ANY);
}

struct tc_ctx {
	struct __sk_buff *skb;
	struct wire_flow *fl;
	struct pkt *k;
	struct wire_scratch *w;
	int verdict;
};

/* XORs slot i's overlap with the packet into it; the checksum follows. */
static long patch_slot(__u64 i, void *data)
{
	struct tc_ctx *t = data;
	if (i >= WIRE_SLOTS)
		return 1;
	struct wire_patch *s = &t->fl->p[i & (WIRE_SLOTS - 1)];
	__u32 slen = s->len;
	if (!slen || slen > WIRE_MASK)
		return 0;
	__u32 pseq = t->k->seq, pend = pseq + t->k->len, send = s->seq + slen;
	__u32 from = seq_before(s->seq, pseq) ? pseq : s->seq;
	__u32 to = seq_before(send, pend) ? send : pend;
	if (!seq_before(from, to))
		return 0;
	__u32 moff = from - s->seq, n = to - from;
	__u32 poff = t->k->off + (from - pseq);
	/* The checksum sums 16-bit words from the TCP header on: patch whole
	 * aligned words so bpf_csum_diff sees the same alignment. */
	__u32 lead = (poff - t->k->l4) & 3;
	__u32 wstart = poff - lead;
	__u32 wlen = (lead + n + 3) & ~3u;
	__u32 avail = t->skb->len - wstart;
	__u32 load = wlen < avail ? wlen : avail;
	if (load == 0 || load > WIRE_MASK + 8 || wlen > WIRE_MASK + 8 || moff >= WIRE_MASK) {
		t->verdict = TC_ACT_SHOT;
		return 1;
	}
	struct wire_scratch *w = t->w;
	__u8 *old = w->old, *new = w->new;
	/* Sizes the verifier can bound: [1, 256] and [4, 256]. */
	load = ((load - 1) & 0xff) + 1;
	wlen = ((wlen - 1) & 0xff) + 1;
	__builtin_memset(old, 0, WIRE_MASK + 8);
	if (bpf_skb_load_bytes(t->skb, wstart, old, load) < 0) {
		t->verdict = TC_ACT_SHOT;
		return 1;
	}
	/* The slice of the mask, shifted to the word's lead, then XORed a
	 * word at a time: a byte loop with its bounds tests cost a
	 * microsecond per patched packet. */
	__builtin_memset(new, 0, WIRE_MASK + 8);
	if (n > WIRE_MASK || moff + n > WIRE_MASK) {
		t->verdict = TC_ACT_SHOT;
		return 1;
	}
	n = ((n - 1) & (WIRE_MASK - 1)) + 1;
	bpf_probe_read_kernel(new + (lead & 3), n, s->mask + (moff & (WIRE_MASK - 1)));
#pragma unroll
	for (int q = 0; q < (WIRE_MASK + 8) / 8; q++)
		((__u64 *)new)[q] ^= ((__u64 *)old)[q];
	__s64 diff = bpf_csum_diff((void *)old, wlen, (void *)new, wlen, 0);
	if (bpf_skb_store_bytes(t->skb, wstart, new, load, BPF_F_RECOMPUTE_CSUM) < 0) {
		t->verdict = TC_ACT_SHOT;
		return 1;
	}
	__u32 csum_off = t->k->l4 + 16;
	if (bpf_l4_csum_replace(t->skb, csum_off, 0, (__u32)diff, 0) < 0) {
		t->verdict = TC_ACT_SHOT;
		return 1;
	}
	t->verdict = 1; /* patched */
	return 0;
}

static __always_inline int wire_tc(struct __sk_buff *skb, bool patch)
{
	struct pkt k;
	if (!parse(skb, &k) || !k.len)
		return TCX_NEXT;
	learn_suite(skb, &k);
	if (!patch)
		return TCX_NEXT;
	struct wire_flow *fl = bpf_map_lookup_elem(&wire_flows, &k.f);
	if (!fl)
		return TCX_NEXT;
	struct wire_scratch *w = scratch();
	if (!w)
		return TCX_NEXT;
	struct tc_ctx t = { .skb = skb, .fl = fl, .k = &k, .w = w, .verdict = 0 };
	bpf_loop(WIRE_SLOTS, patch_slot, &t, 0);
	if (t.verdict == TC_ACT_SHOT) {
		stat_add(ST_WIRE_DROPS, 1);
		return TC_ACT_SHOT;
	}
	if (t.verdict == 1)
		stat_add(ST_WIRE_PACKETS, 1);
	return TCX_NEXT;
}

/* Attached where a tracked socket's packets pass once on their way out
 * (a host device's egress; a pod veth's host-side ingress): patch, and
 * learn suites there too (loopback carries the server's answers as well).
 * Every other direction only learns. Never patch a packet twice: XOR twice
 * is no patch. */
SEC("tcx/egress")
int wire_out_patch(struct __sk_buff *skb)
{
	return wire_tc(skb, true);
}

SEC("tcx/ingress")
int wire_in_patch(struct __sk_buff *skb)
{
	return wire_tc(skb, true);
}

SEC("tcx/egress")
int wire_out_learn(struct __sk_buff *skb)
{
	return wire_tc(skb, false);
}

SEC("tcx/ingress")
int wire_in_learn(struct __sk_buff *skb)
{
	return wire_tc(skb, false);
}

/* A closed connection's patches and its keys go. */
SEC("tp/sock/inet_sock_set_state")
int wire_sock_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (!cfg_wire || ctx->newstate != TCP_CLOSE || ctx->protocol != IPPROTO_TCP)
		return 0;
	struct flow_key f = {};
	f.family = ctx->family;
	f.sport = bpf_htons(ctx->sport);
	f.dport = bpf_htons(ctx->dport);
	if (f.family == AF_INET) {
		__builtin_memcpy(f.saddr, ctx->saddr, 4);
		__builtin_memcpy(f.daddr, ctx->daddr, 4);
	} else {
		__builtin_memcpy(f.saddr, ctx->saddr_v6, 16);
		__builtin_memcpy(f.daddr, ctx->daddr_v6, 16);
	}
	struct wire_flow *fl = bpf_map_lookup_elem(&wire_flows, &f);
	if (fl) {
		struct obj_key k = { .tgid = fl->tgid, .ptr = fl->ssl };
		bpf_map_delete_elem(&wire_keys, &k);
		bpf_map_delete_elem(&go_keys, &k);
		bpf_map_delete_elem(&wire_flows, &f);
	}
	bpf_map_delete_elem(&wire_suites, &f);
	return 0;
}

#endif
