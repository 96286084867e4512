//! The flow hash that picks a Maglev ring slot for a new flow.
//!
//! It lives here, not in the eBPF crate, so the daemon and the tests compute exactly what
//! the kernel computes: directors that share a config must send a flow to the same server,
//! and a packet fixture can predict the backend it expects. It is MurmurHash3's x86_32
//! block and finaliser over the raw address words: a handful of multiplies, cheap in BPF,
//! and well mixed enough that consecutive client addresses spread over the ring.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Fixed so every director agrees; changing it moves every flow, like a new ring.
pub const SEED: u32 = 0x4c42_5348; // "LBSH"

#[inline(always)]
const fn block(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len_bytes: u32) -> u32 {
    h ^= len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Slots of the VIP pre-filter (`VIP_FILTER`): one byte each.
pub const VIP_FILTER_SLOTS: u32 = 1 << 16;

/// The pre-filter slot of a destination address: the address words folded to 16 bits.
/// Not a good hash, and it need not be: a collision only costs the exact lookup that
/// every packet would otherwise pay.
#[inline(always)]
pub const fn vip_filter_slot(addr: &[u32; 4], ipv6: bool) -> u32 {
    let w = if ipv6 { addr[0] ^ addr[1] ^ addr[2] ^ addr[3] } else { addr[0] };
    (w ^ (w >> 16)) & (VIP_FILTER_SLOTS - 1)
}

/// `sh`: hash of the source address only (4 bytes for IPv4, 16 for IPv6).
#[inline(always)]
pub const fn source_hash(src: &[u32; 4], ipv6: bool) -> u32 {
    let mut h = block(SEED, src[0]);
    if ipv6 {
        h = block(h, src[1]);
        h = block(h, src[2]);
        h = block(h, src[3]);
        finish(h, 16)
    } else {
        finish(h, 4)
    }
}

/// `mh`: hash of the whole 5-tuple. Ports are taken as they sit on the wire.
#[inline(always)]
pub const fn tuple_hash(
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    ipv6: bool,
) -> u32 {
    let mut h = block(SEED, src[0]);
    h = block(h, dst[0]);
    if ipv6 {
        h = block(h, src[1]);
        h = block(h, src[2]);
        h = block(h, src[3]);
        h = block(h, dst[1]);
        h = block(h, dst[2]);
        h = block(h, dst[3]);
    }
    h = block(h, ((sport as u32) << 16) | dport as u32);
    h = block(h, proto as u32);
    finish(h, if ipv6 { 40 } else { 16 })
}

/// The connection table's hash of a flow (`FlowTable`), under the table's own seed: the
/// 5-tuple and the family (the upper address words only for IPv6). It repeats
/// `tuple_hash`'s steps rather than share a core with it: through a shared function taking
/// the fields by value, LLVM loads every field first and spills them, and the data path's
/// global functions (`lb_flow_find`) have no stack to spare (the verifier refused it).
#[inline(always)]
pub const fn flow_hash(key: &crate::FlowKey, seed: u32) -> u32 {
    let mut h = block(seed, key.src[0]);
    h = block(h, key.dst[0]);
    let ipv6 = key.family == crate::FAMILY_V6;
    if ipv6 {
        h = block(h, key.src[1]);
        h = block(h, key.src[2]);
        h = block(h, key.src[3]);
        h = block(h, key.dst[1]);
        h = block(h, key.dst[2]);
        h = block(h, key.dst[3]);
    }
    h = block(h, ((key.sport as u32) << 16) | key.dport as u32);
    h = block(h, ((key.family as u32) << 8) | key.proto as u32);
    finish(h, if ipv6 { 40 } else { 16 })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn murmur3_matches_reference_vectors() {
        // Expected values from an independent MurmurHash3_x86_32 (the `mmh3` package),
        // over the same bytes as they sit in memory on a little-endian director.
        assert_eq!(finish(block(0, 0), 4), 0x2362_f9de);
        assert_eq!(finish(block(0, u32::from_le_bytes(*b"dddd")), 4), 0x7b37_f76f);
        assert_eq!(source_hash(&[0x0102_0304, 0, 0, 0], false), 0xf733_fde6);
        let words = [0x0302_0100, 0x0706_0504, 0x0b0a_0908, 0x0f0e_0d0c];
        assert_eq!(source_hash(&words, true), 0x2ef2_eca6);
    }

    #[test]
    fn source_hash_depends_on_the_whole_address() {
        let a = [0x0a00_0001u32.to_be(), 0, 0, 0];
        let mut b = a;
        b[0] ^= 1 << 24;
        assert_ne!(source_hash(&a, false), source_hash(&b, false));
        let mut c = a;
        c[3] = 1;
        assert_eq!(source_hash(&a, false), source_hash(&c, false), "IPv4 ignores the upper words");
        assert_ne!(source_hash(&a, true), source_hash(&c, true));
    }

    #[test]
    fn vip_filter_slots_spread_neighbouring_addresses() {
        // Consecutive VIPs in one /24 land in distinct slots.
        let slots: std::collections::BTreeSet<u32> = (0..=255u8)
            .map(|i| vip_filter_slot(&[u32::from_ne_bytes([192, 0, 2, i]), 0, 0, 0], false))
            .collect();
        assert_eq!(slots.len(), 256);
        assert!(slots.iter().all(|s| *s < VIP_FILTER_SLOTS));
    }

    #[test]
    fn flow_hash_depends_on_the_seed() {
        let key = crate::FlowKey {
            src: [1, 0, 0, 0],
            dst: [2, 0, 0, 0],
            sport: 1,
            dport: 80,
            proto: 6,
            family: 4,
            _pad: 0,
        };
        assert_ne!(flow_hash(&key, SEED), flow_hash(&key, SEED ^ 1));
        let other_port = crate::FlowKey { sport: 2, ..key };
        assert_ne!(flow_hash(&key, SEED), flow_hash(&other_port, SEED));
    }

    #[test]
    fn tuple_hash_depends_on_ports() {
        let s = [1, 0, 0, 0];
        let d = [2, 0, 0, 0];
        assert_ne!(tuple_hash(&s, &d, 1, 80, 6, false), tuple_hash(&s, &d, 2, 80, 6, false));
        assert_ne!(tuple_hash(&s, &d, 1, 80, 6, false), tuple_hash(&s, &d, 1, 80, 17, false));
    }
}
