//! The persisted A/B slot state of one model: `<data_dir>/models/<name>/state.json`, replaced
//! atomically (write a temp file, fsync, rename, fsync the directory), so a crash at any point
//! leaves either the old or the new state, never a mix.

use std::fs::File;
use std::path::{Path, PathBuf};

use ember_proto::OtaState;
use serde::{Deserialize, Serialize};

/// One of the two slots a downloaded bundle can live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn file_name(self) -> &'static str {
        match self {
            Slot::A => "slot-a.bundle",
            Slot::B => "slot-b.bundle",
        }
    }

    fn index(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
}

/// What a slot file holds (verified when it was installed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    pub version: String,
    /// sha256 of the bundle file, lowercase hex.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
}

/// A version the agent will not try again until the desired state names something else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub state: OtaState,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// When it was refused, microseconds since the epoch.
    pub ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ratio: Option<f64>,
}

/// `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    /// The slot serving; `None`: the bundle from the agent's `[[model]]` config (factory).
    pub active: Option<Slot>,
    /// What served before the last switch (the crash-loop rollback target); `None`: factory.
    pub previous: Option<Slot>,
    /// Contents of slot-a and slot-b.
    pub slots: [Option<SlotInfo>; 2],
    /// When the agent last switched to a slot, microseconds since the epoch.
    pub switched_at_us: Option<u64>,
    /// Starts since that switch that happened within the crash-loop window.
    pub starts_since_switch: u32,
    pub refused: Option<Refusal>,
}

impl ModelState {
    pub fn slot(&self, s: Slot) -> Option<&SlotInfo> {
        self.slots[s.index()].as_ref()
    }

    pub fn set_slot(&mut self, s: Slot, info: Option<SlotInfo>) {
        self.slots[s.index()] = info;
    }

    /// The slot a new download goes to: never the one serving.
    pub fn inactive(&self) -> Slot {
        match self.active {
            Some(s) => s.other(),
            None => Slot::A,
        }
    }

    /// The slot holding `version` (with `sha256`, when given), if any.
    pub fn holding(&self, version: &str, sha256: Option<&str>) -> Option<Slot> {
        [Slot::A, Slot::B].into_iter().find(|s| {
            self.slot(*s)
                .is_some_and(|i| i.version == version && sha256.is_none_or(|h| h == i.sha256))
        })
    }

    /// The version serving from a slot, if a slot serves.
    pub fn active_info(&self) -> Option<&SlotInfo> {
        self.active.and_then(|s| self.slot(s))
    }
}

/// Where one model's OTA files live: `<data_dir>/models/<name>/`.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
}

impl ModelDir {
    pub fn new(data_dir: &Path, name: &str) -> ModelDir {
        ModelDir {
            dir: data_dir.join("models").join(name),
        }
    }

    pub fn slot_path(&self, s: Slot) -> PathBuf {
        self.dir.join(s.file_name())
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The persisted state; a missing file is the factory state. An unreadable one is logged
    /// and treated as the factory state too (the slots are verified again before use anyway).
    pub fn load(&self) -> ModelState {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e,
                        "The OTA slot state is unreadable; serving the configured bundle.");
                    ModelState::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModelState::default(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e,
                    "Cannot read the OTA slot state; serving the configured bundle.");
                ModelState::default()
            }
        }
    }

    /// Replaces `state.json` atomically and durably.
    pub fn save(&self, state: &ModelState) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        ember_host::fs::replace(&self.state_path(), &bytes)
    }

    /// Moves a verified file into slot `s` (fsync of the file, rename, fsync of the directory).
    pub fn install(&self, from: &Path, s: Slot) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let to = self.slot_path(s);
        ember_host::fs::rename(from, &to)?;
        if let Some(parent) = from.parent() {
            sync_dir(parent)?;
        }
        Ok(to)
    }
}

pub use ember_host::fs::sync_dir;

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

/// What the crash-loop check decided at a start.
#[derive(Debug, Clone, PartialEq)]
pub enum StartCheck {
    /// Nothing to do (factory, or the switch is older than the window).
    Settled,
    /// A start inside the window, below the limit: counted.
    Counted(u32),
    /// The limit was reached: the state now serves the previous slot (or factory).
    RolledBack { version: String, reason: String },
}

/// Counts this start against the crash-loop limit and rolls back when it is reached.
pub fn check_start(
    state: &mut ModelState,
    name: &str,
    now_us: u64,
    limit: u32,
    window_s: u64,
) -> StartCheck {
    let (Some(info), Some(at)) = (state.active_info().cloned(), state.switched_at_us) else {
        state.starts_since_switch = 0;
        return StartCheck::Settled;
    };
    if now_us.saturating_sub(at) >= window_s * 1_000_000 {
        state.starts_since_switch = 0;
        return StartCheck::Settled;
    }
    state.starts_since_switch += 1;
    if state.starts_since_switch < limit {
        return StartCheck::Counted(state.starts_since_switch);
    }
    let reason = format!(
        "restarted {} times within {window_s} s of switching to {name} {}",
        state.starts_since_switch, info.version
    );
    state.refused = Some(Refusal {
        version: info.version.clone(),
        sha256: Some(info.sha256.clone()),
        state: OtaState::RolledBack,
        reason: reason.clone(),
        rollout: info.rollout.clone(),
        ts: now_us,
        agreement: None,
        latency_ratio: None,
    });
    state.active = state.previous.take();
    state.switched_at_us = None;
    state.starts_since_switch = 0;
    StartCheck::RolledBack {
        version: info.version,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switched(now: u64) -> ModelState {
        let mut s = ModelState::default();
        s.set_slot(
            Slot::A,
            Some(SlotInfo {
                version: "1.1.0".into(),
                sha256: "ab".repeat(32),
                rollout: Some("r-1".into()),
            }),
        );
        s.active = Some(Slot::A);
        s.previous = None;
        s.switched_at_us = Some(now);
        s
    }

    #[test]
    fn the_nth_start_within_the_window_rolls_back_to_the_previous_model() {
        let t0 = 1_000_000_000;
        let mut s = switched(t0);
        assert_eq!(
            check_start(&mut s, "activity", t0 + 1_000_000, 3, 300),
            StartCheck::Counted(1)
        );
        assert_eq!(
            check_start(&mut s, "activity", t0 + 2_000_000, 3, 300),
            StartCheck::Counted(2)
        );
        let StartCheck::RolledBack { version, reason } =
            check_start(&mut s, "activity", t0 + 3_000_000, 3, 300)
        else {
            panic!("the third start rolls back");
        };
        assert_eq!(version, "1.1.0");
        assert_eq!(
            reason,
            "restarted 3 times within 300 s of switching to activity 1.1.0"
        );
        assert_eq!(s.active, None, "back to the factory bundle");
        let r = s.refused.as_ref().expect("refusal kept");
        assert_eq!(
            (r.state, r.rollout.as_deref()),
            (OtaState::RolledBack, Some("r-1"))
        );
        assert_eq!(
            check_start(&mut s, "activity", t0 + 4_000_000, 3, 300),
            StartCheck::Settled
        );
    }

    #[test]
    fn starts_after_the_window_reset_the_count() {
        let t0 = 1_000_000_000;
        let mut s = switched(t0);
        check_start(&mut s, "activity", t0 + 1_000_000, 3, 300);
        assert_eq!(
            check_start(&mut s, "activity", t0 + 301_000_000, 3, 300),
            StartCheck::Settled
        );
        assert_eq!(s.starts_since_switch, 0);
        assert_eq!(s.active, Some(Slot::A));
    }

    #[test]
    fn state_round_trips_atomically() {
        let dir = std::env::temp_dir().join(format!("ember-ota-slots-{}", fastrand::u64(..)));
        let md = ModelDir::new(&dir, "activity");
        assert_eq!(md.load(), ModelState::default());
        let s = switched(5);
        md.save(&s).expect("save");
        assert_eq!(md.load(), s);
        assert_eq!(s.inactive(), Slot::B);
        assert_eq!(s.holding("1.1.0", None), Some(Slot::A));
        assert_eq!(s.holding("1.1.0", Some(&"cd".repeat(32))), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
