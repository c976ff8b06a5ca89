//! The caller's deadline (gRPC's `grpc-timeout` header).
//!
//! A call that may wait long (a restore still copying) answers before the
//! CO gives up on it: a reply that arrives after the CO's deadline is lost,
//! and the CO learns nothing about the progress. The external-provisioner
//! sends 10 s by default and retries with back-off.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// What the caller allows this call, when it said (`None` without a
/// deadline or with a malformed header).
pub fn remaining(meta: &MetadataMap) -> Option<Duration> {
    let raw = meta.get("grpc-timeout")?.to_str().ok()?;
    parse(raw)
}

/// `grpc-timeout` value: at most 8 digits and a unit (H M S m u n).
fn parse(raw: &str) -> Option<Duration> {
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a handler may wait before it must answer: the caller's deadline
/// less `margin` (time to send the answer), at least `floor`; `default`
/// when the caller set no deadline.
pub fn budget(meta: &MetadataMap, default: Duration, margin: Duration, floor: Duration) -> Duration {
    match remaining(meta) {
        Some(d) => d.saturating_sub(margin).max(floor),
        None => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        m
    }

    #[test]
    fn units() {
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("9999m"), Some(Duration::from_millis(9999)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "10", "10s", "-1S", "1.5S", "123456789S", "9x"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn budget_keeps_a_margin_and_a_floor() {
        let (def, margin, floor) = (Duration::from_secs(60), Duration::from_secs(1), Duration::from_millis(500));
        assert_eq!(budget(&MetadataMap::new(), def, margin, floor), def);
        assert_eq!(budget(&meta("10S"), def, margin, floor), Duration::from_secs(9));
        assert_eq!(budget(&meta("200m"), def, margin, floor), floor);
        assert_eq!(budget(&meta("garbage"), def, margin, floor), def);
    }
}
