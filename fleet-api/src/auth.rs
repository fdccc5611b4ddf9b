//! API tokens: random 32-byte secrets shown once, stored as SHA-256 hashes.
//!
//! A token is `ef_` followed by 64 hex digits (32 bytes from the OS's CSPRNG). Only its SHA-256
//! is stored (`api_tokens.token_hash`): a slow password hash buys nothing for 256 random bits,
//! and a lookup by hash leaks nothing about the token through timing. Scopes: `read` (every
//! GET) and `admin` (also the write routes). `ember-fleet token create --scope read|admin`
//! prints a new token once; `EMBER_FLEET_BOOTSTRAP_TOKEN` (config `bootstrap_token`) is stored
//! as an admin token at start if it is not stored yet, so a fresh deployment can be
//! administered without the CLI. **Invariant:** a revoked token is never valid again; no
//! start, restart or replica un-revokes it ([`store_bootstrap`]).

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::{Db, Sql, now_us};
use crate::error::FleetError;

const TOKEN_PREFIX: &str = "ef_";

/// What a token may do.
///
/// * `read`: every GET route.
/// * `admin`: every route.
/// * `device:<id>`: only the GET routes of that one device's own resources (the routes behind
///   [`crate::api::DeviceAccess`]); every fleet-wide route answers 403. Meant for a device or
///   a per-device integration (e.g. model downloads by the agent).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    /// `read`, and labelling captured windows (`PUT`/`POST /api/v1/captures/...`): a labelling
    /// team's or tool's token, without the admin scope.
    Label,
    Admin,
    Device(String),
}

/// Prefix of a device scope: `device:<device id>`.
pub const DEVICE_SCOPE_PREFIX: &str = "device:";

impl Scope {
    /// The stored and displayed form: `read`, `admin` or `device:<id>`.
    pub fn name(&self) -> String {
        match self {
            Scope::Read => "read".into(),
            Scope::Label => "label".into(),
            Scope::Admin => "admin".into(),
            Scope::Device(id) => format!("{DEVICE_SCOPE_PREFIX}{id}"),
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "label" => Some(Scope::Label),
            "admin" => Some(Scope::Admin),
            other => {
                let id = other.strip_prefix(DEVICE_SCOPE_PREFIX)?;
                ember_proto::check_name(id).ok()?;
                Some(Scope::Device(id.to_string()))
            }
        }
    }

    /// Whether this scope may read the resources of `device_id`.
    pub fn may_read_device(&self, device_id: &str) -> bool {
        match self {
            Scope::Read | Scope::Label | Scope::Admin => true,
            Scope::Device(own) => own == device_id,
        }
    }
}

/// A fresh random token (not stored).
pub fn generate() -> Result<String, FleetError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| FleetError::Random(e.to_string()))?;
    let mut out = String::with_capacity(TOKEN_PREFIX.len() + 64);
    out.push_str(TOKEN_PREFIX);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    Ok(out)
}

/// The stored form: lowercase hex SHA-256 of the token's bytes.
pub fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A stored token, without its secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenInfo {
    pub id: i64,
    pub name: String,
    pub scope: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// Stores `token` (hashed) with `scope`; storing the same token again only updates its scope
/// and name, and never brings a revoked token back. Returns its id.
pub async fn store(db: &Db, token: &str, scope: &Scope, name: &str) -> Result<i64, sqlx::Error> {
    let mut q = Sql::new("INSERT INTO api_tokens (token_hash, scope, name, created_at) VALUES (");
    q.bind(hash(token)).push(", ").bind(scope.name()).push(", ");
    q.bind(name).push(", ").bind(now_us()).push(")");
    q.push(
        " ON CONFLICT (token_hash) DO UPDATE SET scope = excluded.scope, name = excluded.name \
         RETURNING id",
    );
    q.query().fetch_one(db.pool()).await?.try_get("id")
}

/// What [`store_bootstrap`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bootstrap {
    /// The token was not stored yet: it is now, as an admin token.
    Stored,
    /// It was stored by an earlier start (or another replica) and is still valid: untouched.
    Present,
    /// It was revoked: it stays revoked, whatever the environment says.
    Revoked,
}

/// Stores the bootstrap admin token (`bootstrap_token`) only if it is absent. A token that is
/// already stored is left exactly as it is: a revoked bootstrap token MUST stay revoked across
/// restarts and replicas, even while `EMBER_FLEET_BOOTSTRAP_TOKEN` still names it.
pub async fn store_bootstrap(db: &Db, token: &str) -> Result<Bootstrap, sqlx::Error> {
    let mut q = Sql::new("INSERT INTO api_tokens (token_hash, scope, name, created_at) VALUES (");
    q.bind(hash(token))
        .push(", ")
        .bind(Scope::Admin.name())
        .push(", ");
    q.bind("bootstrap").push(", ").bind(now_us()).push(")");
    q.push(" ON CONFLICT (token_hash) DO NOTHING");
    if q.query().execute(db.pool()).await?.rows_affected() == 1 {
        return Ok(Bootstrap::Stored);
    }
    let mut q = Sql::new("SELECT revoked_at FROM api_tokens WHERE token_hash = ");
    q.bind(hash(token));
    let revoked: Option<i64> = q
        .query()
        .fetch_one(db.pool())
        .await?
        .try_get("revoked_at")?;
    Ok(if revoked.is_some() {
        Bootstrap::Revoked
    } else {
        Bootstrap::Present
    })
}

/// Creates and stores a new token; the caller shows it once.
pub async fn create(db: &Db, scope: &Scope, name: &str) -> Result<(i64, String), FleetError> {
    let token = generate()?;
    let id = store(db, &token, scope, name).await?;
    Ok((id, token))
}

/// The scope of a valid, unrevoked token.
/// Who a request's token is: its id and name (for records such as who labelled a capture).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub id: i64,
    pub name: String,
}

impl std::fmt::Display for TokenIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "token {} ({})", self.id, self.name)
    }
}

/// The scope and identity of a valid, unrevoked token.
pub async fn lookup_identity(
    db: &Db,
    token: &str,
) -> Result<Option<(Scope, TokenIdentity)>, sqlx::Error> {
    let mut q = Sql::new("SELECT id, name, scope FROM api_tokens WHERE token_hash = ");
    q.bind(hash(token)).push(" AND revoked_at IS NULL");
    let Some(row) = q.query().fetch_optional(db.pool()).await? else {
        return Ok(None);
    };
    let Some(scope) = Scope::parse(&row.try_get::<String, _>("scope")?) else {
        return Ok(None);
    };
    Ok(Some((
        scope,
        TokenIdentity {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
        },
    )))
}

pub async fn lookup(db: &Db, token: &str) -> Result<Option<Scope>, sqlx::Error> {
    let mut q = Sql::new("SELECT scope FROM api_tokens WHERE token_hash = ");
    q.bind(hash(token)).push(" AND revoked_at IS NULL");
    Ok(match q.query().fetch_optional(db.pool()).await? {
        Some(row) => Scope::parse(&row.try_get::<String, _>("scope")?),
        None => None,
    })
}

pub async fn list(db: &Db) -> Result<Vec<TokenInfo>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT id, name, scope, created_at, revoked_at FROM api_tokens ORDER BY id")
            .fetch_all(db.pool())
            .await?;
    rows.iter()
        .map(|r| {
            Ok(TokenInfo {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                scope: r.try_get("scope")?,
                created_at: r.try_get("created_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        })
        .collect()
}

/// Revokes a token by id; false if there is no such unrevoked token.
pub async fn revoke(db: &Db, id: i64) -> Result<bool, sqlx::Error> {
    let mut q = Sql::new("UPDATE api_tokens SET revoked_at = ");
    q.bind(now_us()).push(" WHERE id = ").bind(id);
    q.push(" AND revoked_at IS NULL");
    Ok(q.query().execute(db.pool()).await?.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("ef_") && a.len() == 67, "{a}");
        assert_eq!(
            Scope::parse("device:dev-1"),
            Some(Scope::Device("dev-1".into()))
        );
        assert_eq!(Scope::parse("device:a/b"), None);
        assert_eq!(Scope::parse("device:"), None);
        assert_eq!(Scope::Device("d".into()).name(), "device:d");
        assert!(Scope::Device("d".into()).may_read_device("d"));
        assert!(!Scope::Device("d".into()).may_read_device("e"));
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
