//! Sizes and durations as people type and read them. The grammar matches
//! volumed's own flags (`--capacity`, `--node-down-grace`), so a value that
//! works there works here.

use std::time::Duration;

/// Parses `1073741824`, `512Mi`, `10G`, `1Ti`, `4KiB`: decimal units are
/// powers of 1000, `i` units powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (examples: 1073741824, 512Mi, 10Gi, 100G)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "k" => 1_000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "Ti" | "TiB" => 1 << 40,
        "P" | "PB" => 1_000_000_000_000_000,
        "Pi" | "PiB" => 1 << 50,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use Ki, Mi, Gi, Ti or K, M, G, T; examples: 512Mi, 10Gi)"
            ))
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// `--size` of a volume: a size, and more than nothing.
pub fn parse_volume_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err("the size must be greater than 0 (examples: 512Mi, 10Gi)".into()),
        n => Ok(n),
    }
}

/// Parses `300`, `30s`, `5m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (examples: 30s, 5m, 1h)"))?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        other => Err(format!("unknown duration unit {other:?} in {s:?} (use ms, s, m, h)")),
    }
}

/// A duration flag that is passed on verbatim (to volumed) after checking it.
pub fn checked_duration_text(s: &str) -> Result<String, String> {
    parse_duration(s).map(|_| s.trim().to_string())
}

const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// `1 GiB`, `1.5 GiB`, `512 MiB`, `100 B`: binary units, one decimal
/// unless the value is exact.
pub fn human_size(bytes: u64) -> String {
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u64 << (10 * unit);
    // scale is a power of two.
    if bytes & (scale - 1) == 0 {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

/// Whole percent of `done` out of `total`, never above 100.
pub fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    ((done as u128 * 100 / total as u128) as u64).min(100)
}

/// `2026-03-01 12:34:56 UTC` from milliseconds since the epoch; `-` for 0.
pub fn utc_time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let secs = unix_ms / 1000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's
/// days-to-civil algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size(" 2Ti ").unwrap(), 2 << 40);
        assert_eq!(parse_size("0").unwrap(), 0);
    }

    #[test]
    fn bad_sizes_say_what_is_expected() {
        let e = parse_size("lots").unwrap_err();
        assert!(e.contains("not a size") && e.contains("10Gi"), "{e}");
        let e = parse_size("10Qi").unwrap_err();
        assert!(e.contains("unknown size unit") && e.contains("Qi"), "{e}");
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5Gi").is_err());
        assert!(parse_size("99999999999Pi").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_volume_size("0").unwrap_err().contains("greater than 0"));
        assert_eq!(parse_volume_size("1").unwrap(), 1);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("120s").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").unwrap_err().contains("unknown duration unit"));
        assert_eq!(checked_duration_text(" 30s ").unwrap(), "30s");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(512 << 20), "512 MiB");
        assert_eq!(human_size(10_000_000_000), "9.3 GiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn percentages_and_times() {
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(5, 4), 100);
        assert_eq!(percent(u64::MAX / 2, u64::MAX), 49);
        assert_eq!(utc_time(0), "-");
        assert_eq!(utc_time(1_000), "1970-01-01 00:00:01 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_767_225_599_000), "2025-12-31 23:59:59 UTC");
    }
}
