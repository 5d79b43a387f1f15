//! The OpenAI-compatible face of the gateway: `GET /v1/models`, `POST /v1/chat/completions`
//! and `POST /v1/completions`, plain or streamed as server-sent events, and
//! `POST /v1/embeddings` through an embedding plugin. The same bearer keys,
//! tenants, rate and concurrency quotas and compute quotas as the KServe routes; generation
//! runs on the model's engine, charged to the tenant, and a client that hangs up cancels its
//! generation (its KV cache is freed within one step).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Gateway;
use super::quota::{Refused, TenantState};
use crate::llm::{Event, Finish, GenerateRequest, Generation, LlmError, Message, Sampling, Usage};
use crate::nn::Model;

type Gw = State<Arc<Gateway>>;

/// An OpenAI-style error answer.
pub(super) struct OaiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    retry_after: Option<u64>,
}

impl OaiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, retry_after: None }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let body =
            json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": null } });
        let mut resp = (self.status, axum::Json(body)).into_response();
        // 0 where the refusal was held for all of its wait (`TenantState::hold_refusal`).
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<LlmError> for OaiError {
    fn from(e: LlmError) -> Self {
        match e {
            LlmError::BadParameter(m) | LlmError::PromptTooLong(m) => Self::bad(m),
            LlmError::Busy(m) => {
                Self { retry_after: Some(1), ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", m) }
            }
            LlmError::Template(m) | LlmError::Compute(m) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m)
            }
        }
    }
}

fn tenant(gw: &Gateway, headers: &HeaderMap) -> Result<Arc<TenantState>, OaiError> {
    let key = super::routes::bearer(headers).ok_or_else(|| {
        OaiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing API key (Authorization: Bearer <key>)",
        )
    })?;
    gw.snapshot()
        .by_key
        .get(&super::key_hash(key))
        .cloned()
        .ok_or_else(|| OaiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid API key"))
}

/// `GET /v1/models`: the language models and plugins the caller may use.
pub(super) async fn models(State(gw): Gw, headers: HeaderMap) -> Result<axum::Json<Value>, OaiError> {
    let t = tenant(&gw, &headers)?;
    let snapshot = gw.snapshot();
    let registry = snapshot.runtime.registry();
    let mut data: Vec<Value> = registry
        .names()
        .filter(|n| t.decl.may_use_model(n))
        // The gateway preloads every model, so this reads no files.
        .filter(|n| registry.loaded(n).is_some_and(|m| m.llm().is_some()))
        .map(|n| json!({ "id": n, "object": "model", "created": 0, "owned_by": "eir" }))
        .collect();
    // Plugins are models too (e.g. `text-embed` on /v1/embeddings).
    data.extend(
        snapshot
            .models
            .keys()
            .filter(|n| t.decl.may_use(n))
            .map(|n| json!({ "id": n, "object": "model", "created": 0, "owned_by": "eir" })),
    );
    data.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(axum::Json(json!({ "object": "list", "data": data })))
}

/// A stop sequence: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The request fields both endpoints share (unknown fields are ignored, as OpenAI's API
/// tolerates client-specific extras).
#[derive(Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
}

impl Common {
    /// Checks `n`, and returns the requested token limit and the stop texts.
    fn limits(&self) -> Result<(Option<u64>, Vec<String>), OaiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(OaiError::bad("n must be 1"));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) {
            return Err(OaiError::bad("max_tokens must be at least 1"));
        }
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
            Some(Stop::Many(_)) => return Err(OaiError::bad("at most 4 stop sequences")),
        };
        Ok((max_tokens, stop))
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Content,
}

/// Message content: a string, or OpenAI's list of parts (only text parts are accepted).
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Content {
    #[default]
    Null,
    Text(String),
    Parts(Vec<Value>),
}

impl Content {
    fn text(self) -> Result<String, OaiError> {
        match self {
            Content::Null => Ok(String::new()),
            Content::Text(s) => Ok(s),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t),
                    _ => Err(OaiError::bad("only text content parts are supported")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
        }
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: Value,
}

/// Parses a JSON body into `T`, answering 400 with serde's reason.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, OaiError> {
    serde_json::from_slice(body).map_err(|e| OaiError::bad(format!("invalid request body: {e}")))
}

/// [`TenantState::refuse`] under this configuration's `server.refusal_hold`: counts the
/// refusal, holds it, and gives the seconds left for its `Retry-After`.
async fn hold(gw: &Gateway, t: &TenantState, reason: &'static str, wait: Duration) -> u64 {
    t.refuse(gw.metrics(), reason, wait, gw.snapshot().config.server.refusal_hold).await
}

/// A 429 for quota `reason`, to be retried after `wait`, held by [`hold`].
async fn over_quota(gw: &Gateway, t: &TenantState, reason: &'static str, wait: Duration) -> OaiError {
    let retry = hold(gw, t, reason, wait).await;
    let what = if reason == "tokens" { "tokens-per-minute" } else { reason };
    OaiError {
        retry_after: Some(retry),
        ..OaiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("over your {what} quota; retry later"),
        )
    }
}

/// The tenant's rate and concurrency quotas: its slot, held until the request ends.
async fn admit_tenant(gw: &Gateway, t: &TenantState) -> Result<tokio::sync::OwnedSemaphorePermit, OaiError> {
    match t.admit() {
        Ok(slot) => Ok(slot),
        Err(Refused::Rate(wait)) => Err(over_quota(gw, t, "rate", wait).await),
        Err(Refused::Concurrency) => Err(over_quota(gw, t, "concurrency", Duration::from_secs(1)).await),
    }
}

/// The quota a tenant is over, and how long until it is not: its tokens per minute, then (with
/// an `account`) its compute quota. The caller drops any slot it holds before refusing
/// ([`over_quota`] holds the refusal a while).
fn quota_spent(t: &TenantState, account: Option<&crate::scheduler::Tenant>) -> Option<(&'static str, Duration)> {
    t.tokens_wait()
        .map(|wait| ("tokens", wait))
        .or_else(|| account.and_then(|a| a.over_quota()).map(|wait| ("compute", wait)))
}

/// What a request resolved to: its model, tenant accounts and generation parameters.
struct Job {
    llm_model: Arc<dyn Model>,
    tenant: Arc<TenantState>,
    model: String,
    sampling: Sampling,
    max_tokens: usize,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Job {
    fn llm(&self) -> &crate::llm::Llm {
        // `resolve` checked that the model is a language model.
        self.llm_model.llm().expect("a language model")
    }
}

/// Authenticates, admits and validates a request.
async fn resolve(gw: &Gateway, headers: &HeaderMap, c: Common, default_max: usize) -> Result<Job, OaiError> {
    let t = tenant(gw, headers)?;
    let snapshot = gw.snapshot();
    let registry = snapshot.runtime.registry().clone();
    if !t.decl.may_use_model(&c.model) || registry.decl(&c.model).is_none() {
        return Err(no_model(&c.model));
    }
    let slot = admit_tenant(gw, &t).await?;
    if let Some((reason, wait)) = quota_spent(&t, Some(&registry.scheduler().tenant(&t.name))) {
        drop(slot);
        return Err(over_quota(gw, &t, reason, wait).await);
    }
    let model = registry
        .get(&c.model)
        .await
        .map_err(|e| OaiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.message))?;
    if model.llm().is_none() {
        let mut e = OaiError::bad(format!("model `{}` is a `{}` model, not a language model", c.model, model.family()));
        e.param = Some("model");
        return Err(e);
    }
    let (max_tokens, stop) = c.limits()?;
    let defaults = Sampling::default();
    let sampling = Sampling {
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k: c.top_k.unwrap_or(0),
        min_p: c.min_p.unwrap_or(0.0),
        repeat_penalty: c.repeat_penalty.unwrap_or(1.0),
        seed: c.seed,
        ..defaults
    };
    let max_tokens = max_tokens.map_or(default_max, |n| usize::try_from(n).unwrap_or(usize::MAX));
    Ok(Job {
        llm_model: model,
        tenant: t,
        model: c.model,
        sampling,
        max_tokens,
        stop,
        stream: c.stream,
        include_usage: c.stream_options.unwrap_or_default().include_usage,
        _slot: slot,
    })
}

/// What a generation is charged and measured by: the tenant's token quota, the metrics.
struct Accounting {
    gw: Arc<Gateway>,
    tenant: Arc<TenantState>,
    model: String,
    start: std::time::Instant,
    first: Option<std::time::Instant>,
    _in_flight: super::metrics::InFlight,
}

impl Accounting {
    fn new(gw: Arc<Gateway>, tenant: Arc<TenantState>, model: String) -> Self {
        let in_flight = gw.metrics().in_flight(&tenant.name, &model);
        Self { gw, tenant, model, start: std::time::Instant::now(), first: None, _in_flight: in_flight }
    }

    fn token(&mut self) {
        self.first.get_or_insert_with(std::time::Instant::now);
    }

    /// Charges the tokens and records the generation (once, when it ends).
    fn done(&self, usage: &Usage, status: u16) {
        let m = self.gw.metrics();
        self.tenant.charge_tokens(usage.prompt_tokens + usage.completion_tokens);
        let ttft = self.first.map(|f| f.duration_since(self.start).as_secs_f64());
        let rate = self.first.and_then(|f| {
            let s = f.elapsed().as_secs_f64();
            (usage.completion_tokens > 1 && s > 0.0).then(|| (usage.completion_tokens - 1) as f64 / s)
        });
        m.generation(&self.tenant.name, &self.model, ttft, rate, usage.prompt_tokens, usage.completion_tokens);
        m.request(&self.tenant.name, &self.model, status);
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length | Finish::ContextFull | Finish::Deadline | Finish::Cancelled | Finish::Error => "length",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({ "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens })
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat(State(gw): Gw, headers: HeaderMap, body: Bytes) -> Result<Response, OaiError> {
    // Parsed once: the typed request, and its other fields for a plugin.
    let value: Value = parse(&body)?;
    let req = ChatRequest::deserialize(&value).map_err(|e| OaiError::bad(format!("invalid request body: {e}")))?;
    if req.messages.is_empty() {
        let mut e = OaiError::bad("messages must not be empty");
        e.param = Some("messages");
        return Err(e);
    }
    let messages: Vec<Message> = req
        .messages
        .into_iter()
        .map(|m| Ok(Message { role: m.role, content: m.content.text()? }))
        .collect::<Result<_, OaiError>>()?;
    let t = tenant(&gw, &headers)?;
    if serves_plugin(&gw, &t, &req.common.model) {
        let extra = extra_parameters(&value);
        return chat_plugin(gw, t, req.common, messages, extra).await;
    }
    let job = resolve(&gw, &headers, req.common, usize::MAX).await?;
    let prompt = job.llm().chat_prompt(&messages)?;
    run(gw, job, prompt, Kind::Chat).await
}

/// `POST /v1/completions`.
pub(super) async fn completions(State(gw): Gw, headers: HeaderMap, body: Bytes) -> Result<Response, OaiError> {
    let req: CompletionRequest = parse(&body)?;
    let text = match &req.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        _ => return Err(OaiError::bad("prompt must be one string")),
    };
    let t = tenant(&gw, &headers)?;
    if serves_plugin(&gw, &t, &req.common.model) {
        let mut e = OaiError::bad(format!(
            "`{}` is a plugin: plugins answer on /v1/chat/completions (and /v1/embeddings)",
            req.common.model
        ));
        e.param = Some("model");
        return Err(e);
    }
    // OpenAI's default for completions is 16 tokens.
    let job = resolve(&gw, &headers, req.common, 16).await?;
    let prompt = job.llm().text_prompt(&text)?;
    run(gw, job, prompt, Kind::Completion).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn run(gw: Arc<Gateway>, job: Job, prompt: Vec<u32>, kind: Kind) -> Result<Response, OaiError> {
    let llm = job.llm();
    // "As many as fit": the context left after the prompt.
    let max_tokens = job.max_tokens.min(llm.engine().context().saturating_sub(prompt.len()).max(1));
    let account = gw.snapshot().runtime.registry().scheduler().tenant(&job.tenant.name);
    let generation = match llm.generate(GenerateRequest {
        prompt,
        sampling: job.sampling.clone(),
        max_tokens,
        stop: job.stop.clone(),
        tenant: account,
        // The tenant's per-request time ceiling bounds a generation as it bounds a plugin call.
        deadline: job.tenant.decl.ceilings.timeout.map(|t| std::time::Instant::now() + t),
    }) {
        Ok(generation) => generation,
        // The engine's queue is full: refused as a plugin's full queue is, held without the
        // tenant's slot.
        Err(LlmError::Busy(message)) => {
            let t = job.tenant.clone();
            drop(job);
            return Err(OaiError {
                retry_after: Some(hold(&gw, &t, "queue", Duration::from_secs(1)).await),
                ..OaiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            });
        }
        Err(e) => return Err(e.into()),
    };
    let id = request_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    let created = now();
    let mut acct = Accounting::new(gw.clone(), job.tenant.clone(), job.model.clone());
    if job.stream {
        return Ok(stream(job, generation, acct, id, created, kind));
    }
    let mut g = generation;
    let (mut text, mut done) = (String::new(), None);
    while let Some(ev) = g.next().await {
        match ev {
            Event::Chunk { text: t, .. } => {
                acct.token();
                text.push_str(&t)
            }
            Event::Done { finish, usage, error } => done = Some((finish, usage, error)),
        }
    }
    let (finish, usage, error) = done.ok_or_else(|| {
        OaiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the generation ended early")
    })?;
    if let Some(e) = error {
        acct.done(&usage, 500);
        return Err(OaiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e));
    }
    acct.done(&usage, 200);
    let choice = match kind {
        Kind::Chat => json!({ "index": 0, "message": { "role": "assistant", "content": text },
                              "logprobs": null, "finish_reason": finish_reason(finish) }),
        Kind::Completion => {
            json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason(finish) })
        }
    };
    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Ok(axum::Json(json!({ "id": id, "object": object, "created": created, "model": job.model,
                          "choices": [choice], "usage": usage_json(&usage) }))
    .into_response())
}

/// Server-sent events: (chat) a role chunk, content deltas as tokens are produced, a chunk
/// with the finish reason, the usage if asked, then `[DONE]`. Dropping the body (the client
/// went away) drops the generation, which cancels it.
fn stream(job: Job, generation: Generation, acct: Accounting, id: String, created: u64, kind: Kind) -> Response {
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |choice: Value| -> Value {
        json!({ "id": id, "object": object, "created": created, "model": job.model, "choices": [choice] })
    };
    let include_usage = job.include_usage;
    enum Phase {
        Start,
        Body,
        Usage(Value),
        Done,
        End,
    }
    struct St<C> {
        g: Generation,
        phase: Phase,
        chunk: C,
        acct: Accounting,
        _slot: tokio::sync::OwnedSemaphorePermit,
    }
    let state = St { g: generation, phase: Phase::Start, chunk, acct, _slot: job._slot };
    let events = futures_util::stream::unfold(state, move |mut st| async move {
        let sse = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
        match std::mem::replace(&mut st.phase, Phase::End) {
            Phase::Start if kind == Kind::Chat => {
                let first = (st.chunk)(
                    json!({ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }),
                );
                st.phase = Phase::Body;
                Some((Ok::<_, Infallible>(sse(&first)), st))
            }
            Phase::Start | Phase::Body => loop {
                match st.g.next().await {
                    Some(Event::Chunk { text, .. }) if text.is_empty() => continue,
                    Some(Event::Chunk { text, .. }) => {
                        st.acct.token();
                        let c = match kind {
                            Kind::Chat => {
                                json!({ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null })
                            }
                            Kind::Completion => {
                                json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": null })
                            }
                        };
                        st.phase = Phase::Body;
                        break Some((Ok(sse(&(st.chunk)(c))), st));
                    }
                    Some(Event::Done { finish, usage, error }) => {
                        st.acct.done(&usage, if error.is_some() { 500 } else { 200 });
                        if let Some(e) = error {
                            let err = json!({ "error": { "message": e, "type": "server_error", "param": null, "code": null } });
                            st.phase = Phase::Done;
                            break Some((Ok(sse(&err)), st));
                        }
                        let c = match kind {
                            Kind::Chat => {
                                json!({ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(finish) })
                            }
                            Kind::Completion => {
                                json!({ "index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason(finish) })
                            }
                        };
                        st.phase = if include_usage { Phase::Usage(usage_json(&usage)) } else { Phase::Done };
                        break Some((Ok(sse(&(st.chunk)(c))), st));
                    }
                    None => break Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), st)),
                }
            },
            Phase::Usage(u) => {
                let mut c = (st.chunk)(Value::Null);
                c["choices"] = json!([]);
                c["usage"] = u;
                st.phase = Phase::Done;
                Some((Ok(sse(&c)), st))
            }
            Phase::Done => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), st)),
            Phase::End => None,
        }
    });
    sse_response(Body::from_stream(events))
}

fn no_model(model: &str) -> OaiError {
    let mut e = OaiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no model `{model}`"));
    e.param = Some("model");
    e
}

/// A plugin call admitted past the tenant's quotas into the plugin's queue. Held until the
/// call has ended.
struct PluginCall {
    plugin: Arc<crate::plugin::Plugin>,
    running: Arc<tokio::sync::Semaphore>,
    _tenant_slot: tokio::sync::OwnedSemaphorePermit,
    _queued: tokio::sync::OwnedSemaphorePermit,
}

impl PluginCall {
    /// Waits for the plugin's turn to run (its concurrency).
    async fn run(&self) -> Result<tokio::sync::OwnedSemaphorePermit, OaiError> {
        self.running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| OaiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "unloading"))
    }
}

/// Admits a call to the plugin `model` as the KServe routes do (the tenant's rate,
/// concurrency and compute quotas, the plugin's queue); `None` when the tenant has no such
/// plugin.
async fn admit_plugin(gw: &Gateway, t: &TenantState, model: &str) -> Result<Option<PluginCall>, OaiError> {
    let snapshot = gw.snapshot();
    let Some(s) = snapshot.resolve(t, model, None) else { return Ok(None) };
    let Some(plugin) = s.per_tenant.get(&t.name).cloned() else { return Ok(None) };
    let tenant_slot = admit_tenant(gw, t).await?;
    if let Some(wait) = plugin.tenant().over_quota() {
        drop(tenant_slot);
        return Err(over_quota(gw, t, "compute", wait).await);
    }
    let Ok(queued) = s.slots.clone().try_acquire_owned() else {
        drop(tenant_slot);
        return Err(OaiError {
            retry_after: Some(hold(gw, t, "queue", Duration::from_secs(1)).await),
            ..OaiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", format!("model `{model}` is at capacity"))
        });
    };
    Ok(Some(PluginCall { plugin, running: s.running.clone(), _tenant_slot: tenant_slot, _queued: queued }))
}

/// Whether `model` names a plugin served to tenant `t`.
fn serves_plugin(gw: &Gateway, t: &TenantState, model: &str) -> bool {
    gw.snapshot().resolve(t, model, None).is_some_and(|s| s.per_tenant.contains_key(&t.name))
}

/// A failed plugin call as an OpenAI error: the request's fault (400) or the server's (500).
fn call_error(e: &crate::plugin::CallError) -> OaiError {
    let status = super::routes::status_of(e.kind());
    let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
    OaiError::new(status, kind, e.to_string().lines().next().unwrap_or_default().to_string())
}

/// The most tokens a plugin may report for one answer's prompt or completion.
const MAX_REPORTED_TOKENS: usize = 1 << 20;

/// What a chat plugin answered (the `eir:plugin/reply` chat convention).
struct PluginAnswer {
    text: String,
    finish: &'static str,
    usage: Usage,
}

impl PluginAnswer {
    fn of(plugin: &str, response: &crate::tensor::Response) -> Result<Self, OaiError> {
        use crate::tensor::TensorData;
        let not_chat = || {
            OaiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("plugin `{plugin}` gave no `answer` output (BYTES [1] of UTF-8 text)"),
            )
        };
        let answer = response.outputs.iter().find(|o| o.name == "answer").ok_or_else(not_chat)?;
        let TensorData::Bytes(texts) = &answer.data else { return Err(not_chat()) };
        let [text] = texts.as_slice() else { return Err(not_chat()) };
        let text = String::from_utf8(text.clone()).map_err(|_| not_chat())?;
        let param = |name: &str| response.parameters.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        // Reported by the plugin: taken as at most a whole context's worth.
        let count =
            |name: &str| param(name).and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0).min(MAX_REPORTED_TOKENS);
        let finish = if param("finish_reason") == Some("length") { "length" } else { "stop" };
        let usage = Usage { prompt_tokens: count("prompt_tokens"), completion_tokens: count("completion_tokens") };
        Ok(Self { text, finish, usage })
    }
}

/// The fields of OpenAI's chat request; any other top-level field is the plugin's own.
const OPENAI_CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "seed",
    "stop",
    "n",
    "user",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "metadata",
    "store",
    "service_tier",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "functions",
    "function_call",
    "web_search_options",
];

/// Most extra parameters passed on to a plugin.
const MAX_EXTRA_PARAMETERS: usize = 32;

/// A chat request's other top-level fields with a string, number or boolean value (what an
/// OpenAI client sends as `extra_body`), as plugin parameters.
fn extra_parameters(body: &Value) -> Vec<(String, String)> {
    let Some(fields) = body.as_object() else { return vec![] };
    fields
        .iter()
        .filter(|(k, _)| !OPENAI_CHAT_FIELDS.contains(&k.as_str()))
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k.clone(), s.clone())),
            Value::Number(n) => Some((k.clone(), n.to_string())),
            Value::Bool(b) => Some((k.clone(), b.to_string())),
            _ => None,
        })
        .take(MAX_EXTRA_PARAMETERS)
        .collect()
}

/// `/v1/chat/completions` answered by a plugin: the messages go in as `role` and `content`,
/// the parameters the client set as request parameters (see `eir:plugin/reply` in
/// `wit/eir.wit`); streamed, each part the plugin sends is one content delta.
async fn chat_plugin(
    gw: Arc<Gateway>,
    t: Arc<TenantState>,
    c: Common,
    messages: Vec<Message>,
    extra: Vec<(String, String)>,
) -> Result<Response, OaiError> {
    use crate::tensor::{Request, Tensor, TensorData};
    let (max_tokens, stop) = c.limits()?;
    if let Some((reason, wait)) = quota_spent(&t, None) {
        return Err(over_quota(&gw, &t, reason, wait).await);
    }
    let mut parameters: Vec<(String, String)> = [
        ("max_tokens", max_tokens.map(|v| v.to_string())),
        ("temperature", c.temperature.map(|v| v.to_string())),
        ("top_p", c.top_p.map(|v| v.to_string())),
        ("top_k", c.top_k.map(|v| v.to_string())),
        ("min_p", c.min_p.map(|v| v.to_string())),
        ("repeat_penalty", c.repeat_penalty.map(|v| v.to_string())),
        ("seed", c.seed.map(|v| v.to_string())),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), v?)))
    .collect();
    parameters.extend(stop.into_iter().map(|s| ("stop".to_string(), s)));
    parameters.extend(extra);
    let n = messages.len() as u64;
    let (roles, contents) = messages.into_iter().map(|m| (m.role.into_bytes(), m.content.into_bytes())).unzip();
    let request = Request {
        id: request_id("chatcmpl"),
        inputs: vec![
            Tensor { name: "role".into(), shape: vec![n], data: TensorData::Bytes(roles) },
            Tensor { name: "content".into(), shape: vec![n], data: TensorData::Bytes(contents) },
        ],
        outputs: vec![],
        parameters,
    };
    let (id, created, model) = (request.id.clone(), now(), c.model.clone());
    let call = admit_plugin(&gw, &t, &model).await?.ok_or_else(|| no_model(&model))?;
    let running = call.run().await?;
    let acct = Accounting::new(gw.clone(), t, model.clone());
    let plugin = call.plugin.clone();
    if !c.stream {
        let (result, _stats) = gw.call(plugin, request, (call, running)).await;
        let answer = result.map_err(|e| call_error(&e)).and_then(|r| PluginAnswer::of(&model, &r));
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                acct.done(&Usage::default(), e.status.as_u16());
                return Err(e);
            }
        };
        acct.done(&answer.usage, 200);
        let choice = json!({ "index": 0, "message": { "role": "assistant", "content": answer.text },
                             "logprobs": null, "finish_reason": answer.finish });
        return Ok(axum::Json(json!({ "id": id, "object": "chat.completion", "created": created, "model": model,
                                     "choices": [choice], "usage": usage_json(&answer.usage) }))
        .into_response());
    }

    let (sink, parts) = crate::plugin::reply_channel();
    let include_usage = c.stream_options.unwrap_or_default().include_usage;
    // Dropping the body (the client hung up) drops this future, which cancels the call.
    let g = gw.clone();
    let answer: CallFuture = Box::pin(async move { g.call_with(plugin, request, (call, running), Some(sink)).await });
    let chunk = move |choice: Value| -> Value {
        json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice] })
    };
    let delta =
        |text: &str| json!({ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null });
    struct St<C> {
        parts: tokio::sync::mpsc::Receiver<String>,
        answer: CallFuture,
        started: bool,
        streamed: bool,
        /// The events left once the call has ended.
        tail: Option<std::collections::VecDeque<Bytes>>,
        chunk: C,
        acct: Accounting,
    }
    let sse = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    let state = St { parts, answer, started: false, streamed: false, tail: None, chunk, acct };
    let events = futures_util::stream::unfold(state, move |mut st| async move {
        if !st.started {
            st.started = true;
            let first = (st.chunk)(
                json!({ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }),
            );
            return Some((Ok::<_, Infallible>(sse(&first)), st));
        }
        loop {
            if let Some(tail) = &mut st.tail {
                let event = tail.pop_front()?;
                return Some((Ok(event), st));
            }
            let (result, _stats) = tokio::select! {
                biased;
                Some(part) = st.parts.recv() => {
                    if part.is_empty() {
                        continue;
                    }
                    st.acct.token();
                    st.streamed = true;
                    return Some((Ok(sse(&(st.chunk)(delta(&part)))), st));
                }
                ended = &mut st.answer => ended,
            };
            // The call has ended: what it sent last, then its end.
            let mut tail = std::collections::VecDeque::new();
            while let Ok(part) = st.parts.try_recv() {
                if !part.is_empty() {
                    st.streamed = true;
                    tail.push_back(sse(&(st.chunk)(delta(&part))));
                }
            }
            match result.map_err(|e| call_error(&e)).and_then(|r| PluginAnswer::of(&st.acct.model, &r)) {
                Ok(answer) => {
                    if !st.streamed && !answer.text.is_empty() {
                        st.acct.token();
                        tail.push_back(sse(&(st.chunk)(delta(&answer.text))));
                    }
                    st.acct.done(&answer.usage, 200);
                    tail.push_back(sse(&(st.chunk)(
                        json!({ "index": 0, "delta": {}, "logprobs": null, "finish_reason": answer.finish }),
                    )));
                    if include_usage {
                        let mut c = (st.chunk)(Value::Null);
                        c["choices"] = json!([]);
                        c["usage"] = usage_json(&answer.usage);
                        tail.push_back(sse(&c));
                    }
                }
                Err(e) => {
                    st.acct.done(&Usage::default(), e.status.as_u16());
                    tail.push_back(sse(
                        &json!({ "error": { "message": e.message, "type": e.kind, "param": null, "code": null } }),
                    ));
                }
            }
            tail.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            st.tail = Some(tail);
        }
    });
    Ok(sse_response(Body::from_stream(events)))
}

type CallFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (Result<crate::tensor::Response, crate::plugin::CallError>, crate::plugin::CallStats),
            > + Send,
    >,
>;

fn sse_response(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
}

/// Most texts one embeddings request may carry (the text-embed plugin's own cap).
const MAX_EMBED_INPUTS: usize = 1024;

/// `POST /v1/embeddings`: `model` names an embedding plugin (one taking `text`, BYTES `[n]`, and
/// giving `embedding`, FP32 `[n, dim]`, like the shipped `text-embed` on MiniLM). The texts are
/// tokenized and pooled inside the sandbox, as on `/v2`; the same admission applies (tenant
/// quotas, the plugin's queue).
pub(super) async fn embeddings(State(gw): Gw, headers: HeaderMap, body: Bytes) -> Result<Response, OaiError> {
    use crate::tensor::{Request, Tensor, TensorData};
    let req: EmbeddingRequest = parse(&body)?;
    let texts: Vec<String> = match req.input {
        Value::String(s) => vec![s],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string) => {
            a.into_iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect()
        }
        _ => {
            return Err(OaiError::bad(
                "input must be a string or a non-empty array of strings (token arrays are not supported)",
            ));
        }
    };
    if texts.len() > MAX_EMBED_INPUTS {
        return Err(OaiError::bad(format!("at most {MAX_EMBED_INPUTS} inputs per request")));
    }
    if req.dimensions.is_some() {
        return Err(OaiError::bad("dimensions is not supported: the model's embedding size is fixed"));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(OaiError::bad(format!("encoding_format `{other}` (float or base64)"))),
    };
    let t = tenant(&gw, &headers)?;
    let admitted = admit_plugin(&gw, &t, &req.model).await?.ok_or_else(|| no_model(&req.model))?;
    let running = admitted.run().await?;
    let in_flight = gw.metrics().in_flight(&t.name, &req.model);
    let n = texts.len();
    let request = Request {
        id: request_id("emb"),
        inputs: vec![Tensor {
            name: "text".into(),
            shape: vec![n as u64],
            data: TensorData::Bytes(texts.into_iter().map(String::into_bytes).collect()),
        }],
        outputs: vec!["embedding".into(), "token_counts".into()],
        parameters: vec![],
    };
    let m = gw.metrics();
    let (result, _stats) = gw.call(admitted.plugin.clone(), request, (admitted, running, in_flight)).await;
    let response = result.map_err(|e| {
        let e = call_error(&e);
        m.request(&t.name, &req.model, e.status.as_u16());
        e
    })?;
    let output = |name: &str| response.outputs.iter().find(|o| o.name == name);
    let not_embedding = || {
        OaiError::bad(format!(
            "model `{}` is not an embedding plugin (it gave no FP32 `embedding` output of [{n}, dim])",
            req.model
        ))
    };
    let emb = output("embedding").ok_or_else(not_embedding)?;
    let (TensorData::Fp32(values), [rows, dim]) = (&emb.data, emb.shape.as_slice()) else {
        return Err(not_embedding());
    };
    let (rows, dim) = (*rows as usize, *dim as usize);
    if rows != n || values.len() != rows * dim {
        return Err(not_embedding());
    }
    let tokens: u64 = match output("token_counts").map(|o| &o.data) {
        Some(TensorData::Int64(c)) => c.iter().map(|&c| c.max(0) as u64).sum(),
        _ => 0,
    };
    let data: Vec<Value> = values
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    m.request(&t.name, &req.model, 200);
    Ok(axum::Json(json!({ "object": "list", "data": data, "model": req.model,
                          "usage": { "prompt_tokens": tokens, "total_tokens": tokens } }))
    .into_response())
}
