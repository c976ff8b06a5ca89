//! Topology segments from volumed node labels.
//!
//! Only zone/region-style labels are topology: a volume's data is reachable
//! over the network from every node, so accessibility is about where its
//! replicas live (zones), never about one node. A node-level key would make
//! the CO ask for all replicas on the pod's node, which 3 replicas cannot
//! satisfy.

use std::collections::{BTreeMap, HashMap};

use volumed_proto::csi::v1::Topology;
use volumed_proto::volumed::v1 as vd;

/// Label prefixes that are topology keys.
pub const TOPOLOGY_PREFIXES: &[&str] = &["topology.kubernetes.io/", "topology.volumed.dev/"];

/// The zone key `zoneSpread` spreads replicas over.
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";

pub fn is_topology_key(key: &str) -> bool {
    TOPOLOGY_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The topology segments of a node's labels.
pub fn segments(labels: &HashMap<String, String>) -> HashMap<String, String> {
    labels.iter().filter(|(k, _)| is_topology_key(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Whether a node with `labels` lies in `topology` (every segment matches).
pub fn matches(labels: &HashMap<String, String>, topology: &HashMap<String, String>) -> bool {
    topology.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Where a volume is accessible from: the distinct topology segments of the
/// nodes holding its replicas. Empty when the nodes carry no topology
/// labels, which the CO reads as "accessible from everywhere".
pub fn accessible_topology(volume: &vd::Volume, nodes: &[vd::Node]) -> Vec<Topology> {
    let mut seen: Vec<BTreeMap<String, String>> = Vec::new();
    for r in &volume.replicas {
        let Some(node) = nodes.iter().find(|n| n.node_id == r.node_id) else {
            continue;
        };
        let seg: BTreeMap<String, String> = segments(&node.labels).into_iter().collect();
        if !seg.is_empty() && !seen.contains(&seg) {
            seen.push(seg);
        }
    }
    seen.sort();
    seen.into_iter().map(|s| Topology { segments: s.into_iter().collect() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, labels: &[(&str, &str)]) -> vd::Node {
        vd::Node {
            node_id: id,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_topology_labels_count() {
        let n = node(1, &[("topology.kubernetes.io/zone", "a"), ("kubernetes.io/hostname", "h1"), ("rack", "r1")]);
        let s = segments(&n.labels);
        assert_eq!(s.len(), 1);
        assert_eq!(s["topology.kubernetes.io/zone"], "a");
        assert!(matches(&n.labels, &s));
        let other: HashMap<String, String> = [("topology.kubernetes.io/zone".to_string(), "b".to_string())].into();
        assert!(!matches(&n.labels, &other));
        assert!(matches(&n.labels, &HashMap::new()));
    }

    #[test]
    fn accessible_topology_is_the_replica_zones() {
        let nodes = vec![
            node(1, &[("topology.kubernetes.io/zone", "a")]),
            node(2, &[("topology.kubernetes.io/zone", "b")]),
            node(3, &[("topology.kubernetes.io/zone", "a")]),
            node(4, &[("topology.kubernetes.io/zone", "c")]),
        ];
        let vol = vd::Volume {
            replicas: [1, 2, 3].iter().map(|&id| vd::Replica { node_id: id, ..Default::default() }).collect(),
            ..Default::default()
        };
        let t = accessible_topology(&vol, &nodes);
        let zones: Vec<_> = t.iter().map(|t| t.segments["topology.kubernetes.io/zone"].clone()).collect();
        assert_eq!(zones, vec!["a", "b"]);
        let bare = vec![node(1, &[]), node(2, &[]), node(3, &[])];
        assert!(accessible_topology(&vol, &bare).is_empty());
    }
}
