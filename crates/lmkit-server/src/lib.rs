//! lmkit-server: an OpenAI-compatible HTTP API over lmkit's continuous-batching engine
//! (`lmkit_generate::engine`), as a mountable axum [`router`]. No model logic of its own: it
//! parses and checks requests, renders chat templates, submits jobs and formats what comes back.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both streaming over SSE or not),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). With an API key, the `/v1`
//! routes want `Authorization: Bearer KEY` (401 otherwise). Every error is an OpenAI error
//! object with a 4xx/5xx status; a full queue answers 503.

pub mod error;
pub mod metrics;
pub mod openai;
mod respond;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lmkit_formats::chat::{ChatTemplate, Message};
use lmkit_formats::tokenizer::LoadedTokenizer;
use lmkit_generate::engine::EngineHandle;

pub use error::{ApiError, Error, Result};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The id `/v1/models` lists and responses carry.
    pub model_id: String,
    /// Bearer token the `/v1` routes require, if any.
    pub api_key: Option<String>,
    /// Largest request body accepted, bytes (413 beyond).
    pub max_body: usize,
}

/// What the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<LoadedTokenizer>,
    pub chat: Arc<ChatTemplate>,
    pub cfg: ServerConfig,
    pub metrics: metrics::Metrics,
    pub created: u64,
}

impl AppState {
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<LoadedTokenizer>,
        chat: Arc<ChatTemplate>,
        cfg: ServerConfig,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            chat,
            cfg,
            metrics: metrics::Metrics::default(),
            created: now(),
        }
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The API's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if !st
        .engine
        .stats()
        .alive
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        st.metrics.request("/health", 503);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "error", "reason": "the engine stopped"})),
        )
            .into_response();
    }
    st.metrics.request("/health", 200);
    Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let body = st.metrics.render(st.engine.stats(), st.engine.max_batch());
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

async fn not_found() -> Response {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such route (see /v1/chat/completions, /v1/completions, /v1/models)",
    )
    .into_response()
}

/// 401 unless the request carries the API key (when one is set).
fn authorize(st: &AppState, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(key) = &st.cfg.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "invalid or missing API key (send Authorization: Bearer KEY)".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        })
    }
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        st.metrics.request("/v1/models", e.status.as_u16());
        return e.into_response();
    }
    st.metrics.request("/v1/models", 200);
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_id,
            "object": "model",
            "created": st.created,
            "owned_by": "lmkit",
        }],
    }))
    .into_response()
}

/// The body, or the error for a body that is too large or unreadable.
fn body(b: std::result::Result<Bytes, BytesRejection>) -> std::result::Result<Bytes, ApiError> {
    b.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".to_string()
        } else {
            format!("cannot read the request body: {}", r.body_text())
        };
        ApiError::status(status, "invalid_request_error", msg)
    })
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let started = std::time::Instant::now();
    let r = async {
        authorize(&st, &headers)?;
        let b = body(b)?;
        let req: openai::ChatRequest = openai::parse(&b, openai::CHAT_FIELDS)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` must hold at least one message",
            ));
        }
        let mut msgs = Vec::with_capacity(req.messages.len());
        for m in &req.messages {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer"
            ) {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("unknown role `{}` (system, user, assistant)", m.role),
                ));
            }
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            let text = match &m.content {
                Some(c) => c.text()?,
                None => String::new(),
            };
            msgs.push(Message::new(role, &text));
        }
        let text = st
            .chat
            .render(&msgs, true)
            .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
        let top = match (req.logprobs, req.top_logprobs) {
            (Some(true), t) => Some(t.unwrap_or(0) as usize),
            (_, Some(_)) => {
                return Err(ApiError::invalid(
                    Some("top_logprobs"),
                    "`top_logprobs` needs `logprobs: true`",
                ))
            }
            _ => None,
        };
        if top.is_some_and(|t| t > 20) {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "`top_logprobs` must be between 0 and 20",
            ));
        }
        let job = respond::plan(&st, &req.common, &text, top, respond::Kind::Chat)?;
        respond::run(st.clone(), job, started).await
    }
    .await;
    respond::finish(&st, "/v1/chat/completions", r)
}

async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    b: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let started = std::time::Instant::now();
    let r = async {
        authorize(&st, &headers)?;
        let b = body(b)?;
        let req: openai::CompletionRequest = openai::parse(&b, openai::COMPLETION_FIELDS)?;
        let text = match &req.prompt {
            openai::Prompt::Text(s) => s.clone(),
            openai::Prompt::Batch(v) if v.len() == 1 => v[0].clone(),
            openai::Prompt::Batch(_) => {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    "`prompt` must be one string (send one request per prompt)",
                ))
            }
        };
        if req.echo == Some(true) {
            return Err(ApiError::invalid(Some("echo"), "`echo` is not supported"));
        }
        if req.logprobs.is_some_and(|l| l > 5) {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "`logprobs` must be between 0 and 5",
            ));
        }
        let top = req.logprobs.map(|l| l as usize);
        let job = respond::plan(&st, &req.common, &text, top, respond::Kind::Completion)?;
        respond::run(st.clone(), job, started).await
    }
    .await;
    respond::finish(&st, "/v1/completions", r)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then stops taking
/// connections and lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
