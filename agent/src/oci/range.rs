//! The `Range` request header (RFC 9110 §14), for serving stored content. Only one byte range
//! is honoured; anything else is ignored, and the whole content served, as the RFC allows.
//! Pure, so it is fuzzed on its own (`fuzz/`).

#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// [start, end) in bytes.
    Satisfiable(u64, u64),
    /// Not a single byte range we support: serve the whole content (allowed by RFC 9110).
    Ignore,
    Unsatisfiable,
}

pub fn parse_range(spec: &str, len: u64) -> RangeSpec {
    let Some(ranges) = spec.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if ranges.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((first, last)) = ranges.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (first, last) = (first.trim(), last.trim());
    let parsed = match (first.parse::<u64>().ok(), last.parse::<u64>().ok()) {
        (Some(start), None) if last.is_empty() => Some((start, len)),
        (Some(start), Some(end)) if end >= start => Some((start, end.saturating_add(1).min(len))),
        (None, Some(suffix)) if first.is_empty() => Some((len.saturating_sub(suffix), len)),
        _ => return RangeSpec::Ignore,
    };
    match parsed {
        Some((start, end)) if start < len && end > start => RangeSpec::Satisfiable(start, end),
        _ => RangeSpec::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), RangeSpec::Satisfiable(0, 10));
        assert_eq!(parse_range("bytes=4-", 10), RangeSpec::Satisfiable(4, 10));
        assert_eq!(parse_range("bytes=2-5", 10), RangeSpec::Satisfiable(2, 6));
        assert_eq!(parse_range("bytes=2-50", 10), RangeSpec::Satisfiable(2, 10));
        assert_eq!(parse_range("bytes=-3", 10), RangeSpec::Satisfiable(7, 10));
        assert_eq!(parse_range("bytes=10-", 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,4-5", 10), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 10), RangeSpec::Ignore);
    }

    /// Found by the `range` fuzz target (fuzz/seeds/range/bytes_0_u64_max): `end + 1`
    /// overflowed for a last-byte position of u64::MAX (a panic with overflow checks, and a
    /// wrong 416 without them). RFC 9110 allows any last-byte position past the end.
    #[test]
    fn a_last_byte_position_of_u64_max() {
        assert_eq!(
            parse_range("bytes=0-18446744073709551615", 10),
            RangeSpec::Satisfiable(0, 10)
        );
        assert_eq!(
            parse_range("bytes=3-18446744073709551615", 1 << 40),
            RangeSpec::Satisfiable(3, 1 << 40)
        );
    }
}
