//! The bytes each message carries, and the check of every echo.
//!
//! A message is a 24-byte header followed by filler derived from the header:
//!
//! ```text
//! 0..4    magic "ELG1"
//! 4..8    connection id (u32, big endian)      who sent it
//! 8..16   sequence number (u64, big endian)    order check
//! 16..24  scheduled time (u64 ns, big endian)  latency from the *scheduled* send time
//! 24..    filler: a hash of the header, spread   any changed byte is detected
//! ```
//!
//! The timestamp is the moment the message was *due*, not when it left: when
//! the server stalls, messages queue up behind it, and their latency includes
//! the wait (wrk2's correction for coordinated omission). Because the filler
//! depends on the header, a flipped byte anywhere is caught, and a
//! well-formed message with the wrong sequence number is told apart from a
//! corrupted one.

/// Size of the header; the smallest payload this tool can send.
pub const HEADER_LEN: usize = 24;
const MAGIC: &[u8; 4] = b"ELG1";

/// Writes a message of `size` bytes (at least [`HEADER_LEN`]) into `buf`.
pub fn fill(buf: &mut Vec<u8>, conn: u32, seq: u64, scheduled_ns: u64, size: usize) {
    debug_assert!(size >= HEADER_LEN);
    buf.clear();
    buf.reserve(size);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&conn.to_be_bytes());
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(&scheduled_ns.to_be_bytes());
    let key = key(conn, seq, scheduled_ns);
    buf.extend((HEADER_LEN..size).map(|i| filler(key, i)));
}

/// Builds a message as a new vector.
pub fn message(conn: u32, seq: u64, scheduled_ns: u64, size: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(size);
    fill(&mut buf, conn, seq, scheduled_ns, size);
    buf
}

/// SplitMix64 of the header fields: every header bit changes the filler.
fn key(conn: u32, seq: u64, scheduled_ns: u64) -> u64 {
    let mut z = (u64::from(conn) << 32 ^ seq.rotate_left(17) ^ scheduled_ns.rotate_left(41))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn filler(key: u64, i: usize) -> u8 {
    ((key >> ((i % 8) * 8)) as u8).wrapping_add((i / 8) as u8)
}

/// A well-formed message as decoded from an echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub conn: u32,
    pub seq: u64,
    pub scheduled_ns: u64,
}

/// Decodes an echo and checks every byte: `None` means the content is not
/// what any sender of this tool wrote (wrong length, magic, or filler).
pub fn decode(bytes: &[u8], expected_size: usize) -> Option<Header> {
    if bytes.len() != expected_size || bytes.len() < HEADER_LEN || &bytes[0..4] != MAGIC {
        return None;
    }
    let conn = u32::from_be_bytes(bytes[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(bytes[8..16].try_into().ok()?);
    let scheduled_ns = u64::from_be_bytes(bytes[16..24].try_into().ok()?);
    let key = key(conn, seq, scheduled_ns);
    let intact = bytes[HEADER_LEN..].iter().enumerate().all(|(k, &b)| b == filler(key, HEADER_LEN + k));
    intact.then_some(Header { conn, seq, scheduled_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = message(7, 42, 123_456_789, 64);
        assert_eq!(m.len(), 64);
        assert_eq!(decode(&m, 64), Some(Header { conn: 7, seq: 42, scheduled_ns: 123_456_789 }));
    }

    #[test]
    fn every_single_changed_bit_is_detected() {
        let m = message(3, 9, 1_000, 48);
        for i in 0..m.len() {
            for bit in 0..8 {
                let mut bad = m.clone();
                bad[i] ^= 1 << bit;
                assert_eq!(decode(&bad, 48), None, "byte {i} bit {bit} undetected");
            }
        }
    }

    #[test]
    fn wrong_length_is_a_mismatch() {
        let m = message(1, 1, 1, 32);
        assert_eq!(decode(&m[..31], 32), None);
        assert_eq!(decode(&m, 33), None);
    }

    #[test]
    fn minimal_size_has_no_filler() {
        let m = message(1, 2, 3, HEADER_LEN);
        assert_eq!(decode(&m, HEADER_LEN).unwrap().seq, 2);
    }
}
