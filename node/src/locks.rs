//! One operation per volume at a time. The CO should not overlap calls for
//! a volume, but after a restart it may; a second call gets ABORTED (the
//! spec's answer) instead of racing mounts against the first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use volumed_csi::errors::CsiError;

#[derive(Default, Clone)]
pub struct VolumeLocks {
    busy: Arc<Mutex<HashSet<String>>>,
}

pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl VolumeLocks {
    pub fn try_lock(&self, volume_id: &str) -> Result<Guard, CsiError> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(volume_id.to_string()) {
            return Err(CsiError::Aborted(format!("an operation on volume {volume_id} is already in progress; retry")));
        }
        Ok(Guard { busy: self.busy.clone(), id: volume_id.to_string() })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_aborted_until_release() {
        let l = VolumeLocks::default();
        let g = l.try_lock("v").unwrap();
        assert_eq!(l.try_lock("v").err().unwrap().code(), tonic::Code::Aborted);
        assert!(l.try_lock("w").is_ok());
        drop(g);
        assert!(l.try_lock("v").is_ok());
    }
}
