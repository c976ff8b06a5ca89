//! CSI `CapacityRange` semantics.
//!
//! Sizes are whole allocation units (1 MiB) so every replica and every
//! filesystem sees the same aligned size. `required_bytes` is rounded up;
//! when rounding up would pass `limit_bytes` the request cannot be met and
//! is OUT_OF_RANGE, as the spec asks.

use volumed_proto::csi::v1::CapacityRange;

use crate::errors::CsiError;

pub const ALLOCATION_UNIT: u64 = 1 << 20;
/// Size given when the CO names no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Largest volume the plugin creates (64 TiB).
pub const MAX_SIZE: u64 = 64 << 40;

pub fn round_up(n: u64) -> Option<u64> {
    n.checked_add(ALLOCATION_UNIT - 1).map(|v| v / ALLOCATION_UNIT * ALLOCATION_UNIT)
}

pub fn round_down(n: u64) -> u64 {
    n / ALLOCATION_UNIT * ALLOCATION_UNIT
}

/// The fields of a range, validated: `(required, limit)`, 0 = unset.
fn fields(range: Option<&CapacityRange>) -> Result<(u64, u64), CsiError> {
    let Some(r) = range else { return Ok((0, 0)) };
    if r.required_bytes < 0 {
        return Err(CsiError::InvalidArgument(format!(
            "capacity_range.required_bytes is negative ({})",
            r.required_bytes
        )));
    }
    if r.limit_bytes < 0 {
        return Err(CsiError::InvalidArgument(format!("capacity_range.limit_bytes is negative ({})", r.limit_bytes)));
    }
    let (req, lim) = (r.required_bytes as u64, r.limit_bytes as u64);
    if req > 0 && lim > 0 && lim < req {
        return Err(CsiError::InvalidArgument(format!(
            "capacity_range.limit_bytes ({lim}) is smaller than required_bytes ({req})"
        )));
    }
    Ok((req, lim))
}

/// The size to allocate for `range`; `default` when the range says nothing
/// (CreateVolume: [`DEFAULT_SIZE`]).
pub fn resolve(range: Option<&CapacityRange>, default: u64) -> Result<u64, CsiError> {
    let (req, lim) = fields(range)?;
    let size = if req > 0 {
        let size = round_up(req.max(ALLOCATION_UNIT)).ok_or_else(|| too_large(req))?;
        if lim > 0 && size > lim {
            return Err(CsiError::OutOfRange(format!(
                "no size between required_bytes {req} and limit_bytes {lim} is a multiple \
                 of the allocation unit ({ALLOCATION_UNIT} bytes)"
            )));
        }
        size
    } else if lim > 0 {
        let size = round_down(lim).min(default);
        if size < ALLOCATION_UNIT {
            return Err(CsiError::OutOfRange(format!(
                "limit_bytes {lim} is below the smallest volume ({ALLOCATION_UNIT} bytes)"
            )));
        }
        size
    } else {
        default
    };
    if size > MAX_SIZE {
        return Err(too_large(size));
    }
    Ok(size)
}

fn too_large(n: u64) -> CsiError {
    CsiError::OutOfRange(format!("{n} bytes is larger than the largest volume ({MAX_SIZE} bytes)"))
}

/// Whether an existing size meets `range` (idempotent CreateVolume).
pub fn satisfies(size: u64, range: Option<&CapacityRange>) -> bool {
    match fields(range) {
        Ok((req, lim)) => (req == 0 || size >= req) && (lim == 0 || size <= lim),
        Err(_) => false,
    }
}

/// Converts to the CSI int64 field (sizes above i64::MAX do not occur:
/// [`MAX_SIZE`] is far below).
pub fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const MIB: u64 = 1 << 20;

    fn r(req: i64, lim: i64) -> CapacityRange {
        CapacityRange { required_bytes: req, limit_bytes: lim }
    }

    #[test]
    fn unset_gives_default() {
        assert_eq!(resolve(None, DEFAULT_SIZE).unwrap(), DEFAULT_SIZE);
        assert_eq!(resolve(Some(&r(0, 0)), DEFAULT_SIZE).unwrap(), DEFAULT_SIZE);
    }

    #[test]
    fn required_rounds_up_to_unit() {
        assert_eq!(resolve(Some(&r(1, 0)), DEFAULT_SIZE).unwrap(), MIB);
        assert_eq!(resolve(Some(&r(MIB as i64, 0)), 0).unwrap(), MIB);
        assert_eq!(resolve(Some(&r(MIB as i64 + 1, 0)), 0).unwrap(), 2 * MIB);
        assert_eq!(resolve(Some(&r(10 * MIB as i64, 10 * MIB as i64)), 0).unwrap(), 10 * MIB);
    }

    #[test]
    fn limit_only_caps_default() {
        assert_eq!(resolve(Some(&r(0, 5 * MIB as i64)), DEFAULT_SIZE).unwrap(), 5 * MIB);
        assert_eq!(resolve(Some(&r(0, 5 * MIB as i64 + 7)), DEFAULT_SIZE).unwrap(), 5 * MIB);
        assert_eq!(resolve(Some(&r(0, 4 << 30)), DEFAULT_SIZE).unwrap(), DEFAULT_SIZE);
    }

    #[test]
    fn impossible_ranges_are_out_of_range() {
        // Rounding up passes the limit.
        let e = resolve(Some(&r(MIB as i64 + 1, MIB as i64 + 2)), 0).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        // Limit below the smallest volume.
        let e = resolve(Some(&r(0, 4096)), DEFAULT_SIZE).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        // Beyond the maximum.
        let e = resolve(Some(&r(i64::MAX, 0)), 0).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        let e = resolve(Some(&r((MAX_SIZE + 1) as i64, 0)), 0).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
    }

    #[test]
    fn malformed_ranges_are_invalid_argument() {
        for range in [r(-1, 0), r(0, -1), r(10 * MIB as i64, MIB as i64)] {
            let e = resolve(Some(&range), DEFAULT_SIZE).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{range:?}: {e}");
        }
    }

    #[test]
    fn satisfies_checks_both_bounds() {
        assert!(satisfies(MIB, None));
        assert!(satisfies(2 * MIB, Some(&r(MIB as i64, 0))));
        assert!(!satisfies(MIB, Some(&r(2 * MIB as i64, 0))));
        assert!(!satisfies(3 * MIB, Some(&r(0, 2 * MIB as i64))));
        assert!(satisfies(2 * MIB, Some(&r(2 * MIB as i64, 2 * MIB as i64))));
        assert!(!satisfies(2 * MIB, Some(&r(-1, 0))));
    }
}
