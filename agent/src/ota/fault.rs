//! The test-only fault hook (see "Fault injection" in the `ota` module docs).
//!
//! Only the `fault-injection` feature compiles the hook: reading
//! `config::FAULT_CRASH_AFTER_SWITCH_ENV` and the `abort`. Release builds do not enable it,
//! so there [`FaultHook`] is an empty type whose `arm` does nothing, and the variable is
//! ignored (its name stays reserved in `config`, so setting it never makes the config
//! invalid).

#[cfg(feature = "fault-injection")]
pub use armed::FaultHook;
#[cfg(not(feature = "fault-injection"))]
pub use disarmed::FaultHook;

#[cfg(feature = "fault-injection")]
mod armed {
    use std::time::Duration;

    use crate::config::FAULT_CRASH_AFTER_SWITCH_ENV;

    const FAULT_DELAY: Duration = Duration::from_millis(1500);

    /// The hook's target, `<model>@<version>`, if the environment sets one.
    #[derive(Debug, Clone, Default)]
    pub struct FaultHook(Option<String>);

    impl FaultHook {
        /// Reads the target from the process environment (never from the config file).
        pub fn from_env() -> FaultHook {
            FaultHook(
                std::env::var(FAULT_CRASH_AFTER_SWITCH_ENV)
                    .ok()
                    .filter(|v| !v.is_empty()),
            )
        }

        /// Aborts the process shortly if `model@version` is the hook's target.
        pub fn arm(&self, model: &str, version: &str) {
            if self.0.as_deref() != Some(format!("{model}@{version}").as_str()) {
                return;
            }
            tracing::warn!(%model, %version,
                "Fault hook {FAULT_CRASH_AFTER_SWITCH_ENV}: aborting shortly (test only).");
            let _ = std::thread::Builder::new()
                .name("fault-hook".into())
                .spawn(|| {
                    std::thread::sleep(FAULT_DELAY);
                    std::process::abort();
                });
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
mod disarmed {
    /// Built without `fault-injection`: no hook.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct FaultHook;

    impl FaultHook {
        pub fn from_env() -> FaultHook {
            FaultHook
        }

        pub fn arm(&self, _model: &str, _version: &str) {}
    }
}
