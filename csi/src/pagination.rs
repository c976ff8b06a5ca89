//! Opaque pagination tokens for ListVolumes and ListSnapshots.
//!
//! A token names the last key returned ("after this id"), not an offset, so
//! pages stay correct when entries are added or deleted between calls (the
//! CSI sanity suite deletes the last entry of a page before asking for the
//! next). A token the plugin did not issue is ABORTED, as the spec asks.

use crate::errors::CsiError;

const PREFIX: &str = "vd1.";

pub fn encode(after: &str) -> String {
    let mut s = String::with_capacity(PREFIX.len() + after.len() * 2);
    s.push_str(PREFIX);
    for b in after.as_bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn decode(token: &str) -> Result<String, CsiError> {
    let bad = || CsiError::Aborted(format!("starting_token \"{token}\" was not issued by this plugin"));
    let hex = token.strip_prefix(PREFIX).ok_or_else(bad)?;
    if hex.is_empty() || hex.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// One page of `items` (sorted here by `key`), starting after the key in
/// `starting_token`; the returned token is empty on the last page.
pub fn paginate<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> &str,
    max_entries: i32,
    starting_token: &str,
) -> Result<(Vec<T>, String), CsiError> {
    if max_entries < 0 {
        return Err(CsiError::InvalidArgument(format!("max_entries is negative ({max_entries})")));
    }
    items.sort_by(|a, b| key(a).cmp(key(b)));
    if !starting_token.is_empty() {
        let after = decode(starting_token)?;
        items.retain(|i| key(i) > after.as_str());
    }
    let max = if max_entries == 0 { usize::MAX } else { max_entries as usize };
    if items.len() <= max {
        return Ok((items, String::new()));
    }
    items.truncate(max);
    let next = items.last().map(|i| encode(key(i))).unwrap_or_default();
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("vol-{i:03}")).collect()
    }

    #[test]
    fn token_round_trip() {
        let t = encode("0b7f6c1e-uuid");
        assert!(t.starts_with(PREFIX));
        assert_eq!(decode(&t).unwrap(), "0b7f6c1e-uuid");
    }

    #[test]
    fn foreign_tokens_abort() {
        for t in ["garbage", "vd1.", "vd1.abc", "vd1.zz", "vd2.6162", "vd1.ff"] {
            let e = decode(t).unwrap_err();
            assert_eq!(e.code(), Code::Aborted, "{t}");
        }
        let e = paginate(ids(3), |s| s.as_str(), 1, "nope").unwrap_err();
        assert_eq!(e.code(), Code::Aborted);
    }

    #[test]
    fn pages_cover_everything_once() {
        let all = ids(10);
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = paginate(all.clone(), |s| s.as_str(), 3, &token).unwrap();
            assert!(page.len() <= 3);
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, all);
    }

    #[test]
    fn zero_means_all_and_negative_is_invalid() {
        let (page, next) = paginate(ids(5), |s| s.as_str(), 0, "").unwrap();
        assert_eq!(page.len(), 5);
        assert!(next.is_empty());
        let e = paginate(ids(5), |s| s.as_str(), -1, "").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }

    #[test]
    fn deleting_the_last_entry_of_a_page_keeps_the_token_valid() {
        let mut all = ids(6);
        let (page, next) = paginate(all.clone(), |s| s.as_str(), 2, "").unwrap();
        assert_eq!(page, vec!["vol-000", "vol-001"]);
        all.retain(|s| s != "vol-001");
        let (page, _) = paginate(all.clone(), |s| s.as_str(), 2, &next).unwrap();
        assert_eq!(page, vec!["vol-002", "vol-003"]);
        // An entry added before the cursor is not repeated; one after is seen.
        all.push("vol-0005".into());
        all.push("vol-999".into());
        let (page, _) = paginate(all, |s| s.as_str(), 0, &next).unwrap();
        assert!(!page.contains(&"vol-0005".to_string()));
        assert!(page.contains(&"vol-999".to_string()));
    }
}
