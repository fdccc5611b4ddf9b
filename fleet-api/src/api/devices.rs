//! The device registry: list (filters: online, tag, search), get, pre-register, set tags.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::{AdminAccess, AppError, AppState, DevicePath, check_name, cursor, page_limit};
use crate::db::{Sql, get_bool, now_us};

/// Most tags one device may carry.
pub const MAX_TAGS: usize = 64;
const MAX_TAG_VALUE: usize = 256;

/// The agent's queue, from its last status.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub records: Option<i64>,
    pub bytes: Option<i64>,
    pub disk_bytes: Option<i64>,
}

/// A device as the registry knows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Device {
    pub device_id: String,
    /// From the retained status: `online` until the device says goodbye or its Last Will fires.
    pub online: bool,
    /// When the registry first knew the device (first contact or pre-registration).
    pub registered_at: i64,
    /// Whether it was registered through the API before it first spoke.
    pub preregistered: bool,
    /// First and last message received from the device (fleet clock).
    pub first_seen: Option<i64>,
    pub last_seen: Option<i64>,
    /// When `online` last changed (fleet clock).
    pub online_changed_at: Option<i64>,
    /// `ts` of the last status applied (device clock).
    pub status_ts: Option<i64>,
    pub agent_version: Option<String>,
    /// When the agent deletes queued records, from its last status: `commit` (on the fleet's
    /// commit watermark, end-to-end acknowledgement) or `puback` (on the broker's PUBACK,
    /// also agents that predate end-to-end acknowledgement); null before its first status.
    pub delivery: Option<String>,
    /// Active model name -> version.
    #[schema(value_type = Object)]
    pub models: serde_json::Value,
    pub queue: QueueView,
    /// The agent's counters since it started (`captured`, `sent`, `acked`, `evicted_*`, ...).
    #[schema(value_type = Option<Object>)]
    pub counters: Option<serde_json::Value>,
    pub uptime_s: Option<i64>,
    pub heartbeat_at: Option<i64>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DevicePage {
    pub items: Vec<Device>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceFilter {
    /// Only devices that are (true) or are not (false) online.
    pub online: Option<bool>,
    /// `key=value`: only devices with this tag; `key`: devices with the tag, any value.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}(=.*)?$")]
    pub tag: Option<String>,
    /// Case-insensitive substring of the device id.
    #[param(max_length = 64)]
    pub search: Option<String>,
    /// Page size (default 100, at most `http.max_page_limit`, 1000 by default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevice {
    /// 1-64 characters of `A-Z a-z 0-9 - _ .`
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub device_id: String,
    #[serde(default)]
    #[schema(schema_with = tags_schema)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTags {
    /// The device's complete set of tags (replaces the current one).
    #[schema(schema_with = tags_schema)]
    pub tags: BTreeMap<String, String>,
}

/// Tags: at most 64; keys like device ids; values up to 256 bytes without control characters.
fn tags_schema() -> utoipa::openapi::Object {
    use utoipa::openapi::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Tags, key -> value: at most 64; keys 1-64 characters of A-Z a-z 0-9 - _ .; values up to 256 characters without control characters",
        ))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[A-Za-z0-9._-]{1,64}$")),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(MAX_TAG_VALUE))
                .pattern(Some("^[^\\x00-\\x1f\\x7f-\\x9f]*$")),
        ))
        .max_properties(Some(MAX_TAGS))
        .build()
}

const DEVICE_COLUMNS: &str = "device_id, online, registered_at, preregistered, first_seen, last_seen, \
     online_changed_at, status_ts, agent_version, delivery, models, counters, queue_records, \
     queue_bytes, queue_disk_bytes, uptime_s, heartbeat_at";

fn device_from_row(row: &AnyRow) -> Result<Device, sqlx::Error> {
    let json = |col: &str| -> Result<Option<serde_json::Value>, sqlx::Error> {
        Ok(row
            .try_get::<Option<String>, _>(col)?
            .and_then(|s| serde_json::from_str(&s).ok()))
    };
    Ok(Device {
        device_id: row.try_get("device_id")?,
        online: get_bool(row, "online")?,
        registered_at: row.try_get("registered_at")?,
        preregistered: get_bool(row, "preregistered")?,
        first_seen: row.try_get("first_seen")?,
        last_seen: row.try_get("last_seen")?,
        online_changed_at: row.try_get("online_changed_at")?,
        status_ts: row.try_get("status_ts")?,
        agent_version: row.try_get("agent_version")?,
        delivery: row.try_get("delivery")?,
        models: json("models")?.unwrap_or_else(|| serde_json::json!({})),
        counters: json("counters")?,
        queue: QueueView {
            records: row.try_get("queue_records")?,
            bytes: row.try_get("queue_bytes")?,
            disk_bytes: row.try_get("queue_disk_bytes")?,
        },
        uptime_s: row.try_get("uptime_s")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        tags: BTreeMap::new(),
    })
}

/// Fills in the tags of `devices` with one query.
async fn load_tags(state: &AppState, devices: &mut [Device]) -> Result<(), sqlx::Error> {
    if devices.is_empty() {
        return Ok(());
    }
    let mut q = Sql::new("SELECT device_id, tag, value FROM device_tags WHERE device_id IN (");
    for (i, d) in devices.iter().enumerate() {
        if i > 0 {
            q.push(", ");
        }
        q.bind(d.device_id.as_str());
    }
    q.push(") ORDER BY device_id, tag");
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let mut by_device: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for row in rows {
        by_device
            .entry(row.try_get("device_id")?)
            .or_default()
            .insert(row.try_get("tag")?, row.try_get("value")?);
    }
    for d in devices {
        if let Some(tags) = by_device.remove(&d.device_id) {
            d.tags = tags;
        }
    }
    Ok(())
}

pub(crate) async fn fetch_device(state: &AppState, id: &str) -> Result<Device, AppError> {
    let mut q = Sql::new(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = "
    ));
    q.bind(id);
    let row = q
        .query()
        .fetch_optional(state.db.pool())
        .await?
        .ok_or_else(|| AppError::NotFound(format!("device {id:?} is not registered")))?;
    let mut d = [device_from_row(&row)?];
    load_tags(state, &mut d).await?;
    let [d] = d;
    Ok(d)
}

fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), AppError> {
    if tags.len() > MAX_TAGS {
        return Err(AppError::invalid(format!(
            "{} tags: a device may have at most {MAX_TAGS}",
            tags.len()
        )));
    }
    for (k, v) in tags {
        ember_proto::check_name(k)
            .map_err(|why| AppError::invalid(format!("tag key {k:?} is not valid: {why}")))?;
        if v.chars().count() > MAX_TAG_VALUE || v.chars().any(char::is_control) {
            return Err(AppError::invalid(format!(
                "the value of tag {k:?} must be at most {MAX_TAG_VALUE} characters without control characters"
            )));
        }
    }
    Ok(())
}

/// The LIKE pattern for a substring, with `\` escaping LIKE's wildcards.
fn like_pattern(s: &str) -> String {
    let mut out = String::from("%");
    for c in s.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// List devices
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    params(DeviceFilter),
    responses(
        (status = 200, description = "A page of devices, ordered by id", body = DevicePage),
        (status = 400, description = "Invalid filter, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
pub async fn list_devices(
    State(state): State<AppState>,
    ApiQuery(f): ApiQuery<DeviceFilter>,
) -> Result<Json<DevicePage>, AppError> {
    let limit = page_limit(&state.settings, f.limit)?;
    let mut q = Sql::new(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices d WHERE 1 = 1"
    ));
    if let Some(online) = f.online {
        q.push(" AND d.online = ").bind(online);
    }
    if let Some(tag) = f.tag.as_deref() {
        let (key, value) = match tag.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (tag, None),
        };
        ember_proto::check_name(key)
            .map_err(|why| AppError::invalid(format!("tag filter key {key:?}: {why}")))?;
        q.push(
            " AND EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = d.device_id AND t.tag = ",
        )
        .bind(key);
        if let Some(v) = value {
            q.push(" AND t.value = ").bind(v);
        }
        q.push(")");
    }
    if let Some(search) = f.search.as_deref().filter(|s| !s.is_empty()) {
        if search.chars().count() > 64 {
            return Err(AppError::invalid(
                "search is longer than a device id can be",
            ));
        }
        q.push(" AND LOWER(d.device_id) LIKE ")
            .bind(like_pattern(search))
            .push(" ESCAPE '\\'");
    }
    if let Some(c) = cursor(&f.cursor) {
        q.push(" AND d.device_id > ").bind(c);
    }
    q.push(" ORDER BY d.device_id LIMIT ").bind(limit + 1);
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let mut items = rows
        .iter()
        .map(device_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|d| d.device_id.clone())
    } else {
        None
    };
    load_tags(&state, &mut items).await?;
    Ok(Json(DevicePage { items, next_cursor }))
}

/// Get one device
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}",
    tag = "devices",
    params(DevicePath),
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 400, description = "Invalid device id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    )
)]
pub async fn get_device(
    State(state): State<AppState>,
    ApiPath(DevicePath { device_id: id }): ApiPath<DevicePath>,
) -> Result<Json<Device>, AppError> {
    check_name("device id", &id)?;
    Ok(Json(fetch_device(&state, &id).await?))
}

/// Pre-register a device
///
/// The device then appears in the registry (offline, `preregistered`) before it first
/// connects, with its tags already set.
#[utoipa::path(
    post,
    path = "/api/v1/devices",
    tag = "devices",
    request_body = RegisterDevice,
    responses(
        (status = 201, description = "Registered", body = Device),
        (status = 400, description = "Invalid device id or tags", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token lacks the admin scope", body = ErrorBody),
        (status = 409, description = "The device is already registered", body = ErrorBody),
    )
)]
pub async fn register_device(
    State(state): State<AppState>,
    _admin: AdminAccess,
    ApiJson(body): ApiJson<RegisterDevice>,
) -> Result<(StatusCode, Json<Device>), AppError> {
    check_name("device id", &body.device_id)?;
    check_tags(&body.tags)?;
    let mut tx = state.db.pool().begin().await?;
    let mut q = Sql::new("INSERT INTO devices (device_id, registered_at, preregistered) VALUES (");
    q.bind(body.device_id.as_str()).push(", ").bind(now_us());
    q.push(", ")
        .bind(true)
        .push(") ON CONFLICT (device_id) DO NOTHING");
    if q.query().execute(&mut *tx).await?.rows_affected() == 0 {
        return Err(AppError::Conflict(format!(
            "device {:?} is already registered",
            body.device_id
        )));
    }
    for (k, v) in &body.tags {
        let mut q = Sql::new("INSERT INTO device_tags (device_id, tag, value) VALUES (");
        q.bind(body.device_id.as_str()).push(", ").bind(k.as_str());
        q.push(", ").bind(v.as_str()).push(")");
        q.query().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    tracing::info!(device = %body.device_id, tags = body.tags.len(), "Pre-registered a device.");
    Ok((
        StatusCode::CREATED,
        Json(fetch_device(&state, &body.device_id).await?),
    ))
}

/// Replace a device's tags
#[utoipa::path(
    put,
    path = "/api/v1/devices/{device_id}/tags",
    tag = "devices",
    params(DevicePath),
    request_body = SetTags,
    responses(
        (status = 200, description = "The device with its new tags", body = Device),
        (status = 400, description = "Invalid device id or tags", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token lacks the admin scope", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    )
)]
pub async fn set_tags(
    State(state): State<AppState>,
    _admin: AdminAccess,
    ApiPath(DevicePath { device_id: id }): ApiPath<DevicePath>,
    ApiJson(body): ApiJson<SetTags>,
) -> Result<Json<Device>, AppError> {
    check_name("device id", &id)?;
    check_tags(&body.tags)?;
    let mut tx = state.db.pool().begin().await?;
    // A write first (SQLite takes its write lock now), which also proves the device exists.
    let mut q = Sql::new("UPDATE devices SET device_id = device_id WHERE device_id = ");
    q.bind(id.as_str());
    if q.query().execute(&mut *tx).await?.rows_affected() == 0 {
        return Err(AppError::NotFound(format!(
            "device {id:?} is not registered"
        )));
    }
    let mut q = Sql::new("DELETE FROM device_tags WHERE device_id = ");
    q.bind(id.as_str());
    q.query().execute(&mut *tx).await?;
    for (k, v) in &body.tags {
        let mut q = Sql::new("INSERT INTO device_tags (device_id, tag, value) VALUES (");
        q.bind(id.as_str()).push(", ").bind(k.as_str());
        q.push(", ").bind(v.as_str()).push(")");
        q.query().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    tracing::info!(device = %id, tags = body.tags.len(), "Set a device's tags.");
    Ok(Json(fetch_device(&state, &id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_pattern("Dev_1%"), "%dev\\_1\\%%");
    }
}
