//! Per-volume I/O limits (the `qos.*` StorageClass / VolumeAttributesClass
//! parameters), enforced on the volume's leader so every path — local,
//! forwarded, any client — is limited alike.
//!
//! Each limit is a token bucket holding one second of budget. A request
//! takes its tokens up front and, when that drives the bucket into debt,
//! waits until the debt is paid: large requests are delayed in proportion
//! to their size rather than refused.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const READ_IOPS: &str = "qos.readIOPS";
pub const WRITE_IOPS: &str = "qos.writeIOPS";
pub const READ_BPS: &str = "qos.readBps";
pub const WRITE_BPS: &str = "qos.writeBps";

/// Limits per second; 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosLimits {
    pub read_iops: u64,
    pub write_iops: u64,
    pub read_bps: u64,
    pub write_bps: u64,
}

impl QosLimits {
    /// Reads the limits from volume parameters. Values were validated when
    /// they were set (CSI layer); anything unparsable counts as unlimited.
    pub fn from_parameters(p: &BTreeMap<String, String>) -> QosLimits {
        let get = |k: &str| p.get(k).and_then(|v| parse_quantity(v)).unwrap_or(0);
        QosLimits {
            read_iops: get(READ_IOPS),
            write_iops: get(WRITE_IOPS),
            read_bps: get(READ_BPS),
            write_bps: get(WRITE_BPS),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        *self == QosLimits::default()
    }
}

/// Plain integers or Kubernetes-style quantities (`100Mi`, `20M`).
fn parse_quantity(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let mult: u64 = match &s[split..] {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket { rate: rate as f64, tokens: rate as f64, last: Instant::now() }
    }

    /// Takes `n` tokens; returns how long the caller must wait.
    fn take(&mut self, n: f64) -> Duration {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[derive(Debug, Default)]
struct Buckets {
    limits: QosLimits,
    read_iops: Option<Bucket>,
    write_iops: Option<Bucket>,
    read_bps: Option<Bucket>,
    write_bps: Option<Bucket>,
}

/// The limiter of one volume.
#[derive(Debug, Default)]
pub struct Qos {
    inner: Mutex<Buckets>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

impl Qos {
    /// Applies new limits (buckets restart full; unchanged limits keep theirs).
    pub fn set(&self, limits: QosLimits) {
        let Ok(mut b) = self.inner.lock() else { return };
        if b.limits == limits {
            return;
        }
        let mk = |r: u64| (r > 0).then(|| Bucket::new(r));
        *b = Buckets {
            limits,
            read_iops: mk(limits.read_iops),
            write_iops: mk(limits.write_iops),
            read_bps: mk(limits.read_bps),
            write_bps: mk(limits.write_bps),
        };
    }

    pub fn limits(&self) -> QosLimits {
        self.inner.lock().map(|b| b.limits).unwrap_or_default()
    }

    /// How long one request of `bytes` in `dir` must wait.
    pub fn delay(&self, dir: Direction, bytes: u64) -> Duration {
        let Ok(mut b) = self.inner.lock() else { return Duration::ZERO };
        let ops = match dir {
            Direction::Read => b.read_iops.as_mut().map(|x| x.take(1.0)),
            Direction::Write => b.write_iops.as_mut().map(|x| x.take(1.0)),
        };
        let bw = match dir {
            Direction::Read => b.read_bps.as_mut().map(|x| x.take(bytes as f64)),
            Direction::Write => b.write_bps.as_mut().map(|x| x.take(bytes as f64)),
        };
        ops.unwrap_or_default().max(bw.unwrap_or_default())
    }

    /// Waits for budget (no-op when unlimited).
    pub async fn acquire(&self, dir: Direction, bytes: u64) {
        let wait = self.delay(dir, bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parameters_and_quantities() {
        let p: BTreeMap<String, String> =
            [(READ_IOPS.to_string(), "500".to_string()), (WRITE_BPS.to_string(), "20Mi".to_string())].into();
        let l = QosLimits::from_parameters(&p);
        assert_eq!(l, QosLimits { read_iops: 500, write_iops: 0, read_bps: 0, write_bps: 20 << 20 });
        assert!(QosLimits::from_parameters(&BTreeMap::new()).is_unlimited());
    }

    #[test]
    fn bucket_allows_a_second_of_burst_then_paces() {
        let q = Qos::default();
        q.set(QosLimits { write_iops: 100, ..Default::default() });
        // One second of budget passes without delay...
        for _ in 0..100 {
            assert!(q.delay(Direction::Write, 4096) < Duration::from_millis(5));
        }
        // ...then each op costs 10 ms of waiting, growing with the debt.
        let d = q.delay(Direction::Write, 4096);
        assert!(d >= Duration::from_millis(5) && d <= Duration::from_millis(20), "{d:?}");
        // Reads are not limited by a write limit.
        assert_eq!(q.delay(Direction::Read, 1 << 20), Duration::ZERO);
    }

    #[test]
    fn bandwidth_limit_delays_big_requests_in_proportion() {
        let q = Qos::default();
        q.set(QosLimits { read_bps: 1 << 20, ..Default::default() });
        assert_eq!(q.delay(Direction::Read, 1 << 20), Duration::ZERO);
        let d = q.delay(Direction::Read, 2 << 20);
        assert!(d >= Duration::from_millis(1900) && d <= Duration::from_millis(2100), "{d:?}");
    }
}
