//! The model registry API: upload (admin), list, get, deprecate, and the bundle download.
//!
//! **Download authorization** (`GET /api/v1/models/{name}/{version}/bundle`): `read` and
//! `admin` tokens may download any registered version; a `device:<id>` token only a version
//! that is that device's desired assignment (a `desired_models` row for that device, model and
//! version, which the rollout engine writes for an assignment and for a rollback's revert).
//! Everything else answers 403, including another device's assignment. Device tokens are
//! refused on every other registry route.
//!
//! Downloads support `Range: bytes=N-`, `bytes=N-M` and `bytes=-S` (206 with `Content-Range`;
//! 416 when the start is past the end); the `ETag` is the bundle's sha256, quoted.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiJson, ApiPath, ApiQuery, ErrorBody, ErrorDetail};
use super::{AdminAccess, AppError, AppState, page_limit};
use crate::auth::Scope;
use crate::ota::registry::{self, ModelEntry, RegistryError};

/// The registry's routes, with their guards.
pub fn routes(state: AppState) -> Router<AppState> {
    let fleet = Router::new()
        .route(
            "/api/v1/models",
            get(list).post(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/models/{name}", get(versions))
        .route("/api/v1/models/{name}/{version}", get(get_version))
        .route("/api/v1/models/{name}/{version}/deprecate", post(deprecate))
        .route_layer(axum::middleware::from_fn(super::fleet_wide))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::require_token,
        ));
    // Devices download their own assignments: checked in the handler.
    let download_route = Router::new()
        .route("/api/v1/models/{name}/{version}/bundle", get(download))
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            super::require_token,
        ));
    fleet.merge(download_route)
}

impl From<RegistryError> for AppError {
    fn from(e: RegistryError) -> AppError {
        match e {
            RegistryError::Bundle(_) | RegistryError::NoTrustedKeys(_) => AppError::BadRequest {
                code: "invalid_bundle",
                message: e.to_string(),
            },
            RegistryError::Duplicate { .. } => AppError::Conflict(e.to_string()),
            RegistryError::Database(e) => AppError::Internal(Box::new(e)),
            RegistryError::Store(m) | RegistryError::Misconfigured(m) => {
                AppError::Internal(m.into())
            }
        }
    }
}

/// An error response with a status `AppError` has no variant for (413, 416).
fn error_response(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message,
            },
        }),
    )
        .into_response()
}

/// Path parameters of one model.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ModelPath {
    /// Model name: 1-64 characters of `a-z 0-9 . _ -`, the first a letter or digit
    #[param(pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")]
    pub name: String,
}

/// Path parameters of one model version.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct VersionPath {
    /// Model name: 1-64 characters of `a-z 0-9 . _ -`, the first a letter or digit
    #[param(pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")]
    pub name: String,
    /// Semantic version, e.g. `1.0.0` or `1.1.0-rc.1`
    #[param(
        max_length = 128,
        pattern = r"^(0|[1-9][0-9]{0,17})\.(0|[1-9][0-9]{0,17})\.(0|[1-9][0-9]{0,17})(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
    )]
    pub version: String,
}

fn check_model(name: &str) -> Result<(), AppError> {
    ember_bundle::check_model_name(name)
        .map_err(|why| AppError::invalid(format!("model name: {why}")))
}

fn check_version(version: &str) -> Result<(), AppError> {
    ember_bundle::check_semver(version)
        .map_err(|why| AppError::invalid(format!("model version: {why}")))
}

fn check_path(p: &VersionPath) -> Result<(), AppError> {
    check_model(&p.name)?;
    check_version(&p.version)
}

async fn find(state: &AppState, p: &VersionPath) -> Result<ModelEntry, AppError> {
    registry::lookup(&state.db, &p.name, &p.version)
        .await?
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "model {} version {} is not registered (GET /api/v1/models/{} lists its versions)",
                p.name, p.version, p.name
            ))
        })
}

/// A signed bundle file in a request body: bytes (`format: binary`) of at least the bundle
/// header's size.
pub struct BundleFile;

impl utoipa::PartialSchema for BundleFile {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .min_length(Some(1))
            .description(Some(
                "A model bundle signed with a key the fleet trusts (see docs/model-bundle.md)",
            ))
            .into()
    }
}

impl ToSchema for BundleFile {}

/// Upload a model bundle
///
/// The body is the bundle file (`application/vnd.ember.bundle`; `application/octet-stream`
/// is accepted too), signed with a key among the fleet's `models.trusted_keys`. It is verified
/// (structure, manifest, signature, weights digest) and stored; a name and version are
/// registered once. No JSON Schema can describe a signed bundle, so the document names it by
/// its own media type.
#[utoipa::path(
    post,
    path = "/api/v1/models",
    tag = "models",
    request_body(content = inline(BundleFile), content_type = "application/vnd.ember.bundle",
        description = "The bundle file's bytes (`ember-models sign` writes it)"),
    responses(
        (status = 201, description = "Registered", body = ModelEntry),
        (status = 400, description = "Not a valid bundle, unsigned, untrusted key, or tampered; the message says which", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token is not an admin token", body = ErrorBody),
        (status = 409, description = "This name and version is already registered", body = ErrorBody),
        (status = 413, description = "Larger than models.max_bundle_bytes", body = ErrorBody),
    )
)]
pub async fn upload(
    State(state): State<AppState>,
    _admin: AdminAccess,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let limit = state.settings.models.max_bundle_bytes;
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the bundle is larger than this fleet accepts ({limit} bytes, models.max_bundle_bytes): raise the limit or ship a smaller model"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let count = |outcome: &str| {
        state
            .metrics
            .inc("model_uploads_total", &[("outcome", outcome)], 1)
    };
    if declared.is_some_and(|n| n > limit) {
        count("too_large");
        return Ok(too_large());
    }
    let mut bytes = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| AppError::invalid(format!("cannot read the request body: {e}")))?;
        if (bytes.len() + chunk.len()) as u64 > limit {
            count("too_large");
            return Ok(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(AppError::invalid(
            "the request body is empty: send the bundle file's bytes (Content-Type: application/octet-stream)",
        ));
    }
    let entry = match state.registry.upload(bytes).await {
        Ok(entry) => entry,
        Err(e) => {
            match &e {
                RegistryError::Bundle(_) | RegistryError::NoTrustedKeys(_) => count("invalid"),
                RegistryError::Duplicate { .. } => count("duplicate"),
                RegistryError::Database(_)
                | RegistryError::Store(_)
                | RegistryError::Misconfigured(_) => {}
            }
            return Err(e.into());
        }
    };
    count("registered");
    let location = registry::download_path(&entry.name, &entry.version);
    let mut resp = (StatusCode::CREATED, Json(entry)).into_response();
    if let Some(base) = location.strip_suffix("/bundle")
        && let Ok(v) = HeaderValue::from_str(base)
    {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// A page of model versions.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelPage {
    /// Sorted by name, then by semantic version (oldest first).
    pub items: Vec<ModelEntry>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ModelListQuery {
    /// Page size (default 100, at most `http.max_page_limit`, 1000 by default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page (`<name>/<version>`).
    #[param(pattern = "^[a-z0-9][a-z0-9._-]{0,63}/[0-9A-Za-z.+-]{1,128}$")]
    pub cursor: Option<String>,
}

fn sort_key(name: &str, version: &str) -> (String, Option<ember_bundle::Version>, String) {
    (
        name.to_string(),
        ember_bundle::Version::parse(version).ok(),
        version.to_string(),
    )
}

/// List model versions
#[utoipa::path(
    get,
    path = "/api/v1/models",
    operation_id = "list_models",
    tag = "models",
    params(ModelListQuery),
    responses(
        (status = 200, description = "A page of registered versions", body = ModelPage),
        (status = 400, description = "Invalid limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "A device token", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ModelListQuery>,
) -> Result<Json<ModelPage>, AppError> {
    let limit = page_limit(&state.settings, q.limit)? as usize;
    let all = registry::list(&state.db).await?;
    let bad_cursor = || AppError::BadRequest {
        code: "invalid_cursor",
        message:
            "the cursor is not one this API returned (`<name>/<version>`); start again without it"
                .into(),
    };
    let after = match q.cursor.as_deref() {
        Some(c) => {
            let (name, version) = c.split_once('/').ok_or_else(bad_cursor)?;
            let version_ok = (1..=128).contains(&version.len())
                && version
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'));
            if ember_bundle::check_model_name(name).is_err() || !version_ok {
                return Err(bad_cursor());
            }
            Some(sort_key(name, version))
        }
        None => None,
    };
    let mut items: Vec<ModelEntry> = all
        .into_iter()
        .filter(|e| {
            after
                .as_ref()
                .is_none_or(|a| &sort_key(&e.name, &e.version) > a)
        })
        .take(limit + 1)
        .collect();
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|e| format!("{}/{}", e.name, e.version))
    } else {
        None
    };
    Ok(Json(ModelPage { items, next_cursor }))
}

/// The versions of one model.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelVersions {
    pub name: String,
    /// Sorted by semantic version, oldest first.
    pub versions: Vec<ModelEntry>,
}

/// List one model's versions
#[utoipa::path(
    get,
    path = "/api/v1/models/{name}",
    tag = "models",
    params(ModelPath),
    responses(
        (status = 200, description = "The model's versions", body = ModelVersions),
        (status = 400, description = "Invalid model name", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "A device token", body = ErrorBody),
        (status = 404, description = "No version of this model is registered", body = ErrorBody),
    )
)]
pub async fn versions(
    State(state): State<AppState>,
    ApiPath(p): ApiPath<ModelPath>,
) -> Result<Json<ModelVersions>, AppError> {
    check_model(&p.name)?;
    let versions = registry::versions(&state.db, &p.name).await?;
    if versions.is_empty() {
        return Err(AppError::NotFound(format!(
            "no version of model {} is registered",
            p.name
        )));
    }
    Ok(Json(ModelVersions {
        name: p.name,
        versions,
    }))
}

/// One version with its manifest.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelDetail {
    #[serde(flatten)]
    pub entry: ModelEntry,
    /// Where devices download it.
    pub download: String,
    /// The bundle's manifest, exactly as signed.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
}

/// Get one model version and its manifest
#[utoipa::path(
    get,
    path = "/api/v1/models/{name}/{version}",
    tag = "models",
    params(VersionPath),
    responses(
        (status = 200, description = "The version and its manifest", body = ModelDetail),
        (status = 400, description = "Invalid model name or version", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "A device token", body = ErrorBody),
        (status = 404, description = "Not registered", body = ErrorBody),
    )
)]
pub async fn get_version(
    State(state): State<AppState>,
    ApiPath(p): ApiPath<VersionPath>,
) -> Result<Json<ModelDetail>, AppError> {
    check_path(&p)?;
    let entry = find(&state, &p).await?;
    let manifest = registry::manifest(&state.db, &p.name, &p.version)
        .await?
        .unwrap_or_default();
    let manifest = serde_json::from_str(&manifest)
        .map_err(|e| AppError::Internal(format!("stored manifest is not JSON: {e}").into()))?;
    Ok(Json(ModelDetail {
        download: registry::download_path(&entry.name, &entry.version),
        entry,
        manifest,
    }))
}

/// Body of the deprecate route.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeprecateBody {
    /// true: deprecate (no new rollouts; still downloadable); false: undo.
    pub deprecated: bool,
}

/// Deprecate or undeprecate a model version
#[utoipa::path(
    post,
    path = "/api/v1/models/{name}/{version}/deprecate",
    tag = "models",
    params(VersionPath),
    request_body = DeprecateBody,
    responses(
        (status = 200, description = "The updated version", body = ModelEntry),
        (status = 400, description = "Invalid name, version or body", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token is not an admin token", body = ErrorBody),
        (status = 404, description = "Not registered", body = ErrorBody),
    )
)]
pub async fn deprecate(
    State(state): State<AppState>,
    _admin: AdminAccess,
    ApiPath(p): ApiPath<VersionPath>,
    ApiJson(body): ApiJson<DeprecateBody>,
) -> Result<Json<ModelEntry>, AppError> {
    check_path(&p)?;
    let entry = registry::set_deprecated(&state.db, &p.name, &p.version, body.deprecated)
        .await?
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "model {} version {} is not registered",
                p.name, p.version
            ))
        })?;
    tracing::info!(model = %entry.name, version = %entry.version, deprecated = entry.deprecated,
        "Changed a model version's deprecation.");
    Ok(Json(entry))
}

/// A byte range request, resolved against the file size: `[start, end)`.
#[derive(Debug, PartialEq, Eq)]
enum RangeReq {
    Whole,
    Part(u64, u64),
    Unsatisfiable,
}

/// Parses `Range`; a header this does not understand (several ranges, other units, garbage)
/// is ignored and the whole file is served, as RFC 9110 allows.
fn parse_range(value: Option<&str>, size: u64) -> RangeReq {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return RangeReq::Whole;
    };
    if spec.contains(',') {
        return RangeReq::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeReq::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.trim().is_empty(), b.trim().is_empty()) {
        // bytes=-S: the last S bytes.
        (true, false) => match num(b) {
            Some(0) => RangeReq::Unsatisfiable,
            Some(s) => RangeReq::Part(size.saturating_sub(s), size),
            None => RangeReq::Whole,
        },
        // bytes=N-
        (false, true) => match num(a) {
            Some(n) if n < size => RangeReq::Part(n, size),
            Some(_) => RangeReq::Unsatisfiable,
            None => RangeReq::Whole,
        },
        // bytes=N-M (inclusive)
        (false, false) => match (num(a), num(b)) {
            (Some(n), Some(m)) if n <= m => {
                if n >= size {
                    RangeReq::Unsatisfiable
                } else {
                    RangeReq::Part(n, m.saturating_add(1).min(size))
                }
            }
            _ => RangeReq::Whole,
        },
        (true, true) => RangeReq::Whole,
    }
}

/// Download a model bundle
///
/// `read` and `admin` tokens may download any version; a `device:<id>` token only a version
/// assigned to that device (its desired state). Supports `Range` for resuming.
#[utoipa::path(
    get,
    path = "/api/v1/models/{name}/{version}/bundle",
    tag = "models",
    params(
        VersionPath,
        ("Range" = Option<String>, Header, description = "`bytes=N-`, `bytes=N-M` or `bytes=-S`"),
    ),
    responses(
        (status = 200, description = "The bundle file", body = String, content_type = "application/octet-stream"),
        (status = 206, description = "The requested byte range", body = String, content_type = "application/octet-stream"),
        (status = 400, description = "Invalid model name or version", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "A device token for a version not assigned to that device", body = ErrorBody),
        (status = 404, description = "Not registered", body = ErrorBody),
        (status = 416, description = "The range starts past the end", body = ErrorBody),
    )
)]
pub async fn download(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    ApiPath(p): ApiPath<VersionPath>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    check_path(&p)?;
    match extensions.get::<Scope>() {
        Some(Scope::Read | Scope::Label | Scope::Admin) => {}
        Some(Scope::Device(device)) => {
            if !registry::device_may_download(&state.db, device, &p.name, &p.version).await? {
                return Err(AppError::Forbidden(format!(
                    "device {device} is not assigned model {} version {}: a device token downloads only its own desired models",
                    p.name, p.version
                )));
            }
        }
        None => return Err(AppError::Unauthorized("no token".into())),
    }
    let entry = find(&state, &p).await?;
    let size = u64::try_from(entry.size).unwrap_or(0);
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        size,
    );
    let (status, start, end) = match range {
        RangeReq::Whole => (StatusCode::OK, 0, size),
        RangeReq::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e),
        RangeReq::Unsatisfiable => {
            let mut resp = error_response(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!(
                    "the range starts past the end of the {size}-byte bundle: the download is complete, or restart it without Range"
                ),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let bytes = state.registry.read(&entry, start, end).await?;
    state
        .metrics
        .inc("model_download_bytes_total", &[], bytes.len() as u64);
    let mut resp = (status, bytes).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", entry.sha256)) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}-{}.bundle\"",
        entry.name, entry.version
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeReq::*;
        assert_eq!(parse_range(None, 10), Whole);
        assert_eq!(parse_range(Some("bytes=4-"), 10), Part(4, 10));
        assert_eq!(parse_range(Some("bytes=0-0"), 10), Part(0, 1));
        assert_eq!(parse_range(Some("bytes=2-99"), 10), Part(2, 10));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Part(7, 10));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Part(0, 10));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=10-12"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        for junk in [
            "bytes=5-2",
            "items=1-",
            "bytes=a-",
            "bytes=1-2,4-5",
            "bytes=-",
            "x",
        ] {
            assert_eq!(parse_range(Some(junk), 10), Whole, "{junk}");
        }
    }
}
