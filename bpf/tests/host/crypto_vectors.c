/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * The wire backend's in-kernel crypto, built for the host and checked against
 * published vectors: RFC 8439 (ChaCha20 block, Poly1305 key generation, the
 * AEAD's tag) and the GCM spec's test case 2 (H = AES_K(0), GHASH), and
 * GHASH's 4-bit multiplication against its bit-by-bit definition. Run by
 * tests/crypto.rs; prints what differs and exits 1.
 */
#include <stdio.h>
#include <string.h>
#include <linux/types.h>

#define KLOAK_MAPS_H /* the headers' only need from maps.h is below */
#define KLOAK_GCM_HOST /* gf_mul's table in plain memory, not a per-CPU map */
#define __noinline __attribute__((noinline))
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#include "../../src/bpf/chacha.h"
#include "../../src/bpf/gcm.h"

static int failed;

static void hex(const char *s, __u8 *out, size_t n)
{
	for (size_t i = 0; i < n; i++)
		sscanf(s + 2 * i, "%2hhx", &out[i]);
}

static void expect(const char *what, const __u8 *got, const char *want_hex, size_t n)
{
	__u8 want[256];
	hex(want_hex, want, n);
	if (memcmp(got, want, n)) {
		failed = 1;
		printf("FAIL %s: got ", what);
		for (size_t i = 0; i < n; i++)
			printf("%02x", got[i]);
		printf("\n");
	}
}

/* The AEAD construction's MAC input: aad, pad, ct, pad, lengths; the
 * second accumulator sees ct2. */
static void aead_tag(struct poly *st, const __u8 *aad, size_t alen, const __u8 *ct, const __u8 *ct2,
		     size_t clen)
{
	memset(st->a, 0, 16);
	memcpy(st->a, aad, alen);
	memcpy(st->b, st->a, 16);
	poly_blocks(st);
	for (size_t o = 0; o < clen; o += 16) {
		size_t n = clen - o < 16 ? clen - o : 16;
		memset(st->a, 0, 16);
		memset(st->b, 0, 16);
		memcpy(st->a, ct + o, n);
		memcpy(st->b, ct2 + o, n);
		poly_blocks(st);
	}
	__u64 l[2] = { alen, clen };
	memcpy(st->a, l, 16);
	memcpy(st->b, l, 16);
	poly_blocks(st);
	poly_tags(st);
}

int main(void)
{
	struct chacha_in in;
	struct poly st;
	__u8 key[32], nonce[12];

	/* RFC 8439 2.6.2: Poly1305 key generation. */
	hex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f", key, 32);
	hex("000000000001020304050607", nonce, 12);
	memcpy(in.key, key, 32);
	memcpy(in.nonce, nonce, 12);
	poly_init(&st, &in);
	__u8 s[16];
	memcpy(s, st.s, 16);
	expect("2.6.2 s", s, "a833b637e3fd0da508dbb8e2fdd1a646", 16);

	/* RFC 8439 2.8.2: the AEAD's tag (AAD 12 bytes, 114 bytes of ciphertext). */
	__u8 aad[12], ct[114];
	hex("50515253c0c1c2c3c4c5c6c7", aad, 12);
	hex("d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116",
	    ct, 114);
	hex("070000004041424344454647", nonce, 12);
	memcpy(in.nonce, nonce, 12);
	poly_init(&st, &in);
	aead_tag(&st, aad, 12, ct, ct, 114);
	expect("2.8.2 tag", st.th, "1ae10b594f09e26a7e902ecbd0600691", 16);
	expect("2.8.2 tag (second accumulator)", st.tg, "1ae10b594f09e26a7e902ecbd0600691", 16);

	/* A flipped ciphertext gives a different tag in g only. */
	__u8 ct2[114];
	memcpy(ct2, ct, 114);
	ct2[100] ^= 0x5a;
	poly_init(&st, &in);
	aead_tag(&st, aad, 12, ct, ct2, 114);
	expect("flip keeps h", st.th, "1ae10b594f09e26a7e902ecbd0600691", 16);
	if (!memcmp(st.th, st.tg, 16)) {
		failed = 1;
		printf("FAIL flip: g's tag did not change\n");
	}

	/* GCM spec test case 2: K = 0^128, H = 66e94bd4ef8a2c3b884cfa59ca342b2e. */
	struct aes_ctx a;
	struct aes_key k = {};
	aes_zero_block(&a, &k, 4);
	expect("AES-128(0) = H", a.s, "66e94bd4ef8a2c3b884cfa59ca342b2e", 16);
	/* AES-256 with the zero key (FIPS-197 style check value). */
	aes_zero_block(&a, &k, 8);
	expect("AES-256(0)", a.s, "dc95c078a2408989ad48a21492842087", 16);

	/* GHASH of test case 2 (A empty, C one block): (C * H ^ lengths) * H. */
	struct gf h, x;
	aes_zero_block(&a, &k, 4);
	h.hi = be64_load(a.s);
	h.lo = be64_load(a.s + 8);
	__u8 c[16], out[16];
	hex("0388dace60b6a392f328c2b971b2fe78", c, 16);
	x.hi = be64_load(c);
	x.lo = be64_load(c + 8);
	gf_mul(&x, &x, &h);
	x.lo ^= 128; /* len(A) = 0, len(C) = 128 bits */
	gf_mul(&x, &x, &h);
	be64_store(out, x.hi);
	be64_store(out + 8, x.lo);
	expect("GHASH test case 2", out, "f38cbb1ad69223dcc3457ae5b6b0f885", 16);

	/* The 4-bit method against the definition, bit by bit, and H^e by
	 * powers against e multiplications. */
	__u64 seed = 0x9e3779b97f4a7c15ULL;
	for (int t = 0; t < 20000; t++) {
		struct gf p, q, z, want = { 0, 0 };
		seed = seed * 6364136223846793005ULL + 1442695040888963407ULL; p.hi = seed;
		seed = seed * 6364136223846793005ULL + 1442695040888963407ULL; p.lo = seed;
		seed = seed * 6364136223846793005ULL + 1442695040888963407ULL; q.hi = seed;
		seed = seed * 6364136223846793005ULL + 1442695040888963407ULL; q.lo = seed;
		__u64 vh = q.hi, vl = q.lo;
		for (int i = 0; i < 128; i++) {
			__u64 bit = i < 64 ? p.hi >> (63 - i) : p.lo >> (127 - i);
			if (bit & 1) {
				want.hi ^= vh;
				want.lo ^= vl;
			}
			__u64 r = vl & 1;
			vl = (vl >> 1) | (vh << 63);
			vh = (vh >> 1) ^ (r ? 0xe100000000000000ULL : 0);
		}
		gf_mul(&z, &p, &q);
		if (z.hi != want.hi || z.lo != want.lo) {
			failed = 1;
			printf("FAIL gf_mul, case %d\n", t);
			break;
		}
	}
	struct gf_pow pw;
	aes_zero_block(&a, &k, 4);
	gcm_powers(&pw, &a);
	for (__u32 e = 1; e < 300; e += 37) {
		struct gf byp = { 0x0123456789abcdefULL, 0xfedcba9876543210ULL }, rep = byp;
		gf_mul_pow(&byp, &pw, e);
		for (__u32 i = 0; i < e; i++)
			gf_mul(&rep, &rep, &h);
		if (byp.hi != rep.hi || byp.lo != rep.lo) {
			failed = 1;
			printf("FAIL gf_mul_pow, e = %u\n", e);
		}
	}

	if (!failed)
		printf("ok\n");
	return failed;
}
