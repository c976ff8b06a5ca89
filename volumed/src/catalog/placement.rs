//! Where replicas go. Pure: the catalog leader calls it with the catalog
//! state and the set of nodes it currently hears from, and proposes the
//! result.
//!
//! Rules, in order: distinct nodes; only live, non-removed nodes with enough
//! unprovisioned capacity that match the requisite topology; spread over
//! zones when labels allow (a hard rule when `spread_zones` is set);
//! preferred topologies first; then the most free space; then the lowest
//! node id, so equal inputs give equal answers.

use std::collections::{BTreeMap, BTreeSet};

use super::state::{CatalogState, Labels, NodeRecord, PlacementConstraints};
use crate::storage::log_store::NodeId;

/// Label keys read as a node's zone.
pub const ZONE_KEYS: [&str; 2] = ["topology.kubernetes.io/zone", "zone"];

pub fn zone_of(labels: &Labels) -> Option<&str> {
    ZONE_KEYS.iter().find_map(|k| labels.get(*k).map(String::as_str))
}

/// Whether a node's labels satisfy a topology (every pair present).
pub fn matches_topology(labels: &Labels, topology: &Labels) -> bool {
    topology.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlacementError(pub String);

pub struct PlacementRequest<'a> {
    pub size_bytes: u64,
    pub count: usize,
    pub constraints: &'a PlacementConstraints,
    /// Nodes that must not be chosen (they already hold a replica).
    pub exclude: &'a BTreeSet<NodeId>,
    /// Zones already used by the volume's other replicas (for rebuilds).
    pub used_zones: BTreeSet<String>,
}

/// Chooses `count` nodes. `live` holds the nodes that answered heartbeats
/// recently.
pub fn place(
    state: &CatalogState,
    live: &BTreeSet<NodeId>,
    req: &PlacementRequest<'_>,
) -> Result<Vec<NodeId>, PlacementError> {
    let provisioned = state.provisioned_by_node();
    let mut reasons: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut candidates: Vec<(&NodeRecord, u64)> = Vec::new();
    for n in state.nodes.values() {
        let why = if n.removed {
            Some("removed")
        } else if n.down || !live.contains(&n.id) {
            Some("not reachable")
        } else if req.exclude.contains(&n.id) {
            Some("already holds a replica")
        } else if !req.constraints.requisite.is_empty()
            && !req.constraints.requisite.iter().any(|t| matches_topology(&n.labels, t))
        {
            Some("outside the requisite topology")
        } else {
            None
        };
        if let Some(why) = why {
            *reasons.entry(why).or_default() += 1;
            continue;
        }
        let free = n.capacity_bytes.saturating_sub(provisioned.get(&n.id).copied().unwrap_or(0));
        if free < req.size_bytes {
            *reasons.entry("not enough free space").or_default() += 1;
            continue;
        }
        candidates.push((n, free));
    }
    let explain = |have: usize| {
        let mut msg = format!(
            "not enough nodes to place {} replica(s) of {} bytes: {} eligible node(s)",
            req.count, req.size_bytes, have
        );
        for (why, n) in &reasons {
            msg.push_str(&format!(", {n} {why}"));
        }
        msg
    };
    if candidates.len() < req.count {
        return Err(PlacementError(explain(candidates.len())));
    }

    let preference = |labels: &Labels| {
        req.constraints
            .preferred
            .iter()
            .position(|t| matches_topology(labels, t))
            .unwrap_or(req.constraints.preferred.len())
    };
    candidates.sort_by(|(a, fa), (b, fb)| {
        preference(&a.labels).cmp(&preference(&b.labels)).then(fb.cmp(fa)).then(a.id.cmp(&b.id))
    });

    let mut chosen: Vec<NodeId> = Vec::with_capacity(req.count);
    let mut zones = req.used_zones.clone();
    // First pass: only nodes in a zone not used yet (or without a zone
    // label: they cannot be spread, but need not be excluded either).
    for (n, _) in &candidates {
        if chosen.len() == req.count {
            break;
        }
        match zone_of(&n.labels) {
            Some(z) if zones.contains(z) => continue,
            Some(z) => {
                zones.insert(z.to_string());
            }
            None if req.constraints.spread_zones => continue,
            None => {}
        }
        chosen.push(n.id);
    }
    if chosen.len() < req.count {
        if req.constraints.spread_zones {
            return Err(PlacementError(format!(
                "zone spread needs {} replica(s) in distinct zones but only {} zone(s) have an eligible node",
                req.count,
                chosen.len()
            )));
        }
        for (n, _) in &candidates {
            if chosen.len() == req.count {
                break;
            }
            if !chosen.contains(&n.id) {
                chosen.push(n.id);
            }
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::state::{CatalogCommand, VolumeKind, VolumeSpec};

    fn state(nodes: &[(NodeId, &str, u64)]) -> CatalogState {
        let mut s = CatalogState::default();
        for (id, zone, cap) in nodes {
            let mut labels = Labels::new();
            if !zone.is_empty() {
                labels.insert("zone".into(), zone.to_string());
            }
            s.nodes.insert(
                *id,
                NodeRecord {
                    id: *id,
                    name: format!("n{id}"),
                    api_addr: String::new(),
                    nbd_addr: String::new(),
                    labels,
                    capacity_bytes: *cap,
                    max_volumes: 0,
                    removed: false,
                    down: false,
                    joined_at_ms: 0,
                },
            );
        }
        s
    }

    fn req<'a>(size: u64, count: usize, c: &'a PlacementConstraints, ex: &'a BTreeSet<NodeId>) -> PlacementRequest<'a> {
        PlacementRequest { size_bytes: size, count, constraints: c, exclude: ex, used_zones: BTreeSet::new() }
    }

    #[test]
    fn spreads_over_zones_before_filling_one() {
        let s = state(&[(1, "a", 100), (2, "a", 100), (3, "b", 10), (4, "c", 10)]);
        let live = s.nodes.keys().copied().collect();
        let c = PlacementConstraints::default();
        let ex = BTreeSet::new();
        let mut got = place(&s, &live, &req(5, 3, &c, &ex)).unwrap();
        got.sort();
        assert_eq!(got, vec![1, 3, 4]);
    }

    #[test]
    fn prefers_free_space_and_skips_full_or_dead_nodes() {
        let mut s = state(&[(1, "", 100), (2, "", 50), (3, "", 80), (4, "", 1000)]);
        s.apply(CatalogCommand::CreateVolume {
            id: uuid::Uuid::new_v4(),
            spec: VolumeSpec {
                name: "x".into(),
                size_bytes: 60,
                kind: VolumeKind::Block,
                replica_count: 1,
                parameters: Default::default(),
                constraints: Default::default(),
                source: None,
            },
            placement: vec![3],
            now_ms: 0,
        });
        let live: BTreeSet<NodeId> = [1, 2, 3].into();
        let c = PlacementConstraints::default();
        let ex = BTreeSet::new();
        assert_eq!(place(&s, &live, &req(30, 2, &c, &ex)).unwrap(), vec![1, 2]);
        let err = place(&s, &live, &req(30, 3, &c, &ex)).unwrap_err();
        assert!(err.0.contains("1 not reachable") && err.0.contains("1 not enough free space"), "{err}");
    }

    #[test]
    fn hard_zone_spread_fails_clearly() {
        let s = state(&[(1, "a", 100), (2, "a", 100), (3, "b", 100)]);
        let live = s.nodes.keys().copied().collect();
        let c = PlacementConstraints { spread_zones: true, ..Default::default() };
        let ex = BTreeSet::new();
        let err = place(&s, &live, &req(1, 3, &c, &ex)).unwrap_err();
        assert!(err.0.contains("distinct zones"), "{err}");
        // Soft spread still places all three.
        let soft = PlacementConstraints::default();
        assert_eq!(place(&s, &live, &req(1, 3, &soft, &ex)).unwrap().len(), 3);
    }

    #[test]
    fn requisite_and_preferred_topology() {
        let s = state(&[(1, "a", 100), (2, "b", 100), (3, "c", 100)]);
        let live = s.nodes.keys().copied().collect();
        let zone = |z: &str| -> Labels { [("zone".to_string(), z.to_string())].into() };
        let c = PlacementConstraints {
            requisite: vec![zone("b"), zone("c")],
            preferred: vec![zone("c")],
            ..Default::default()
        };
        let ex = BTreeSet::new();
        assert_eq!(place(&s, &live, &req(1, 2, &c, &ex)).unwrap(), vec![3, 2]);
        assert!(place(&s, &live, &req(1, 3, &c, &ex)).is_err());
    }

    #[test]
    fn rebuild_excludes_existing_replicas_and_their_zones() {
        let s = state(&[(1, "a", 100), (2, "b", 100), (3, "a", 100), (4, "c", 100)]);
        let live = s.nodes.keys().copied().collect();
        let c = PlacementConstraints::default();
        let ex: BTreeSet<NodeId> = [1, 2].into();
        let r = PlacementRequest {
            size_bytes: 1,
            count: 1,
            constraints: &c,
            exclude: &ex,
            used_zones: ["a".to_string(), "b".to_string()].into(),
        };
        assert_eq!(place(&s, &live, &r).unwrap(), vec![4]);
    }
}
