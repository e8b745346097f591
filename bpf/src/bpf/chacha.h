/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * What the wire backend needs to re-tag a ChaCha20-Poly1305 record after the
 * kernel has XORed (placeholder ^ value) into its ciphertext (RFC 8439).
 *
 * Unlike GHASH, Poly1305's tag is (acc mod p + s) mod 2^128: the final
 * reduction hides which multiple of 2^128 was dropped, so a correction cannot
 * be computed from the difference alone. Each record's tag is recomputed
 * instead, over the ciphertext as written and as it will be patched, in one
 * pass with two accumulators. The one-time key (r, s) comes from the ChaCha20
 * block of the record's nonce, and the nonce from the record's sequence
 * number, which the probes only estimate: the tag over the unpatched
 * ciphertext must equal the record's own tag, which proves the key, the nonce
 * and the sequence number before anything is armed.
 *
 * Limbs are 26 bits (poly1305-donna's 32-bit form): products fit 64 bits.
 */
#ifndef KLOAK_CHACHA_H
#define KLOAK_CHACHA_H

#include "maps.h"

struct chacha_in {
	__u32 key[8];
	__u32 nonce[3];
};

/* Poly1305 state: key r (clamped, limbs), r * 5, s, and two accumulators:
 * h over the ciphertext as written, g over it as patched. */
struct poly {
	__u32 r[5];
	__u32 r5[5];
	__u32 s[4];
	__u32 h[5];
	__u32 g[5];
	/* the next 16-byte block of each input */
	__u8 a[16];
	__u8 b[16];
	/* finished tags */
	__u8 th[16];
	__u8 tg[16];
};

#define QR(a, b, c, d)                                                   \
	do {                                                             \
		a += b; d ^= a; d = (d << 16) | (d >> 16);               \
		c += d; b ^= c; b = (b << 12) | (b >> 20);               \
		a += b; d ^= a; d = (d << 8) | (d >> 24);                \
		c += d; b ^= c; b = (b << 7) | (b >> 25);                \
	} while (0)

static __always_inline __u32 le32(const __u8 *p)
{
	return (__u32)p[0] | ((__u32)p[1] << 8) | ((__u32)p[2] << 16) | ((__u32)p[3] << 24);
}

static __always_inline void le32_store(__u8 *p, __u32 v)
{
	p[0] = v;
	p[1] = v >> 8;
	p[2] = v >> 16;
	p[3] = v >> 24;
}

/* Global (see gcm.h): the verifier checks each once. */

/* The one-time Poly1305 key of a record: ChaCha20 block 0 of its nonce.
 * Resets both accumulators. */
__noinline int poly_init(struct poly *st, const struct chacha_in *in)
{
	if (!st || !in)
		return 0;
	__u32 x0 = 0x61707865, x1 = 0x3320646e, x2 = 0x79622d32, x3 = 0x6b206574;
	__u32 x4 = in->key[0], x5 = in->key[1], x6 = in->key[2], x7 = in->key[3];
	__u32 x8 = in->key[4], x9 = in->key[5], x10 = in->key[6], x11 = in->key[7];
	__u32 x12 = 0, x13 = in->nonce[0], x14 = in->nonce[1], x15 = in->nonce[2];
	for (int i = 0; i < 10; i++) {
		QR(x0, x4, x8, x12);
		QR(x1, x5, x9, x13);
		QR(x2, x6, x10, x14);
		QR(x3, x7, x11, x15);
		QR(x0, x5, x10, x15);
		QR(x1, x6, x11, x12);
		QR(x2, x7, x8, x13);
		QR(x3, x4, x9, x14);
	}
	/* Only words 0..7 of the block are used: r, then s. */
	__u32 t0 = x0 + 0x61707865, t1 = x1 + 0x3320646e, t2 = x2 + 0x79622d32,
	      t3 = x3 + 0x6b206574;
	st->s[0] = x4 + in->key[0];
	st->s[1] = x5 + in->key[1];
	st->s[2] = x6 + in->key[2];
	st->s[3] = x7 + in->key[3];
	/* Clamped while split into limbs. */
	st->r[0] = t0 & 0x3ffffff;
	st->r[1] = ((t0 >> 26) | (t1 << 6)) & 0x3ffff03;
	st->r[2] = ((t1 >> 20) | (t2 << 12)) & 0x3ffc0ff;
	st->r[3] = ((t2 >> 14) | (t3 << 18)) & 0x3f03fff;
	st->r[4] = (t3 >> 8) & 0x00fffff;
	for (int i = 0; i < 5; i++) {
		st->r5[i] = st->r[i] * 5;
		st->h[i] = 0;
		st->g[i] = 0;
	}
	return 0;
}

static __always_inline void poly_mul(__u32 *h, const __u8 *m, const struct poly *st)
{
	__u32 t0 = le32(m), t1 = le32(m + 4), t2 = le32(m + 8), t3 = le32(m + 12);
	__u64 h0 = h[0] + (t0 & 0x3ffffff);
	__u64 h1 = h[1] + (((t0 >> 26) | (t1 << 6)) & 0x3ffffff);
	__u64 h2 = h[2] + (((t1 >> 20) | (t2 << 12)) & 0x3ffffff);
	__u64 h3 = h[3] + (((t2 >> 14) | (t3 << 18)) & 0x3ffffff);
	__u64 h4 = h[4] + ((t3 >> 8) | (1u << 24));
	__u64 r0 = st->r[0], r1 = st->r[1], r2 = st->r[2], r3 = st->r[3], r4 = st->r[4];
	__u64 s1 = st->r5[1], s2 = st->r5[2], s3 = st->r5[3], s4 = st->r5[4];
	__u64 d0 = h0 * r0 + h1 * s4 + h2 * s3 + h3 * s2 + h4 * s1;
	__u64 d1 = h0 * r1 + h1 * r0 + h2 * s4 + h3 * s3 + h4 * s2;
	__u64 d2 = h0 * r2 + h1 * r1 + h2 * r0 + h3 * s4 + h4 * s3;
	__u64 d3 = h0 * r3 + h1 * r2 + h2 * r1 + h3 * r0 + h4 * s4;
	__u64 d4 = h0 * r4 + h1 * r3 + h2 * r2 + h3 * r1 + h4 * r0;
	__u64 c;
	c = d0 >> 26; h0 = d0 & 0x3ffffff;
	d1 += c; c = d1 >> 26; h1 = d1 & 0x3ffffff;
	d2 += c; c = d2 >> 26; h2 = d2 & 0x3ffffff;
	d3 += c; c = d3 >> 26; h3 = d3 & 0x3ffffff;
	d4 += c; c = d4 >> 26; h4 = d4 & 0x3ffffff;
	h0 += c * 5; c = h0 >> 26; h0 &= 0x3ffffff;
	h1 += c;
	h[0] = h0;
	h[1] = h1;
	h[2] = h2;
	h[3] = h3;
	h[4] = h4;
}

/* Absorbs the full blocks st->a into h and st->b into g. */
__noinline int poly_blocks(struct poly *st)
{
	if (!st)
		return 0;
	poly_mul(st->h, st->a, st);
	poly_mul(st->g, st->b, st);
	return 0;
}

static __always_inline void poly_finish(__u32 *hh, const __u32 *s, __u8 *tag)
{
	__u32 h0 = hh[0], h1 = hh[1], h2 = hh[2], h3 = hh[3], h4 = hh[4], c;
	c = h1 >> 26; h1 &= 0x3ffffff;
	h2 += c; c = h2 >> 26; h2 &= 0x3ffffff;
	h3 += c; c = h3 >> 26; h3 &= 0x3ffffff;
	h4 += c; c = h4 >> 26; h4 &= 0x3ffffff;
	h0 += c * 5; c = h0 >> 26; h0 &= 0x3ffffff;
	h1 += c;
	/* h - p, kept when it does not borrow: a constant-time select. */
	__u32 g0 = h0 + 5; c = g0 >> 26; g0 &= 0x3ffffff;
	__u32 g1 = h1 + c; c = g1 >> 26; g1 &= 0x3ffffff;
	__u32 g2 = h2 + c; c = g2 >> 26; g2 &= 0x3ffffff;
	__u32 g3 = h3 + c; c = g3 >> 26; g3 &= 0x3ffffff;
	__u32 g4 = h4 + c - (1u << 26);
	__u32 m = (g4 >> 31) - 1;
	h0 = (h0 & ~m) | (g0 & m);
	h1 = (h1 & ~m) | (g1 & m);
	h2 = (h2 & ~m) | (g2 & m);
	h3 = (h3 & ~m) | (g3 & m);
	h4 = (h4 & ~m) | (g4 & m);
	__u32 w0 = h0 | (h1 << 26), w1 = (h1 >> 6) | (h2 << 20), w2 = (h2 >> 12) | (h3 << 14),
	      w3 = (h3 >> 18) | (h4 << 8);
	__u64 f = (__u64)w0 + s[0];
	le32_store(tag, (__u32)f);
	f = (__u64)w1 + s[1] + (f >> 32);
	le32_store(tag + 4, (__u32)f);
	f = (__u64)w2 + s[2] + (f >> 32);
	le32_store(tag + 8, (__u32)f);
	f = (__u64)w3 + s[3] + (f >> 32);
	le32_store(tag + 12, (__u32)f);
}

/* Both tags, into st->th and st->tg. */
__noinline int poly_tags(struct poly *st)
{
	if (!st)
		return 0;
	poly_finish(st->h, st->s, st->th);
	poly_finish(st->g, st->s, st->tg);
	return 0;
}

#endif
