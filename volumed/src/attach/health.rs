//! What state a local attachment is in, and why. One pure function turns
//! the facts (connection state, fencing, stuck I/O, breakage) into the
//! state string and reason the node-local API, CSI VolumeCondition and the
//! heartbeat report show.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A request older than this means the volume cannot be reached, even if
/// the connection looks fine (for example a leaderless group behind a
/// forwarding node).
pub const STUCK_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Serving I/O.
    Attached,
    /// The connection to the volume's leader is being re-established (or
    /// being restored after a volumed restart); I/O waits.
    Reconnecting,
    /// The device cannot serve I/O and will not recover by itself.
    Broken,
    /// The attachment was moved to another node: every request fails.
    Fenced,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Attached => "attached",
            State::Reconnecting => "reconnecting",
            State::Broken => "broken",
            State::Fenced => "fenced",
        }
    }
}

/// The facts health is judged from.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Set when the device is broken, with the reason.
    pub broken: Option<String>,
    /// Set when the attachment is fenced, with the reason.
    pub fenced: Option<String>,
    /// Being re-created after a restart: the last attempt's outcome.
    pub restoring: Option<String>,
    /// The NBD client lost its connection this long ago, with the error.
    pub disconnected: Option<(Duration, String)>,
    /// The oldest unanswered request has waited this long.
    pub oldest_request: Option<Duration>,
    /// The volume's leader as last seen: `None` when no replica claims it.
    pub leader_known: bool,
}

/// State, healthy, reason.
pub fn judge(f: &Facts) -> (State, bool, String) {
    if let Some(r) = &f.broken {
        return (State::Broken, false, r.clone());
    }
    if let Some(r) = &f.fenced {
        return (State::Fenced, false, r.clone());
    }
    if let Some(r) = &f.restoring {
        return (State::Reconnecting, false, format!("re-creating the device after a volumed restart: {r}"));
    }
    if let Some((since, err)) = &f.disconnected {
        let leader = if f.leader_known { "" } else { "; no replica currently leads the volume" };
        return (
            State::Reconnecting,
            false,
            format!(
                "connection to the volume's leader lost {:.1}s ago ({err}){leader}; I/O is paused",
                since.as_secs_f64()
            ),
        );
    }
    if let Some(age) = f.oldest_request.filter(|a| *a >= STUCK_AFTER) {
        let leader = if f.leader_known { "" } else { " (no replica currently leads the volume)" };
        return (
            State::Reconnecting,
            false,
            format!("a request has waited {:.1}s for the volume's leader{leader}", age.as_secs_f64()),
        );
    }
    (State::Attached, true, String::new())
}

/// A local attachment as the node reports it to the catalog leader with
/// its heartbeat (shown in `GetVolume.attachments[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentReport {
    pub volume: Uuid,
    pub generation: u64,
    pub device: String,
    pub frontend: String,
    pub state: String,
    pub healthy: bool,
    pub reason: String,
}

impl AttachmentReport {
    /// The `Attachment.state` text of the admin API.
    pub fn state_line(&self) -> String {
        if self.reason.is_empty() {
            self.state.clone()
        } else {
            format!("{}: {}", self.state, self.reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_when_nothing_is_wrong() {
        let (s, ok, why) =
            judge(&Facts { leader_known: true, oldest_request: Some(Duration::from_millis(30)), ..Default::default() });
        assert_eq!((s, ok, why.as_str()), (State::Attached, true, ""));
    }

    #[test]
    fn precedence_broken_fenced_restoring_disconnected_stuck() {
        let all = Facts {
            broken: Some("b".into()),
            fenced: Some("f".into()),
            restoring: Some("r".into()),
            disconnected: Some((Duration::from_secs(2), "refused".into())),
            oldest_request: Some(Duration::from_secs(9)),
            leader_known: false,
        };
        assert_eq!(judge(&all).0, State::Broken);
        let f = Facts { broken: None, ..all.clone() };
        assert_eq!(judge(&f), (State::Fenced, false, "f".into()));
        let f = Facts { fenced: None, ..f };
        assert_eq!(judge(&f).0, State::Reconnecting);
        assert!(judge(&f).2.contains("volumed restart"));
        let f = Facts { restoring: None, ..f };
        let (s, ok, why) = judge(&f);
        assert_eq!((s, ok), (State::Reconnecting, false));
        assert!(why.contains("refused") && why.contains("no replica currently leads"), "{why}");
        let f = Facts { disconnected: None, ..f };
        let (s, ok, why) = judge(&f);
        assert_eq!((s, ok), (State::Reconnecting, false));
        assert!(why.contains("9.0s"), "{why}");
    }

    #[test]
    fn report_state_line() {
        let mut r = AttachmentReport {
            volume: Uuid::nil(),
            generation: 1,
            device: "/dev/loop1".into(),
            frontend: "fuse-loop".into(),
            state: "attached".into(),
            healthy: true,
            reason: String::new(),
        };
        assert_eq!(r.state_line(), "attached");
        r.state = "fenced".into();
        r.reason = "moved".into();
        assert_eq!(r.state_line(), "fenced: moved");
    }
}
