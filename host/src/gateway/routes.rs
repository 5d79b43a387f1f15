//! The HTTP surface: KServe v2 REST endpoints, the repository extension, `/metrics`. Every
//! non-200 answer carries `{"error": "..."}`; every answer carries `x-request-id`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tracing::Instrument;

use super::kserve::{self, HEADER_LENGTH};
use super::quota::{Refused, TenantState};
use super::{Gateway, Served, Snapshot, key_hash};
use crate::plugin::{CallError, ErrorKind};
use crate::tensor::{ErrorCode, metadata_to_json};

type Gw = State<Arc<Gateway>>;

/// An error answer: status, message, and what helps the caller.
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
    kind: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind: None, retry_after: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(kind) = self.kind {
            body["kind"] = json!(kind);
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        // 0 where the refusal was held for all of its wait (`TenantState::hold_refusal`).
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The HTTP status of each way a plugin call fails (the one place that decides it).
pub(super) fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidRequest
        | ErrorKind::Plugin(ErrorCode::InvalidInput)
        | ErrorKind::Plugin(ErrorCode::Unsupported) => StatusCode::BAD_REQUEST,
        ErrorKind::Plugin(ErrorCode::NotFound) => StatusCode::NOT_FOUND,
        ErrorKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        let kind = e.kind();
        // Backtraces stay in the server log; the caller gets the first line.
        let message = e.to_string().lines().next().unwrap_or_default().to_string();
        Self { status: status_of(kind), message, kind: Some(kind.as_str()), retry_after: None }
    }
}

pub(super) fn router(gw: Arc<Gateway>, max_body: bytesize::ByteSize) -> Router {
    let limit = usize::try_from(max_body.as_u64()).unwrap_or(usize::MAX);
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(repository_load))
        .route("/v2/repository/models/{name}/unload", post(repository_unload))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(super::openai::models))
        .route("/v1/chat/completions", post(super::openai::chat))
        .route("/v1/completions", post(super::openai::completions))
        .route("/v1/embeddings", post(super::openai::embeddings))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(gw.clone(), observe))
        .layer(middleware::from_fn(request_id))
        .with_state(gw)
}

/// Records every inference request (KServe `.../infer`, OpenAI `POST /v1/...`) in the serving
/// window heartbeats report: its latency (less the time a refusal was held), and whether the
/// server failed it (5xx, except 503: at capacity).
async fn observe(State(gw): Gw, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let inference = (path.starts_with("/v2/models/") && path.ends_with("/infer"))
        || (path.starts_with("/v1/") && req.method() == axum::http::Method::POST);
    if !inference {
        return next.run(req).await;
    }
    let started = Instant::now();
    // A refusal's hold is left out of its latency: the window judges how a version serves.
    let (resp, held) = super::quota::HELD
        .scope(std::cell::Cell::new(Duration::ZERO), async {
            (next.run(req).await, super::quota::HELD.with(std::cell::Cell::get))
        })
        .await;
    let status = resp.status();
    gw.serving().record(
        started.elapsed().saturating_sub(held),
        status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE,
    );
    resp
}

/// Gives every request an id (the caller's `x-request-id`, or a new one), a tracing span,
/// and the id back on the response.
async fn request_id(req: Request, next: Next) -> Response {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!("{:x}-{:x}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
        });
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 7235).
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim_start();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn tenant(snapshot: &Snapshot, headers: &HeaderMap) -> Result<Arc<TenantState>, ApiError> {
    let key = bearer(headers)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing API key (Authorization: Bearer <key>)"))?;
    snapshot
        .by_key
        .get(&key_hash(key))
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key"))
}

fn admin(gw: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    let snapshot = gw.snapshot();
    let Some(want) = &snapshot.config.server.admin_key_sha256 else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the repository API and /metrics are off: configure server.admin_key_sha256",
        ));
    };
    match bearer(headers) {
        Some(key) if key_hash(key).eq_ignore_ascii_case(want) => Ok(()),
        _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "this endpoint needs the admin key")),
    }
}

fn not_found(name: &str) -> ApiError {
    // The same answer for "no such model" and "not yours", so names do not leak.
    ApiError::new(StatusCode::NOT_FOUND, format!("no model `{name}`"))
}

/// The caller's tenant and the plugin it names, both from one configuration snapshot.
fn served(
    snapshot: &Snapshot,
    headers: &HeaderMap,
    name: &str,
    version: Option<&str>,
) -> Result<(Arc<TenantState>, Arc<Served>), ApiError> {
    let t = tenant(snapshot, headers)?;
    let s = snapshot.resolve(&t, name, version).ok_or_else(|| not_found(name))?;
    Ok((t, s))
}

async fn live() -> axum::Json<Value> {
    axum::Json(json!({ "live": true }))
}

async fn ready(State(gw): Gw) -> Response {
    if gw.draining() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    axum::Json(json!({ "ready": true })).into_response()
}

async fn server_metadata() -> axum::Json<Value> {
    axum::Json(json!({
        "name": "eir",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository"],
    }))
}

fn metadata_json(snapshot: &Snapshot, s: &Served) -> Value {
    let mut m = metadata_to_json(&s.name, &s.metadata);
    m["versions"] = json!([s.version]);
    m["platform"] = json!("eir_wasm");
    // The models it computes on, and how the scheduler batches them.
    let registry = snapshot.runtime.registry();
    let models: serde_json::Map<String, Value> = s
        .decl
        .config
        .grants
        .nn
        .models
        .iter()
        .filter_map(|name| registry.decl(name).map(|d| (name, d)))
        .map(|(name, d)| {
            let delay = humantime::format_duration(d.batch.max_delay).to_string();
            (name.clone(), json!({ "max_batch": d.batch.max_batch, "max_delay": delay }))
        })
        .collect();
    if !models.is_empty() {
        m["models"] = Value::Object(models);
    }
    m
}

async fn model_metadata(
    State(gw): Gw,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let snapshot = gw.snapshot();
    let (_, s) = served(&snapshot, &headers, &name, None)?;
    Ok(axum::Json(metadata_json(&snapshot, &s)))
}

async fn model_metadata_v(
    State(gw): Gw,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let snapshot = gw.snapshot();
    let (_, s) = served(&snapshot, &headers, &name, Some(&version))?;
    Ok(axum::Json(metadata_json(&snapshot, &s)))
}

async fn model_ready(
    State(gw): Gw,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let (_, s) = served(&gw.snapshot(), &headers, &name, None)?;
    Ok(axum::Json(json!({ "name": s.name, "version": s.version, "ready": true })))
}

async fn model_ready_v(
    State(gw): Gw,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let (_, s) = served(&gw.snapshot(), &headers, &name, Some(&version))?;
    Ok(axum::Json(json!({ "name": s.name, "version": s.version, "ready": true })))
}

async fn infer(State(gw): Gw, headers: HeaderMap, Path(name): Path<String>, body: Body) -> Response {
    run_infer(gw, headers, name, None, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn infer_v(
    State(gw): Gw,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
    body: Body,
) -> Response {
    run_infer(gw, headers, name, Some(version), body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Bodies at least this large are decoded on a blocking thread, off the I/O threads.
const DECODE_OFF_THREAD: usize = 64 << 10;

/// Reads a request body of at most `limit` bytes within `timeout`.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: bytesize::ByteSize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large =
        || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over your limit of {limit}"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.as_u64()) {
        return Err(too_large());
    }
    let cap = usize::try_from(limit.as_u64()).unwrap_or(usize::MAX);
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, cap)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if e.to_string().contains("length limit") => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("reading the request body: {e}"))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {}", humantime::format_duration(timeout)),
        )),
    }
}

async fn run_infer(
    gw: Arc<Gateway>,
    headers: HeaderMap,
    name: String,
    version: Option<String>,
    body: Body,
) -> Result<Response, ApiError> {
    // One snapshot for the whole request: a reload in between cannot mix two configurations.
    let snapshot = gw.snapshot();
    // Authentication and the plugin's existence come first: nothing is read for a stranger.
    let (t, s) = served(&snapshot, &headers, &name, version.as_deref())?;
    let m = gw.metrics();
    let answer = |code: StatusCode| m.request(&t.name, &name, code.as_u16());
    // Admission: the tenant's rate and concurrency, then its body, then the plugin's bounded
    // queue (a slow sender holds its own tenant's slot, never the plugin's queue).
    // Every refusal at admission (a quota, a full queue) is held a while before it is answered
    // (`TenantState::hold_refusal`).
    let hold = snapshot.config.server.refusal_hold;
    let tenant_slot = match t.admit() {
        Ok(slot) => slot,
        Err(r) => {
            answer(StatusCode::TOO_MANY_REQUESTS);
            let (reason, wait) = match r {
                Refused::Rate(wait) => ("rate", wait),
                Refused::Concurrency => ("concurrency", Duration::from_secs(1)),
            };
            let retry = t.refuse(m, reason, wait, hold).await;
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("over your {reason} quota; retry later"),
                kind: Some("quota"),
                retry_after: Some(retry),
            });
        }
    };
    // Compute quota: core-seconds per minute, charged by the scheduler for every pass the
    // tenant's requests caused (abandoned ones included).
    let plugin = s.per_tenant.get(&t.name).ok_or_else(|| not_found(&name))?;
    if let Some(wait) = plugin.tenant().over_quota() {
        answer(StatusCode::TOO_MANY_REQUESTS);
        // Held without the tenant's concurrency slot: a refusal must not crowd out its own
        // tenant's other requests.
        drop(tenant_slot);
        let retry = t.refuse(m, "compute", wait, hold).await;
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "over your compute quota of {} core-seconds per minute; retry later",
                t.decl.compute_quota.unwrap_or_default()
            ),
            kind: Some("quota"),
            retry_after: Some(retry),
        });
    }
    let limit = snapshot.config.server.max_body.min(t.decl.max_body);
    let body = read_body(body, &headers, limit, snapshot.config.server.body_timeout)
        .await
        .inspect_err(|e| answer(e.status))?;
    let Ok(queued) = s.slots.clone().try_acquire_owned() else {
        answer(StatusCode::SERVICE_UNAVAILABLE);
        // Held without the tenant's slot or the body it read (another tenant may have
        // filled this plugin's queue).
        drop((tenant_slot, body));
        let retry = t.refuse(m, "queue", Duration::from_secs(1), hold).await;
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("model `{name}` is at capacity; retry later"),
            kind: Some("queue_full"),
            retry_after: Some(retry),
        });
    };
    let header_len = headers
        .get(HEADER_LENGTH)
        .map(|v| {
            v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()).ok_or("bad Inference-Header-Content-Length")
        })
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let decoded = if body.len() >= DECODE_OFF_THREAD {
        tokio::task::spawn_blocking(move || kserve::decode(&body, header_len))
            .await
            .unwrap_or_else(|e| Err(format!("decoding the request failed: {e}")))
    } else {
        kserve::decode(&body, header_len)
    };
    let decoded = decoded.map_err(|e| {
        answer(StatusCode::BAD_REQUEST);
        ApiError::new(StatusCode::BAD_REQUEST, e)
    })?;

    let queued_at = Instant::now();
    let running = s
        .running
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unloading"))?;
    m.latency(&t.name, &name, "queue", queued_at.elapsed().as_secs_f64());
    let in_flight = m.in_flight(&t.name, &name);
    let id = decoded.request.id.clone();
    // The slots stay taken until the call has ended, even if this client hangs up first.
    let held = (tenant_slot, queued, running, in_flight);
    let (result, stats) = gw.call(plugin.clone(), decoded.request, held).await;
    m.latency(&t.name, &name, "plugin", stats.elapsed.as_secs_f64());
    if !stats.compute.is_zero() {
        m.latency(&t.name, &name, "compute", stats.compute.as_secs_f64());
    }
    m.usage(&t.name, &name, stats.fuel_used, stats.memory_bytes);
    match result {
        Ok(response) => {
            answer(StatusCode::OK);
            let (bytes, header) = kserve::encode(&s.name, &s.version, &id, &response, &decoded.binary);
            let mut resp = Response::new(axum::body::Body::from(bytes));
            let headers = resp.headers_mut();
            match header {
                Some(n) => {
                    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                    headers.insert(HEADER_LENGTH, HeaderValue::from(n));
                }
                None => {
                    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
            }
            Ok(resp)
        }
        Err(e) => {
            tracing::info!(tenant = %t.name, model = %name, kind = e.kind().as_str(), error = %e, "inference failed");
            m.error(&t.name, &name, e.kind().as_str());
            let err = ApiError::from(e);
            answer(err.status);
            Err(err)
        }
    }
}

async fn metrics(State(gw): Gw, headers: HeaderMap) -> Result<Response, ApiError> {
    // Metrics name tenants: only the admin may read them (off without an admin key).
    admin(&gw, &headers)?;
    let snapshot = gw.snapshot();
    let registry = snapshot.runtime.registry();
    let engines: Vec<_> = registry
        .names()
        .filter_map(|n| registry.loaded(n).and_then(|m| m.llm().map(|l| (n.to_string(), l.engine().stats()))))
        .collect();
    gw.metrics().engines(&engines);
    let mut resp = Response::new(axum::body::Body::from(gw.metrics().encode()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(resp)
}

async fn repository_index(State(gw): Gw, headers: HeaderMap) -> Result<axum::Json<Value>, ApiError> {
    admin(&gw, &headers)?;
    let snapshot = gw.snapshot();
    let index: Vec<Value> = snapshot
        .models
        .iter()
        .flat_map(|(name, m)| m.versions.keys().map(move |v| json!({ "name": name, "version": v, "state": "READY" })))
        .collect();
    Ok(axum::Json(Value::Array(index)))
}

async fn repository_load(
    State(gw): Gw,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    admin(&gw, &headers)?;
    gw.reload().await.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("reload refused: {e:#}")))?;
    if !gw.snapshot().models.contains_key(&name) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("the configuration declares no plugin `{name}`")));
    }
    Ok(axum::Json(json!({ "name": name, "state": "READY" })))
}

async fn repository_unload(
    State(gw): Gw,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    admin(&gw, &headers)?;
    if !gw.unload(&name) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no model `{name}` is loaded")));
    }
    Ok(axum::Json(json!({ "name": name, "state": "UNAVAILABLE" })))
}
