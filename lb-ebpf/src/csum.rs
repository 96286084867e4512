//! Internet checksum helpers (RFC 1071 sums, RFC 1624 incremental updates).
//!
//! XDP rejects `bpf_csum_diff` over variable-length packet data, so every header rewrite
//! in the data path patches the existing checksum for the 16-bit words it changed.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changed from `old` to `new`.
/// All values in the same byte order (the one they have on the wire works as is).
#[inline(always)]
pub const fn update16(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// Same for a 32-bit field, e.g. an IPv4 address.
#[inline(always)]
pub const fn update32(check: u16, old: u32, new: u32) -> u16 {
    let c = update16(check, old as u16, new as u16);
    update16(c, (old >> 16) as u16, (new >> 16) as u16)
}

/// One's-complement sum of `data` as big-endian words (host tooling and tests).
pub fn sum_be(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    sum
}

/// The checksum field value (host order) for `data`, with `initial` as a pseudo-header sum.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    !fold(sum_be(data, initial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 section 3: sum 0xddf2, checksum !0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_be(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data, 0), !0xddf2);
    }

    #[test]
    fn incremental_update_equals_recompute() {
        // An IPv4 header; patch every field position with many values and compare the
        // incremental result with a full recomputation.
        let mut hdr = [0x45u8, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 10, 0, 0, 1, 192, 0, 2, 1];
        let c = checksum(&hdr, 0);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        for word in (0..20).step_by(2).filter(|w| *w != 10) {
            for new in [0u16, 1, 0x00ff, 0x8000, 0xfffe, 0xffff, 0x1234] {
                let mut h = hdr;
                let old = u16::from_be_bytes([h[word], h[word + 1]]);
                h[word..word + 2].copy_from_slice(&new.to_be_bytes());
                let check = u16::from_be_bytes([h[10], h[11]]);
                let patched = update16(check, old, new);
                h[10..12].copy_from_slice(&[0, 0]);
                assert_eq!(fold(sum_be(&h, 0)) ^ 0xffff, patched, "word {word} -> {new:#x}");
                // A header with its checksum in place sums to all ones.
                h[10..12].copy_from_slice(&patched.to_be_bytes());
                assert_eq!(fold(sum_be(&h, 0)), 0xffff);
            }
        }
    }

    #[test]
    fn update32_patches_an_address() {
        let mut hdr = [0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 1, 2, 3, 192, 0, 2, 1];
        let c = checksum(&hdr, 0);
        let old = u32::from_be_bytes([10, 1, 2, 3]);
        let new = u32::from_be_bytes([203, 0, 113, 250]);
        hdr[12..16].copy_from_slice(&new.to_be_bytes());
        assert_eq!(update32(c, old, new), checksum(&hdr, 0));
    }
}
