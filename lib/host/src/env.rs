//! The `EMBER_*` environment: one registry of every variable name Ember reads that is not a
//! configuration override ([`RESERVED`]), and one overlay ([`Overlay`]) that applies
//! `<PREFIX><KEY>` and `<PREFIX><SECTION>__<KEY>` variables onto a parsed TOML file.
//!
//! The agent's prefix is `EMBER_` (`EMBER_DEVICE_ID`, `EMBER_MQTT__PORT`), the fleet's is
//! `EMBER_FLEET_` (`EMBER_FLEET_DATABASE__URL`). A variable in [`RESERVED`] is never an override,
//! whichever program reads the environment, so exporting `EMBER_FLEET_URL` for
//! `ember-fleet rollout` cannot break `ember-fleet run`, and a test's `EMBER_TEST_SEED` cannot
//! break an agent.
//!
//! Values are typed by the key, not guessed alone: a key the program lists as text
//! ([`Overlay::string_keys`]) always gets the variable's value as a string
//! (`EMBER_DEVICE_ID=1001` is the device id `"1001"`); other values are parsed as TOML scalars
//! (`8883` an integer, `true` a boolean) and fall back to strings.

use std::fmt;

/// A variable that Ember (or its tooling) reads and that is NOT a configuration override.
#[derive(Debug, Clone, Copy)]
pub struct Reserved {
    pub name: &'static str,
    /// Which program or script reads it.
    pub read_by: &'static str,
    pub meaning: &'static str,
}

/// Every `EMBER_*` name that is not an override. Add a name here before reading it anywhere.
pub const RESERVED: &[Reserved] = &[
    Reserved {
        name: "EMBER_CONFIG",
        read_by: "ember-agent",
        meaning: "the agent's config file (instead of --config)",
    },
    Reserved {
        name: "EMBER_LOG",
        read_by: "ember-agent",
        meaning: "the agent's log filter (tracing EnvFilter syntax)",
    },
    Reserved {
        name: "EMBER_AGENT_FAULT_CRASH_AFTER_SWITCH",
        read_by: "ember-agent built with the `fault-injection` feature (tests only)",
        meaning: "`<model>@<version>`: abort shortly after switching to that version",
    },
    Reserved {
        name: "EMBER_FLEET_FAULT_CRASH_BEFORE_WATERMARK",
        read_by: "ember-fleet built with the `fault-injection` feature (tests only)",
        meaning: "`N`: abort right after the N-th committed batch, before its commit watermark and its PUBACKs go out",
    },
    Reserved {
        name: "EMBER_FLEET_FAULT_LAKE_CRASH",
        read_by: "ember-fleet built with the `fault-injection` feature (tests only)",
        meaning: "`export:N`: stop the lake task after the N-th lake export wrote its files, before it is recorded; `compaction:N`: after the N-th compaction replaced its inputs' rows, before it deletes their files (the test then SIGKILLs the fleet)",
    },
    Reserved {
        name: "EMBER_MODELS_SIGNING_KEY",
        read_by: "ember-models pipeline",
        meaning: "the text of an ed25519 secret key file to sign retrained bundles with (instead of --key); set it from a CI secret, never commit a key",
    },
    Reserved {
        name: "EMBER_FLEET_CONFIG",
        read_by: "ember-fleet",
        meaning: "the fleet's config file (instead of --config)",
    },
    Reserved {
        name: "EMBER_FLEET_LOG",
        read_by: "ember-fleet",
        meaning: "the fleet's log filter (tracing EnvFilter syntax)",
    },
    Reserved {
        name: "EMBER_FLEET_TOKEN",
        read_by: "ember-fleet model|rollout, the bench",
        meaning: "the API token of the CLI commands (instead of --token-file)",
    },
    Reserved {
        name: "EMBER_FLEET_URL",
        read_by: "ember-fleet model|rollout",
        meaning: "the fleet's base URL (instead of --url)",
    },
    Reserved {
        name: "EMBER_FLEET_CA_FILE",
        read_by: "ember-fleet model|rollout",
        meaning: "the CA that signed the fleet's HTTPS certificate (instead of --ca-file)",
    },
    Reserved {
        name: "EMBER_FLEET_TEST_LOG",
        read_by: "the fleet's integration tests",
        meaning: "the in-process fleet's log filter",
    },
    Reserved {
        name: "EMBER_TEST_SEED",
        read_by: "the agent's crash test",
        meaning: "replays a randomized crash run",
    },
    Reserved {
        name: "EMBER_UPDATE_SCREENSHOTS",
        read_by: "the dashboard's browser test",
        meaning: "rewrite docs/screenshots/",
    },
    Reserved {
        name: "EMBER_UPDATE_DOCS",
        read_by: "the metric-table tests (ember_testkit::docs)",
        meaning: "rewrite the generated sections of docs/operations.md and docs/fleet.md",
    },
    Reserved {
        name: "EMBER_MQTTS_PORT",
        read_by: "scripts/secure-broker.sh",
        meaning: "the TLS listener's port",
    },
    Reserved {
        name: "EMBER_INSECURE_DEV_PORT",
        read_by: "scripts/secure-broker.sh",
        meaning: "an extra plaintext listener on 127.0.0.1 for development",
    },
    Reserved {
        name: "EMBER_ONNX_INT8_DQ",
        read_by: "bench/onnx/build_onnx.py",
        meaning: "store int8 weights with DequantizeLinear",
    },
];

/// Whether `name` is a reserved (non-override) variable.
pub fn is_reserved(name: &str) -> bool {
    RESERVED.iter().any(|r| r.name == name)
}

/// A variable that cannot be applied, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {var}: {message}")]
pub struct EnvError {
    pub var: String,
    pub message: String,
}

/// Why a program's configuration (file plus environment) is refused: the error type of both
/// binaries' `config` modules, each variant naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl From<EnvError> for ConfigError {
    fn from(e: EnvError) -> ConfigError {
        ConfigError::Env {
            var: e.var,
            message: e.message,
        }
    }
}

/// [`ConfigError::Invalid`] for `key`.
pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// How one program maps its variables onto its configuration file.
#[derive(Debug, Clone, Copy)]
pub struct Overlay<'a> {
    /// The program, for messages (`ember-agent`).
    pub program: &'a str,
    /// Where every key is documented, for messages (`agent/examples/agent.toml`).
    pub example: &'a str,
    /// `EMBER_` (agent) or `EMBER_FLEET_` (fleet).
    pub prefix: &'a str,
    /// Variables starting with these belong to another program and are skipped
    /// (the agent skips `EMBER_FLEET_`).
    pub foreign_prefixes: &'a [&'a str],
    /// Dotted keys (`device_id`, `mqtt.host`) whose values are text even when they look like
    /// numbers or booleans.
    pub string_keys: &'a [&'a str],
    /// Top-level sections only the file may set (`source` in the agent), with the reason.
    pub file_only: &'a [(&'a str, &'a str)],
}

/// What an overlay applied: which variable set which dotted key (to blame the variable, not
/// the file, when the configuration refuses the key).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub origins: Vec<(String, String)>,
}

impl Applied {
    /// The variable that introduced the key a deserializer error names as unknown
    /// (``unknown field `url` ``), if one did.
    pub fn blame(&self, error: &str) -> Option<&str> {
        self.origins.iter().find_map(|(dotted, var)| {
            let leaf = dotted.rsplit('.').next().unwrap_or(dotted);
            error
                .contains(&format!("unknown field `{leaf}`"))
                .then_some(var.as_str())
        })
    }
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vars: Vec<&str> = self.origins.iter().map(|(_, v)| v.as_str()).collect();
        write!(f, "{}", vars.join(", "))
    }
}

impl Overlay<'_> {
    /// The example forms for error messages: `EMBER_<KEY> or EMBER_<SECTION>__<KEY>`.
    fn forms(&self) -> String {
        format!(
            "use {p}<KEY> or {p}<SECTION>__<KEY> (double underscore between section and key)",
            p = self.prefix
        )
    }

    /// Reads `path` (an empty file when `None`), applies `vars` and deserializes the program's
    /// raw configuration (`deny_unknown_fields`; validation is the program's).
    pub fn load<T: serde::de::DeserializeOwned>(
        &self,
        path: Option<&std::path::Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<T, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "<defaults>".to_string()),
        };
        self.parse(&text, &name, vars)
    }

    /// [`Overlay::load`] on text already read (`name` is what errors call it). An unknown key
    /// that came from the environment is blamed on its variable.
    pub fn parse<T: serde::de::DeserializeOwned>(
        &self,
        text: &str,
        name: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<T, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        let applied = self.apply(&mut table, vars)?;
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| match applied.blame(&e.to_string()) {
                Some(var) => ConfigError::Env {
                    var: var.to_string(),
                    message: format!(
                        "{} (not a setting of {}: unset the variable; {} lists every key)",
                        e.message(),
                        self.program,
                        self.example
                    ),
                },
                None => ConfigError::Parse {
                    path: name.to_string(),
                    message: e.to_string(),
                },
            })
    }

    /// Applies every override in `vars` onto `table`. Reserved and foreign variables are
    /// skipped; a malformed name, a file-only section or a key under a non-table is an error.
    pub fn apply(
        &self,
        table: &mut toml::Table,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Applied, EnvError> {
        let mut applied = Applied::default();
        let mut vars: Vec<(String, String)> = vars.into_iter().collect();
        // Deterministic order: the same environment gives the same error.
        vars.sort();
        for (var, value) in vars {
            let Some(rest) = var.strip_prefix(self.prefix) else {
                continue;
            };
            if is_reserved(&var) || self.foreign_prefixes.iter().any(|p| var.starts_with(p)) {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            if rest.is_empty() || path.iter().any(|p| p.is_empty()) || path.len() > 2 {
                return Err(EnvError {
                    var,
                    message: self.forms(),
                });
            }
            if let Some((_, why)) = self.file_only.iter().find(|(s, _)| *s == path[0]) {
                return Err(EnvError {
                    var,
                    message: (*why).to_string(),
                });
            }
            let dotted = path.join(".");
            let parsed = if self.string_keys.contains(&dotted.as_str()) {
                toml::Value::String(value)
            } else {
                parse_scalar(&value)
            };
            let slot = if path.len() == 1 {
                &mut *table
            } else {
                let entry = table
                    .entry(path[0].clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => t,
                    _ => {
                        return Err(EnvError {
                            var,
                            message: format!("`{}` is not a table in the config file", path[0]),
                        });
                    }
                }
            };
            slot.insert(path[path.len() - 1].clone(), parsed);
            applied.origins.push((dotted, var));
        }
        Ok(applied)
    }
}

/// A TOML scalar (integer, float, boolean, datetime) or, failing that, the text itself.
pub fn parse_scalar(s: &str) -> toml::Value {
    #[derive(serde::Deserialize)]
    struct Probe {
        v: toml::Value,
    }
    match toml::from_str::<Probe>(&format!("v = {s}")) {
        Ok(Probe { v }) if !matches!(v, toml::Value::Table(_) | toml::Value::Array(_)) => v,
        _ => toml::Value::String(s.to_string()),
    }
}

/// The dotted keys of `table` whose values are strings (a program's test checks its
/// [`Overlay::string_keys`] against its resolved settings with this).
pub fn string_keys_of(table: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in table {
        match v {
            toml::Value::String(_) => out.push(k.clone()),
            toml::Value::Table(t) => {
                for (k2, v2) in t {
                    if matches!(v2, toml::Value::String(_)) {
                        out.push(format!("{k}.{k2}"));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: Overlay<'static> = Overlay {
        program: "ember-agent",
        example: "agent.toml",
        prefix: "EMBER_",
        foreign_prefixes: &["EMBER_FLEET_"],
        string_keys: &["device_id", "mqtt.host"],
        file_only: &[("source", "sources can only be configured in the file")],
    };
    const FLEET: Overlay<'static> = Overlay {
        program: "ember-fleet",
        example: "fleet.toml",
        prefix: "EMBER_FLEET_",
        foreign_prefixes: &[],
        string_keys: &["database.url"],
        file_only: &[],
    };

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn string_keys_stay_strings_and_others_are_typed() {
        let mut t = toml::Table::new();
        AGENT
            .apply(
                &mut t,
                vars(&[
                    ("EMBER_DEVICE_ID", "1001"),
                    ("EMBER_MQTT__PORT", "8883"),
                    ("EMBER_MQTT__HOST", "10.0.0.1"),
                    ("EMBER_QUEUE__FSYNC", "never"),
                    ("EMBER_OTA__ENABLED", "true"),
                ]),
            )
            .unwrap();
        assert_eq!(t["device_id"], toml::Value::String("1001".into()));
        assert_eq!(t["mqtt"]["port"], toml::Value::Integer(8883));
        assert_eq!(t["mqtt"]["host"], toml::Value::String("10.0.0.1".into()));
        assert_eq!(t["queue"]["fsync"], toml::Value::String("never".into()));
        assert_eq!(t["ota"]["enabled"], toml::Value::Boolean(true));
    }

    #[test]
    fn reserved_and_foreign_names_are_not_overrides() {
        let mut t = toml::Table::new();
        let applied = AGENT
            .apply(
                &mut t,
                vars(&[
                    ("EMBER_LOG", "debug"),
                    ("EMBER_CONFIG", "/etc/ember.toml"),
                    ("EMBER_FLEET_URL", "http://x"),
                    ("EMBER_FLEET_DATABASE__URL", "postgres://x"),
                    ("EMBER_TEST_SEED", "7"),
                    ("EMBER_AGENT_FAULT_CRASH_AFTER_SWITCH", "a@1.0.0"),
                    ("PATH", "/bin"),
                ]),
            )
            .unwrap();
        assert!(t.is_empty(), "{t:?}");
        assert!(applied.origins.is_empty());
        // The fleet skips its own reserved names (EMBER_FLEET_URL is read by `rollout`).
        let mut t = toml::Table::new();
        FLEET
            .apply(
                &mut t,
                vars(&[
                    ("EMBER_FLEET_URL", "http://x"),
                    ("EMBER_FLEET_TOKEN", "t"),
                    ("EMBER_FLEET_CA_FILE", "/ca.pem"),
                    ("EMBER_FLEET_TEST_LOG", "debug"),
                    ("EMBER_DEVICE_ID", "d"),
                ]),
            )
            .unwrap();
        assert!(t.is_empty(), "{t:?}");
    }

    #[test]
    fn malformed_names_and_file_only_sections_are_refused_with_the_fix() {
        for bad in ["EMBER_A__B__C", "EMBER_", "EMBER___X", "EMBER_MQTT__"] {
            let e = AGENT
                .apply(&mut toml::Table::new(), vars(&[(bad, "1")]))
                .unwrap_err();
            assert_eq!(e.var, bad);
            assert!(e.to_string().contains("EMBER_<SECTION>__<KEY>"), "{e}");
        }
        let e = AGENT
            .apply(
                &mut toml::Table::new(),
                vars(&[("EMBER_SOURCE__TYPE", "sim")]),
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("only be configured in the file"),
            "{e}"
        );
        let mut t: toml::Table = toml::from_str("mqtt = 3").unwrap();
        let e = AGENT
            .apply(&mut t, vars(&[("EMBER_MQTT__PORT", "1")]))
            .unwrap_err();
        assert!(e.to_string().contains("`mqtt` is not a table"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_blamed_on_its_variable() {
        let mut t = toml::Table::new();
        let applied = FLEET
            .apply(&mut t, vars(&[("EMBER_FLEET_MQTT__PROT", "1")]))
            .unwrap();
        assert_eq!(
            applied.blame("unknown field `prot`, expected one of `host`, `port`"),
            Some("EMBER_FLEET_MQTT__PROT")
        );
        assert_eq!(applied.blame("invalid type: integer"), None);
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        device_id: Option<String>,
        mqtt: Option<RawMqtt>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct RawMqtt {
        port: Option<u16>,
    }

    #[test]
    fn load_reads_overlays_and_blames() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, "device_id = \"d\"\n[mqtt]\nport = 1\n").unwrap();
        let raw: Raw = AGENT
            .load(Some(&p), vars(&[("EMBER_MQTT__PORT", "8883")]))
            .unwrap();
        assert_eq!(raw.device_id.as_deref(), Some("d"));
        assert_eq!(raw.mqtt.unwrap().port, Some(8883));
        let e = AGENT
            .load::<Raw>(Some(&p), vars(&[("EMBER_MQTT__PROT", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("environment variable EMBER_MQTT__PROT: unknown field `prot`")
                && e.contains("not a setting of ember-agent: unset the variable; agent.toml"),
            "{e}"
        );
        let e = AGENT
            .load::<Raw>(Some(&dir.path().join("missing.toml")), vars(&[]))
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        let e = AGENT
            .parse::<Raw>("colour = 1", "f.toml", vars(&[]))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file f.toml is not valid: unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn every_reserved_name_is_unique_and_prefixed() {
        for (i, r) in RESERVED.iter().enumerate() {
            assert!(r.name.starts_with("EMBER_"), "{}", r.name);
            assert!(
                RESERVED[i + 1..].iter().all(|o| o.name != r.name),
                "{} twice",
                r.name
            );
        }
    }

    #[test]
    fn string_keys_of_lists_text_values() {
        let t: toml::Table =
            toml::from_str("device_id = \"a\"\nn = 1\n[mqtt]\nhost = \"h\"\nport = 1\n").unwrap();
        assert_eq!(string_keys_of(&t), vec!["device_id", "mqtt.host"]);
    }
}
