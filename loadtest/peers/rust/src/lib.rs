//! What the peers of `loadtest/run.sh --only threads` share: reading a
//! size such as `64k` from the command line.
//!
//! The binaries are `threaded-echo` (std::net + tungstenite's blocking API,
//! one OS thread per connection) and `tokio-mt-echo` (tokio's
//! work-stealing runtime with tokio-tungstenite). Both echo every text and
//! binary message back, answer pings and close politely, like echo-server.

/// A byte count with an optional `k`/`m` suffix (powers of 1024), as
/// `--stack-size 64k` takes it.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, unit) = match t.strip_suffix(['k', 'm']) {
        Some(d) => (d, if t.ends_with('k') { 1024 } else { 1024 * 1024 }),
        None => (t.as_str(), 1),
    };
    let n: usize = digits.parse().map_err(|_| format!("{s:?} is not a size such as 65536, 64k or 2m"))?;
    n.checked_mul(unit).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("2m"), Ok(2 * 1024 * 1024));
        assert!(parse_size("64q").is_err());
        assert!(parse_size("").is_err());
    }
}
