/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The arithmetic the wire backend needs to correct an AES-GCM tag after
 * the kernel has XORed (placeholder ^ value) into a record's ciphertext.
 *
 * GCM's tag is GHASH_H(A, C) ^ E_K(J0), and GHASH is linear in C over
 * GF(2^128): flipping bits d_j in ciphertext block j (1-based, of v blocks)
 * flips the tag by d_j * H^(v - j + 2). So the correction needs only the
 * hash key H = AES_K(0^128), computed here once per key from the key the
 * library derived, and never the plaintext or the nonce.
 *
 * Blocks are GCM's bit order: byte 0's most significant bit is x^0. Held
 * as two big-endian words, hi = bytes 0..7.
 */
#ifndef KLOAK_GCM_H
#define KLOAK_GCM_H

#include "maps.h"

struct gf {
	__u64 hi;
	__u64 lo;
};

/* H^(2^i) for i < GCM_POW: exponents up to 2^GCM_POW - 1 cover a 16 KiB
 * record plus the length block and the content type. */
#define GCM_POW 11

struct gf_pow {
	struct gf p[GCM_POW];
};

struct aes_key {
	__u8 b[32];
};

/*
 * The functions below are global (not static): the verifier checks each
 * once, on its own, instead of again at every call on every path, which
 * for these loops would exceed its budget. Their pointer arguments may be
 * NULL as far as it knows, hence the checks.
 */

/* x * 0..15 in the field's bit order, and the reduction of the four bits a
 * multiplication by x^4 shifts out: the tables of the 4-bit method, which
 * takes a third of the bit-by-bit loop's instructions. */
struct gf_tab {
	__u64 hi[16];
	__u64 lo[16];
};

#ifdef KLOAK_GCM_HOST
/* tests/host/crypto_vectors.c: the same arithmetic, on the host. */
static struct gf_tab gf_tab_host;
static __always_inline struct gf_tab *gf_tab_get(void)
{
	return &gf_tab_host;
}
#else
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gf_tab);
} gf_tabs SEC(".maps");

static __always_inline struct gf_tab *gf_tab_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&gf_tabs, &zero);
}
#endif

static const __u64 gf_r4[16] = {
	0x0000000000000000ULL, 0x1c20000000000000ULL, 0x3840000000000000ULL, 0x2460000000000000ULL,
	0x7080000000000000ULL, 0x6ca0000000000000ULL, 0x48c0000000000000ULL, 0x54e0000000000000ULL,
	0xe100000000000000ULL, 0xfd20000000000000ULL, 0xd940000000000000ULL, 0xc560000000000000ULL,
	0x9180000000000000ULL, 0x8da0000000000000ULL, 0xa9c0000000000000ULL, 0xb5e0000000000000ULL,
};

/* z = x * y. */
__noinline int gf_mul(struct gf *z, const struct gf *x, const struct gf *y)
{
	if (!z || !x || !y)
		return 0;
	struct gf_tab *t = gf_tab_get();
	__u64 zh = 0, zl = 0, vh = y->hi, vl = y->lo, xh = x->hi, xl = x->lo;
	if (!t) {
		/* Cannot happen (a per-CPU array's slot 0); bit by bit, branch-free. */
		for (int i = 0; i < 64; i++) {
			__u64 m = -((xh >> (63 - i)) & 1);
			zh ^= vh & m;
			zl ^= vl & m;
			__u64 r = -(vl & 1);
			vl = (vl >> 1) | (vh << 63);
			vh = (vh >> 1) ^ (0xe100000000000000ULL & r);
		}
		for (int i = 0; i < 64; i++) {
			__u64 m = -((xl >> (63 - i)) & 1);
			zh ^= vh & m;
			zl ^= vl & m;
			__u64 r = -(vl & 1);
			vl = (vl >> 1) | (vh << 63);
			vh = (vh >> 1) ^ (0xe100000000000000ULL & r);
		}
		z->hi = zh;
		z->lo = zl;
		return 0;
	}
	/* t[8] = y, t[4] = y x, t[2] = y x^2, t[1] = y x^3 (a nibble's first
	 * bit is its highest), the rest their sums. */
	t->hi[0] = 0;
	t->lo[0] = 0;
	t->hi[8] = vh;
	t->lo[8] = vl;
#pragma unroll
	for (int k = 4; k >= 1; k >>= 1) {
		__u64 r = -(vl & 1);
		vl = (vl >> 1) | (vh << 63);
		vh = (vh >> 1) ^ (0xe100000000000000ULL & r);
		t->hi[k] = vh;
		t->lo[k] = vl;
	}
#pragma unroll
	for (int i = 2; i < 16; i <<= 1) {
#pragma unroll
		for (int j = 1; j < i; j++) {
			t->hi[i + j] = t->hi[i] ^ t->hi[j];
			t->lo[i + j] = t->lo[i] ^ t->lo[j];
		}
	}
	/* Horner over the nibbles, last first: z = z x^4 + t[nibble]. */
	for (int a = 0; a < 16; a++) {
		__u64 n = (xl >> (4 * a)) & 0xf, rem = zl & 0xf;
		zl = (zl >> 4) | (zh << 60);
		zh = (zh >> 4) ^ gf_r4[rem] ^ t->hi[n];
		zl ^= t->lo[n];
	}
	for (int a = 0; a < 16; a++) {
		__u64 n = (xh >> (4 * a)) & 0xf, rem = zl & 0xf;
		zl = (zl >> 4) | (zh << 60);
		zh = (zh >> 4) ^ gf_r4[rem] ^ t->hi[n];
		zl ^= t->lo[n];
	}
	z->hi = zh;
	z->lo = zl;
	return 0;
}

static __always_inline __u64 be64_load(const __u8 *b)
{
	return ((__u64)b[0] << 56) | ((__u64)b[1] << 48) | ((__u64)b[2] << 40) | ((__u64)b[3] << 32) |
	       ((__u64)b[4] << 24) | ((__u64)b[5] << 16) | ((__u64)b[6] << 8) | (__u64)b[7];
}

static __always_inline void be64_store(__u8 *b, __u64 v)
{
#pragma unroll
	for (int i = 0; i < 8; i++)
		b[i] = (__u8)(v >> (56 - 8 * i));
}

static const __u8 aes_sbox[256] = {
	0x63, 0x7c, 0x77, 0x7b, 0xf2, 0x6b, 0x6f, 0xc5, 0x30, 0x01, 0x67, 0x2b, 0xfe, 0xd7, 0xab, 0x76,
	0xca, 0x82, 0xc9, 0x7d, 0xfa, 0x59, 0x47, 0xf0, 0xad, 0xd4, 0xa2, 0xaf, 0x9c, 0xa4, 0x72, 0xc0,
	0xb7, 0xfd, 0x93, 0x26, 0x36, 0x3f, 0xf7, 0xcc, 0x34, 0xa5, 0xe5, 0xf1, 0x71, 0xd8, 0x31, 0x15,
	0x04, 0xc7, 0x23, 0xc3, 0x18, 0x96, 0x05, 0x9a, 0x07, 0x12, 0x80, 0xe2, 0xeb, 0x27, 0xb2, 0x75,
	0x09, 0x83, 0x2c, 0x1a, 0x1b, 0x6e, 0x5a, 0xa0, 0x52, 0x3b, 0xd6, 0xb3, 0x29, 0xe3, 0x2f, 0x84,
	0x53, 0xd1, 0x00, 0xed, 0x20, 0xfc, 0xb1, 0x5b, 0x6a, 0xcb, 0xbe, 0x39, 0x4a, 0x4c, 0x58, 0xcf,
	0xd0, 0xef, 0xaa, 0xfb, 0x43, 0x4d, 0x33, 0x85, 0x45, 0xf9, 0x02, 0x7f, 0x50, 0x3c, 0x9f, 0xa8,
	0x51, 0xa3, 0x40, 0x8f, 0x92, 0x9d, 0x38, 0xf5, 0xbc, 0xb6, 0xda, 0x21, 0x10, 0xff, 0xf3, 0xd2,
	0xcd, 0x0c, 0x13, 0xec, 0x5f, 0x97, 0x44, 0x17, 0xc4, 0xa7, 0x7e, 0x3d, 0x64, 0x5d, 0x19, 0x73,
	0x60, 0x81, 0x4f, 0xdc, 0x22, 0x2a, 0x90, 0x88, 0x46, 0xee, 0xb8, 0x14, 0xde, 0x5e, 0x0b, 0xdb,
	0xe0, 0x32, 0x3a, 0x0a, 0x49, 0x06, 0x24, 0x5c, 0xc2, 0xd3, 0xac, 0x62, 0x91, 0x95, 0xe4, 0x79,
	0xe7, 0xc8, 0x37, 0x6d, 0x8d, 0xd5, 0x4e, 0xa9, 0x6c, 0x56, 0xf4, 0xea, 0x65, 0x7a, 0xae, 0x08,
	0xba, 0x78, 0x25, 0x2e, 0x1c, 0xa6, 0xb4, 0xc6, 0xe8, 0xdd, 0x74, 0x1f, 0x4b, 0xbd, 0x8b, 0x8a,
	0x70, 0x3e, 0xb5, 0x66, 0x48, 0x03, 0xf6, 0x0e, 0x61, 0x35, 0x57, 0xb9, 0x86, 0xc1, 0x1d, 0x9e,
	0xe1, 0xf8, 0x98, 0x11, 0x69, 0xd9, 0x8e, 0x94, 0x9b, 0x1e, 0x87, 0xe9, 0xce, 0x55, 0x28, 0xdf,
	0x8c, 0xa1, 0x89, 0x0d, 0xbf, 0xe6, 0x42, 0x68, 0x41, 0x99, 0x2d, 0x0f, 0xb0, 0x54, 0xbb, 0x16,
};

static __always_inline __u8 sbox(__u8 x)
{
	return aes_sbox[x & 0xff];
}

static __always_inline __u8 xtime(__u8 x)
{
	return (__u8)((x << 1) ^ ((x >> 7) * 0x1b));
}

/* Expanded key: up to 15 round keys. */
struct aes_ctx {
	__u8 rk[240];
	__u8 s[16];
	__u8 t[16];
};

static __always_inline void aes_expand(struct aes_ctx *a, const __u8 *key, __u32 nk)
{
	__u8 rcon = 1;
	__u32 words = nk == 8 ? 60 : 44;
	for (__u32 i = 0; i < 32; i++)
		a->rk[i] = i < nk * 4 ? key[i & 31] : 0;
	for (__u32 i = 4; i < 60; i++) {
		if (i < nk || i >= words)
			continue;
		__u32 p = ((i - 1) * 4) & 0xff;
		__u8 t0 = a->rk[p & 0xff], t1 = a->rk[(p + 1) & 0xff], t2 = a->rk[(p + 2) & 0xff],
		     t3 = a->rk[(p + 3) & 0xff];
		if (i % nk == 0) {
			__u8 u = t0;
			t0 = sbox(t1) ^ rcon;
			t1 = sbox(t2);
			t2 = sbox(t3);
			t3 = sbox(u);
			rcon = xtime(rcon);
		} else if (nk == 8 && i % nk == 4) {
			t0 = sbox(t0);
			t1 = sbox(t1);
			t2 = sbox(t2);
			t3 = sbox(t3);
		}
		__u32 q = ((i - nk) * 4) & 0xff, o = (i * 4) & 0xff;
		if (o > 236 || q > 236)
			continue;
		a->rk[o] = a->rk[q] ^ t0;
		a->rk[o + 1] = a->rk[q + 1] ^ t1;
		a->rk[o + 2] = a->rk[q + 2] ^ t2;
		a->rk[o + 3] = a->rk[q + 3] ^ t3;
	}
}

static __always_inline void aes_add_round_key(struct aes_ctx *a, __u32 round)
{
	__u32 base = (round * 16) & 0xff;
	if (base > 224)
		return;
#pragma unroll
	for (int i = 0; i < 16; i++)
		a->s[i] ^= a->rk[base + i];
}

static __always_inline void aes_sub_shift(struct aes_ctx *a)
{
	/* s[r + 4c] <- sbox(s[r + 4((c + r) % 4)]) */
#pragma unroll
	for (int c = 0; c < 4; c++)
#pragma unroll
		for (int r = 0; r < 4; r++)
			a->t[r + 4 * c] = sbox(a->s[r + 4 * ((c + r) % 4)]);
}

static __always_inline void aes_mix(struct aes_ctx *a)
{
#pragma unroll
	for (int c = 0; c < 4; c++) {
		__u8 a0 = a->t[4 * c], a1 = a->t[4 * c + 1], a2 = a->t[4 * c + 2], a3 = a->t[4 * c + 3];
		__u8 all = a0 ^ a1 ^ a2 ^ a3;
		a->s[4 * c] = a0 ^ all ^ xtime(a0 ^ a1);
		a->s[4 * c + 1] = a1 ^ all ^ xtime(a1 ^ a2);
		a->s[4 * c + 2] = a2 ^ all ^ xtime(a2 ^ a3);
		a->s[4 * c + 3] = a3 ^ all ^ xtime(a3 ^ a0);
	}
}

/* AES-128 (nk 4) or AES-256 (nk 8) of the zero block into a->s. */
__noinline int aes_zero_block(struct aes_ctx *a, const struct aes_key *key, __u32 nk)
{
	if (!a || !key)
		return 0;
	nk = nk == 8 ? 8 : 4;
	aes_expand(a, key->b, nk);
	__u32 rounds = nk == 8 ? 14 : 10;
	__builtin_memset(a->s, 0, sizeof(a->s));
	aes_add_round_key(a, 0);
	for (__u32 r = 1; r < 14; r++) {
		if (r >= rounds)
			break;
		aes_sub_shift(a);
		aes_mix(a);
		aes_add_round_key(a, r);
	}
	aes_sub_shift(a);
	__builtin_memcpy(a->s, a->t, 16);
	aes_add_round_key(a, rounds);
	return 0;
}

/* pow[i] = H^(2^i), from H's 16 bytes in a->s. */
__noinline int gcm_powers(struct gf_pow *pow, const struct aes_ctx *a)
{
	if (!pow || !a)
		return 0;
	pow->p[0].hi = be64_load(a->s);
	pow->p[0].lo = be64_load(a->s + 8);
	for (int i = 1; i < GCM_POW; i++)
		gf_mul(&pow->p[i], &pow->p[i - 1], &pow->p[i - 1]);
	return 0;
}

/* z = z * H^e, e < 2^GCM_POW. */
__noinline int gf_mul_pow(struct gf *z, const struct gf_pow *pow, __u32 e)
{
	if (!z || !pow)
		return 0;
	for (int i = 0; i < GCM_POW; i++) {
		if (e & (1u << i))
			gf_mul(z, z, &pow->p[i]);
	}
	return 0;
}

#endif
