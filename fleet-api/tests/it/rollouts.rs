//! The rollout store on both engines: a rollout's state, history and desired-model outbox are
//! written together and read back identically (the fleet restarts mid-rollout from this).

use std::collections::BTreeMap;

use ember_fleet::config::{Backend, DatabaseSettings};
use ember_fleet::db::Db;
use ember_fleet::ota::rollout::machine::{
    Command, DeviceState, Rollout, RolloutSpec, RolloutState,
};
use ember_fleet::ota::rollout::store::{self as rollout_store, StoreError};

use crate::on_both_backends;
use crate::support::{Kind, Store};

on_both_backends!(rollout_state_history_and_outbox_round_trip);

// Test code (called from the generated #[test]s): a panic is the failure report.
#[allow(clippy::unwrap_used)]
fn rollout_state_history_and_outbox_round_trip(kind: Kind) {
    let store = Store::new(kind);
    let settings = DatabaseSettings {
        url: store.url(),
        backend: match kind {
            Kind::Sqlite => Backend::Sqlite,
            Kind::Postgres => Backend::Postgres,
        },
        max_connections: 2,
        token_source: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = Db::open(&settings).await.unwrap();
        let targets: BTreeMap<String, Option<String>> = (0..20)
            .map(|i| (format!("dev-{i:02}"), Some("1.0.0".to_string())))
            .collect();
        let spec = RolloutSpec::canary_then_percentages("activity", "2.0.0", 0);
        let (mut r, fx) = Rollout::start(spec, targets, 10).unwrap();
        let mut stored = rollout_store::create(&db, "r-1", &r, &fx).await.unwrap();

        // Drive it to completion, saving every step as the fleet does.
        let mut now = 10;
        while r.state == RolloutState::Running {
            let assigned: Vec<String> = r
                .devices
                .iter()
                .filter(|(_, e)| e.state == DeviceState::Assigned)
                .map(|(d, _)| d.clone())
                .collect();
            for d in assigned {
                now += 1;
                let fx = r.report(&d, DeviceState::Active, now);
                stored.revision = rollout_store::save(&db, &stored, &r, &fx).await.unwrap();
                stored.rollout = r.clone();
            }
        }
        assert_eq!(r.state, RolloutState::Completed);
        let back = rollout_store::load(&db, "r-1").await.unwrap().unwrap();
        assert_eq!(back.rollout, r);
        assert_eq!(back.revision, stored.revision);
        let out = rollout_store::unpublished(&db, 1000).await.unwrap();
        assert_eq!(out.len(), 20);
        assert!(out.iter().all(|d| d.version.as_deref() == Some("2.0.0")));
        let kinds: Vec<String> = rollout_store::events(&db, "r-1")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds.iter().filter(|k| *k == "wave_succeeded").count(), 4);
        assert_eq!(kinds.last().map(String::as_str), Some("completed"));

        // A completed rollout can still be rolled back; stale writers conflict.
        let fx = r.command(Command::Rollback, now + 1).unwrap();
        rollout_store::save(&db, &back, &r, &fx).await.unwrap();
        assert!(matches!(
            rollout_store::save(&db, &back, &r, &[]).await,
            Err(StoreError::Conflict { .. })
        ));
        let out = rollout_store::desired_for(&db, "dev-07").await.unwrap();
        assert_eq!(out[0].version.as_deref(), Some("1.0.0"));
        assert_eq!(out[0].revision, 2);
        db.close().await;
    });
}
