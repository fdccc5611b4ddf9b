//! Retraining from the seed recorded in the committed bundles reaches what their manifests say.

use ember_models::Architecture;
use ember_models::train::{self, Progress};

use crate::{basic_motions, bundle};

#[test]
fn retraining_activity_from_the_seed_reaches_the_committed_accuracy() {
    let committed = bundle("activity-f32");
    let m = committed.manifest();
    let trained =
        train::train_activity(basic_motions(), &m.training.config, &Progress::hidden()).unwrap();
    assert_eq!(trained.metrics["test_accuracy"], m.metrics["test_accuracy"]);
    assert_eq!(trained.input.normalization, m.input.normalization);
    let (Architecture::Activity(a), Architecture::Activity(b)) =
        (&trained.architecture, &m.architecture)
    else {
        panic!("not an activity model");
    };
    assert_eq!(
        (a.hidden, a.kernel_size, a.num_classes),
        (b.hidden, b.kernel_size, b.num_classes)
    );
}

#[test]
fn retraining_anomaly_from_the_seed_reaches_the_committed_roc_auc() {
    let committed = bundle("anomaly-f32");
    let m = committed.manifest();
    let trained =
        train::train_anomaly(basic_motions(), &m.training.config, &Progress::hidden()).unwrap();
    let (auc, committed_auc) = (trained.metrics["roc_auc"], m.metrics["roc_auc"]);
    assert!(
        (auc - committed_auc).abs() <= 0.01,
        "retrained {auc}, committed {committed_auc}"
    );
}

#[test]
fn training_twice_in_one_process_gives_identical_weights() {
    let mut cfg = train::default_config(train::Kind::Activity);
    cfg.max_epochs = 3;
    let a = train::train_activity(basic_motions(), &cfg, &Progress::hidden()).unwrap();
    let b = train::train_activity(basic_motions(), &cfg, &Progress::hidden()).unwrap();
    assert_eq!(a.weights, b.weights);
    cfg.seed += 1;
    let c = train::train_activity(basic_motions(), &cfg, &Progress::hidden()).unwrap();
    assert_ne!(a.weights, c.weights, "the seed has no effect");
}
