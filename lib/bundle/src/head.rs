//! The manifest fields every bundle consumer needs (name, version, kind, precision, weights),
//! and semantic versions.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::BundleError;

/// The manifest format this crate reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// The head of a bundle manifest. Unknown fields are ignored (the full manifest is
/// `ember_models::Manifest`); `input` and `output` are kept as JSON for display.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestHead {
    pub format: u32,
    /// 1-64 characters of `[a-z0-9._-]`.
    pub name: String,
    /// A semantic version.
    pub version: String,
    pub architecture: ArchitectureHead,
    /// `f32` or `int8`.
    pub precision: String,
    pub weights: WeightsHead,
    #[serde(default)]
    pub input: Option<serde_json::Value>,
    #[serde(default)]
    pub output: Option<serde_json::Value>,
    /// RFC 3339 UTC.
    #[serde(default)]
    pub created_at: Option<String>,
    /// What the model saw and said on its training data (model monitoring's reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<crate::Baseline>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchitectureHead {
    /// `activity`, `anomaly`, ...
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsHead {
    pub len: u64,
    /// SHA-256 of the weights, 64 lowercase hex digits.
    pub sha256: String,
}

fn invalid(field: &str, problem: impl Into<String>) -> BundleError {
    BundleError::Manifest {
        field: field.to_string(),
        problem: problem.into(),
    }
}

impl ManifestHead {
    /// Checks the head's own rules: format, name, semantic version, precision, digest shape.
    pub fn check(&self) -> Result<(), BundleError> {
        if self.format != MANIFEST_FORMAT {
            return Err(invalid(
                "format",
                format!(
                    "is {}; this reader understands manifest format {MANIFEST_FORMAT}: upgrade ember-models",
                    self.format
                ),
            ));
        }
        check_model_name(&self.name).map_err(|p| invalid("name", p))?;
        check_semver(&self.version).map_err(|p| invalid("version", p))?;
        if !matches!(self.precision.as_str(), "f32" | "int8") {
            return Err(invalid(
                "precision",
                format!("is {:?}; use f32 or int8", self.precision),
            ));
        }
        if self.architecture.kind.is_empty()
            || !self
                .architecture
                .kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(invalid(
                "architecture.kind",
                format!(
                    "{:?} is not a model kind such as activity or anomaly",
                    self.architecture.kind
                ),
            ));
        }
        let digest_ok = self.weights.sha256.len() == 64
            && self
                .weights
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !digest_ok {
            return Err(invalid("weights.sha256", "is not 64 lowercase hex digits"));
        }
        Ok(())
    }
}

/// Checks a model name: 1-64 characters of `[a-z0-9._-]`, the first a letter or digit (so a
/// name is never `.` or `..`: it becomes a directory name in the fleet's blob store).
pub fn check_model_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not 1-64 characters of [a-z0-9._-] starting with a letter or digit"
        ))
    }
}

/// Checks `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]` (semver 2.0.0).
pub fn check_semver(version: &str) -> Result<(), String> {
    Version::parse(version).map(|_| ())
}

/// A parsed semantic version, ordered by semver 2.0.0 precedence (build metadata ignored;
/// equal precedence is then ordered by the full text so the order is total).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    /// Pre-release identifiers (`rc.1` → `["rc", "1"]`); empty for a release.
    pub pre: Vec<String>,
    text: String,
}

impl Version {
    /// Parses `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]`; the error says what is expected.
    pub fn parse(version: &str) -> Result<Version, String> {
        let err = || format!("{version:?} is not a semantic version such as 1.0.0 or 1.1.0-rc.1");
        if version.len() > 128 {
            return Err(format!(
                "a version of {} characters is too long: use at most 128",
                version.len()
            ));
        }
        let (rest, build) = match version.split_once('+') {
            Some((r, b)) => (r, Some(b)),
            None => (version, None),
        };
        let (core, pre) = match rest.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (rest, None),
        };
        let numeric = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && (s == "0" || !s.starts_with('0'))
        };
        let numbers: Vec<&str> = core.split('.').collect();
        if numbers.len() != 3 || !numbers.iter().all(|n| numeric(n)) {
            return Err(err());
        }
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|p| {
                    !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        };
        if pre.is_some_and(|p| !ident_ok(p)) || build.is_some_and(|b| !ident_ok(b)) {
            return Err(err());
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| err());
        Ok(Version {
            major: num(numbers[0])?,
            minor: num(numbers[1])?,
            patch: num(numbers[2])?,
            pre: pre
                .map(|p| p.split('.').map(str::to_string).collect())
                .unwrap_or_default(),
            text: version.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn cmp_ident(a: &str, b: &str) -> Ordering {
    let num = |s: &str| {
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse::<u128>().ok()
        } else {
            None
        }
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    for (a, b) in self.pre.iter().zip(&other.pre) {
                        let o = cmp_ident(a, b);
                        if o != Ordering::Equal {
                            return o;
                        }
                    }
                    self.pre.len().cmp(&other.pre.len())
                }
            })
            .then_with(|| self.text.cmp(&other.text))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}
