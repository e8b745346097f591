//! HTTP/2 header values travel HPACK Huffman-coded, so an ASCII placeholder
//! never appears in the plaintext. A placeholder whose Huffman code is exactly
//! as many bits as the value's can be swapped bit for bit inside the coded
//! string: the frame keeps its length, the string its padding, and a strict
//! decoder reads the real value.

use httlib_huffman::encoder::table::ENCODE_TABLE;
use rand::Rng;

/// Characters a widened placeholder may use, by Huffman code length: safe in
/// headers, URLs, JSON and shell words.
const BY_LEN: [(u32, &[u8]); 4] = [
    (5, b"012aceiost"),
    (6, b"3456789Abdfghlmnpru-_"),
    (7, b"BCDEFGHIJKLMNOPQRSTUVWYjkqvwxyz"),
    (8, b"XZ"),
];

pub fn code_len(b: u8) -> u32 {
    u32::from(ENCODE_TABLE[b as usize].0)
}

/// Bits the HPACK Huffman code of `s` takes, before padding.
pub fn huffman_bits(s: &[u8]) -> u32 {
    s.iter().map(|&b| code_len(b)).sum()
}

/// The Huffman code of `s` as a bit string (most significant bit first).
pub fn bits_of(s: &[u8]) -> Vec<bool> {
    let mut out = Vec::with_capacity(huffman_bits(s) as usize);
    for &b in s {
        let (len, code) = ENCODE_TABLE[b as usize];
        for i in (0..len).rev() {
            out.push(code >> i & 1 == 1);
        }
    }
    out
}

/// Fills `rand` (the characters after `kloak:`) so that the whole
/// placeholder's Huffman code is `target` bits. None when no choice of safe
/// characters can reach it: the value's code is too short or too long.
pub fn tune(rand: &mut [u8], target_bits: u32) -> Option<()> {
    let prefix_bits = huffman_bits(kloak_bpf::PREFIX);
    let want = target_bits.checked_sub(prefix_bits)?;
    let n = rand.len() as u32;
    if want < 5 * n || want > 8 * n {
        return None;
    }
    let mut rng = rand::rng();
    let mut have = huffman_bits(rand);
    // Each step moves one character's code length toward the target; every
    // character can take any length from 5 to 8, so this ends.
    while have != want {
        let i = rng.random_range(0..rand.len());
        let cur = code_len(rand[i]);
        let next = if have < want {
            (cur + (want - have)).min(8)
        } else {
            cur.saturating_sub(have - want).max(5)
        };
        if next == cur {
            continue;
        }
        let set = BY_LEN.iter().find(|(l, _)| *l == next).expect("5..=8").1;
        rand[i] = set[rng.random_range(0..set.len())];
        have = have - cur + next;
    }
    Some(())
}

/// What the kernel looks for: `kloak:` Huffman-coded from each bit offset
/// 0-7 of a byte, as the first three bytes it fully covers.
pub fn prefix_signatures() -> [[u8; 3]; 8] {
    let bits = bits_of(kloak_bpf::PREFIX);
    let mut out = [[0u8; 3]; 8];
    for (a, sig) in out.iter_mut().enumerate() {
        // The first whole byte starts at bit (8 - a) % 8 of the code.
        let start = (8 - a) % 8;
        for (k, byte) in sig.iter_mut().enumerate() {
            *byte = bits[start + k * 8..start + k * 8 + 8]
                .iter()
                .fold(0, |acc, &b| acc << 1 | u8::from(b));
        }
    }
    out
}

/// A bit string inside a byte buffer, by bit offset.
fn bit(buf: &[u8], i: usize) -> bool {
    buf[i / 8] >> (7 - i % 8) & 1 == 1
}

fn set_bit(buf: &mut [u8], i: usize, v: bool) {
    let m = 1u8 << (7 - i % 8);
    if v {
        buf[i / 8] |= m;
    } else {
        buf[i / 8] &= !m;
    }
}

/// Bit offsets in `buf` where the bit string `needle` starts.
pub fn find_bits(buf: &[u8], needle: &[bool]) -> Vec<usize> {
    let total = buf.len() * 8;
    let mut out = Vec::new();
    if needle.is_empty() || needle.len() > total {
        return out;
    }
    let mut i = 0;
    while i + needle.len() <= total {
        if needle
            .iter()
            .enumerate()
            .all(|(j, &b)| bit(buf, i + j) == b)
        {
            out.push(i);
            i += needle.len();
        } else {
            i += 1;
        }
    }
    out
}

/// Writes bit string `bits` into `buf` at bit offset `at`.
pub fn put_bits(buf: &mut [u8], at: usize, bits: &[bool]) {
    for (j, &b) in bits.iter().enumerate() {
        set_bit(buf, at + j, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn huff(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        httlib_huffman::encode(s, &mut out).unwrap();
        out
    }

    fn unhuff(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        httlib_huffman::decode(s, &mut out, httlib_huffman::DecoderSpeed::FiveBits).unwrap();
        out
    }

    #[test]
    fn tuned_placeholders_match_the_value_bit_for_bit_in_length() {
        for value in [
            &b"sk-live-0123456789abcdef"[..],
            b"AKIAIOSFODNN7EXAMPLE",
            b"ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        ] {
            let mut p = kloak_bpf::PREFIX.to_vec();
            p.extend(std::iter::repeat_n(b'0', value.len() - 6));
            tune(&mut p[6..], huffman_bits(value)).expect("reachable");
            assert_eq!(
                huffman_bits(&p),
                huffman_bits(value),
                "{}",
                String::from_utf8_lossy(&p)
            );
            assert_eq!(p.len(), value.len());
            assert!(
                p[6..]
                    .iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
            );
        }
    }

    #[test]
    fn prefix_signatures_are_what_an_encoder_produces() {
        for (a, sig) in prefix_signatures().iter().enumerate() {
            // n zeros ("0" is a 5-bit code) put the prefix at bit 5n mod 8.
            let lead: &[u8] = match a {
                0 => b"",
                5 => b"0",
                2 => b"00",
                7 => b"000",
                4 => b"0000",
                1 => b"00000",
                6 => b"000000",
                3 => b"0000000",
                _ => unreachable!(),
            };
            assert_eq!(huffman_bits(lead) as usize % 8, a);
            let coded = huff(&[lead, b"kloak:XYZ"].concat());
            let first = (huffman_bits(lead) as usize).div_ceil(8);
            assert_eq!(&coded[first..first + 3], sig, "alignment {a}");
        }
    }

    #[test]
    fn values_whose_code_cannot_be_matched_are_refused() {
        // Eight bytes of codes 23+ bits long: no safe placeholder reaches it.
        let value = [0x01u8; 8];
        let mut r = vec![b'0'; 2];
        assert!(tune(&mut r, huffman_bits(&value)).is_none());
        // A short value of short codes: "kloak:" alone takes 37 of its 44 bits.
        assert!(tune(&mut r, huffman_bits(b"hunter22")).is_none());
    }

    #[test]
    fn swapping_the_bits_inside_a_huffman_string_decodes_to_the_value() {
        let value = b"sk-live-REAL-secret-0123456789";
        let mut p = kloak_bpf::PREFIX.to_vec();
        p.extend(std::iter::repeat_n(b'A', value.len() - 6));
        tune(&mut p[6..], huffman_bits(value)).unwrap();
        // "Bearer " puts the placeholder at an arbitrary bit offset.
        let header = [&b"Bearer "[..], &p].concat();
        let mut coded = huff(&header);
        let at = find_bits(&coded, &bits_of(&p));
        assert_eq!(at, vec![huffman_bits(b"Bearer ") as usize]);
        put_bits(&mut coded, at[0], &bits_of(value));
        assert_eq!(coded.len(), huff(&header).len(), "same length on the wire");
        assert_eq!(unhuff(&coded), [&b"Bearer "[..], value].concat());
    }
}
