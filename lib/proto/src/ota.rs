//! The over-the-air model contract between the fleet and the agent (`docs/ota.md`).
//!
//! * [`DesiredState`]: retained on `ember/v1/{device}/desired`, written only by the fleet
//!   identity (the broker ACL lets a device read its own `desired` topic and nothing else of
//!   the fleet's). Retained, so a device that was offline catches up when it reconnects.
//! * [`OtaReport`]: the agent's view of each model it was told to install, carried in its
//!   retained [`crate::Status`] (`status.ota`), republished on every state change.
//!
//! **Invariant:** a desired entry names a version; the agent installs it only after checking
//! the bundle file's sha256 against [`DesiredModel::sha256`], the bundle's ed25519 signature
//! against its own trusted keys and the bundle's golden vectors. The fleet is trusted to say
//! *which* version, never to vouch for the bytes.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::{ProtoError, SCHEMA_VERSION, check_name};

/// Largest number of models one desired state may name.
pub const MAX_DESIRED_MODELS: usize = 16;

/// What the fleet wants a device to run. Retained, QoS1, on `ember/v1/{device}/desired`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub v: u32,
    pub device: String,
    /// The models the fleet manages on this device. A model the agent runs that is not named
    /// here is left as it is (the agent's configured bundle).
    #[serde(default)]
    pub models: Vec<DesiredModel>,
}

/// One model the device should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredModel {
    /// The bundle manifest's `name` (also the `[[model]]` name in the agent's config).
    pub name: String,
    /// The version to run. `None`: go back to the bundle from the agent's own config.
    pub version: Option<String>,
    /// Lowercase hex sha256 of the whole bundle file. Present whenever the agent may have to
    /// download (absent only when the version is one the device already holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Size of the bundle file in bytes: the download is refused beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Where to download it: a path on the fleet's HTTP API (`/api/v1/models/...`) or an
    /// absolute `https://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The rollout that asked for it (echoed back in reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// How to judge the new model against the running one before switching. `None`: no
    /// shadow evaluation (switch once the golden vectors pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowPolicy>,
}

/// Shadow-evaluation thresholds, set per rollout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShadowPolicy {
    /// Live windows to run both models on (at least 1).
    pub windows: u32,
    /// Least fraction of windows on which both models must agree (same class; same anomaly
    /// verdict), in [0, 1].
    pub min_agreement: f64,
    /// Largest accepted ratio of the new model's mean latency to the running one's (> 0).
    pub max_latency_ratio: f64,
}

/// Where one OTA install stands on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtaState {
    Downloading,
    /// sha256, signature and golden vectors passed; the bundle sits in the inactive slot.
    Verified,
    Shadowing,
    /// Serving (the version is the device's active one).
    Active,
    /// Refused or failed; `reason` says why. The device keeps its previous model.
    Failed,
    /// Crash-loop protection put the previous model back; `reason` says why.
    RolledBack,
}

impl OtaState {
    pub fn as_str(self) -> &'static str {
        match self {
            OtaState::Downloading => "downloading",
            OtaState::Verified => "verified",
            OtaState::Shadowing => "shadowing",
            OtaState::Active => "active",
            OtaState::Failed => "failed",
            OtaState::RolledBack => "rolled_back",
        }
    }

    /// Whether nothing more will happen for this version without a new desired state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OtaState::Active | OtaState::Failed | OtaState::RolledBack
        )
    }
}

/// The agent's report on one desired model, in `status.ota`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtaReport {
    pub model: String,
    /// The version this report is about (the desired one).
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    pub state: OtaState,
    /// Why it failed or was rolled back, as a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the state was entered, microseconds since the epoch.
    pub ts: u64,
    /// Shadow results, once known: agreement rate and latency ratio (new / running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ratio: Option<f64>,
}

fn bad(detail: String) -> ProtoError {
    ProtoError::Malformed {
        encoding: "desired state",
        detail,
    }
}

impl DesiredState {
    pub fn new(device: &str) -> Self {
        DesiredState {
            v: SCHEMA_VERSION,
            device: device.into(),
            models: Vec::new(),
        }
    }

    /// Checks names, versions, digests and thresholds, naming the first problem.
    pub fn validate(&self) -> Result<(), ProtoError> {
        check_name(&self.device).map_err(|why| ProtoError::InvalidDeviceId {
            id: self.device.clone(),
            why,
        })?;
        if self.models.len() > MAX_DESIRED_MODELS {
            return Err(bad(alloc::format!(
                "desired state names {} models; at most {MAX_DESIRED_MODELS}",
                self.models.len()
            )));
        }
        for (i, m) in self.models.iter().enumerate() {
            let at = |what: &str| bad(alloc::format!("models[{i}] ({}): {what}", m.name));
            check_name(&m.name).map_err(&at)?;
            if self.models[..i].iter().any(|o| o.name == m.name) {
                return Err(at("named twice"));
            }
            if let Some(v) = &m.version
                && (v.is_empty() || v.len() > 64 || v.chars().any(|c| c.is_control()))
            {
                return Err(at("version must be 1-64 printable characters"));
            }
            if let Some(s) = &m.sha256
                && (s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            {
                return Err(at("sha256 must be 64 lowercase hex digits"));
            }
            if m.url.is_some() && (m.sha256.is_none() || m.size.is_none()) {
                return Err(at("a url needs sha256 and size too"));
            }
            if let Some(p) = &m.shadow {
                if p.windows == 0 {
                    return Err(at("shadow.windows must be at least 1"));
                }
                if !(0.0..=1.0).contains(&p.min_agreement) {
                    return Err(at("shadow.min_agreement must be in [0, 1]"));
                }
                if !(p.max_latency_ratio.is_finite() && p.max_latency_ratio > 0.0) {
                    return Err(at("shadow.max_latency_ratio must be a positive number"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> DesiredModel {
        DesiredModel {
            name: "activity".into(),
            version: Some("2.0.0".into()),
            sha256: Some("ab".repeat(32)),
            size: Some(29_711),
            url: Some("/api/v1/models/activity/2.0.0/bundle".into()),
            rollout: Some("r-1".into()),
            shadow: Some(ShadowPolicy {
                windows: 20,
                min_agreement: 0.9,
                max_latency_ratio: 3.0,
            }),
        }
    }

    #[test]
    fn a_complete_desired_state_validates() {
        let mut d = DesiredState::new("dev-1");
        d.models.push(model());
        assert_eq!(d.validate(), Ok(()));
    }

    #[test]
    fn bad_entries_are_named() {
        type Edit = fn(&mut DesiredModel);
        let cases: [(Edit, &str); 5] = [
            (|m| m.sha256 = Some("XYZ".into()), "sha256"),
            (|m| m.sha256 = None, "a url needs"),
            (|m| m.version = Some(String::new()), "version"),
            (
                |m| {
                    if let Some(s) = m.shadow.as_mut() {
                        s.windows = 0
                    }
                },
                "shadow.windows",
            ),
            (|m| m.name = "a/b".into(), "models[0]"),
        ];
        for (break_it, expect) in cases {
            let mut d = DesiredState::new("dev-1");
            let mut m = model();
            break_it(&mut m);
            d.models.push(m);
            let err = d.validate().expect_err(expect).to_string();
            assert!(err.contains(expect), "{err} should mention {expect}");
        }
    }

    #[test]
    fn duplicate_models_are_refused() {
        let mut d = DesiredState::new("dev-1");
        d.models.push(model());
        d.models.push(model());
        let err = d.validate().expect_err("duplicate").to_string();
        assert!(err.contains("named twice"), "{err}");
    }
}
