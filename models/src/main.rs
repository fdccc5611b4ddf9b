//! `ember-models`: train, evaluate, bundle, sign, verify and inspect Ember models.

fn main() -> std::process::ExitCode {
    ember_models::cli::main()
}
