//! `flux serve`: an HTTP image service that keeps the model loaded.
//!
//! Routes: OpenAI's `POST /v1/images/generations` and `GET /v1/models`; the native jobs API
//! (`POST /api/v1/jobs`, `GET|DELETE /api/v1/jobs/{id}`, `GET /api/v1/jobs/{id}/events` as
//! Server-Sent Events, `GET /api/v1/jobs/{id}/images/{k}` as PNG with the CLI's metadata);
//! `GET /health` and `GET /metrics` (Prometheus text). One generation runs at a time, from a
//! bounded queue; a full queue answers 429 with `Retry-After`. Every bad request gets a JSON
//! error `{"error": {"code", "message"}}` with a 4xx status. No path from a request touches
//! the filesystem: results live in memory (the newest [`Limits::keep_jobs`] jobs).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{Cancel, Error, FluxPipeline, GenerateRequest};

mod queue;
pub use queue::{run_worker, WorkerOptions};

/// What the service accepts. Every size in a request is checked against these before a job is
/// queued.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Largest width or height, pixels.
    pub max_side: usize,
    /// Most sampling steps.
    pub max_steps: usize,
    /// Most images per request.
    pub max_images: usize,
    /// Longest prompt, bytes.
    pub max_prompt: usize,
    /// Jobs waiting (the running one not counted); one more gets 429.
    pub queue: usize,
    /// Finished jobs whose results are kept (older ones are forgotten).
    pub keep_jobs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 64 << 10,
            max_side: 2048,
            max_steps: 100,
            max_images: 4,
            max_prompt: 4096,
            queue: 16,
            keep_jobs: 64,
        }
    }
}

/// How the service runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (port 0: any free port, see [`Server::addr`]).
    pub addr: SocketAddr,
    /// The bearer token every API route needs; required when `addr` is not loopback.
    pub token: Option<String>,
    /// Request limits.
    pub limits: Limits,
    /// The model's id in `/v1/models`.
    pub model_id: String,
    /// Component files recorded in every PNG (as the CLI records them).
    pub files: BTreeMap<String, String>,
    /// Default image side when a request gives none.
    pub default_size: usize,
}

/// A job's request (the native API's body; the OpenAI route maps onto it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// A client-chosen id (letters, digits, `-`, `_`; at most 64): posting the same id again
    /// returns the same job instead of making another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The prompt.
    pub prompt: String,
    /// True CFG's negative prompt (with `true_cfg_scale` > 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Width in pixels (multiple of 16).
    #[serde(default)]
    pub width: Option<usize>,
    /// Height in pixels (multiple of 16).
    #[serde(default)]
    pub height: Option<usize>,
    /// Sampling steps (model default when absent).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Guidance (dev family).
    #[serde(default)]
    pub guidance: Option<f32>,
    /// Base seed (image `i` uses `seed + i`); random when absent, and reported.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Images.
    #[serde(default)]
    pub n: Option<usize>,
    /// True CFG scale (diffusers' `true_cfg_scale`).
    #[serde(default)]
    pub true_cfg_scale: Option<f32>,
}

/// A job's state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// Being generated.
    Running,
    /// Finished with images.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

impl JobState {
    fn done(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
    const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];
    fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What `GET /api/v1/jobs/{id}` returns, and every progress event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job's id.
    pub id: String,
    /// Its state.
    pub state: JobState,
    /// Seconds since the Unix epoch when it was accepted.
    pub created: u64,
    /// Steps done over all images, and their total (0 until it starts).
    pub step: usize,
    /// All images' steps.
    pub steps: usize,
    /// Seconds left, estimated from the steps so far (running jobs).
    pub eta_seconds: Option<f64>,
    /// The seeds of its images.
    pub seeds: Vec<u64>,
    /// Where its images are (`/api/v1/jobs/{id}/images/{k}`), as they are made.
    pub images: Vec<String>,
    /// Warnings (truncated prompts, ignored guidance).
    pub warnings: Vec<String>,
    /// Why it failed.
    pub error: Option<ApiErrorBody>,
    /// The request.
    pub request: JobRequest,
    /// The latest step's preview, a `data:image/png;base64,…` URL of an eighth of the image's
    /// side (only in progress events asked for with `?preview=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
}

impl JobStatus {
    /// The status without its preview (what status routes return).
    fn public(mut self) -> JobStatus {
        self.preview = None;
        self
    }
}

struct Job {
    status: Mutex<JobStatus>,
    pngs: Mutex<Vec<Arc<Vec<u8>>>>,
    cancel: Cancel,
    events: broadcast::Sender<JobStatus>,
    started: Mutex<Option<Instant>>,
}

impl Job {
    fn new(status: JobStatus) -> Arc<Job> {
        Arc::new(Job {
            status: Mutex::new(status),
            pngs: Mutex::new(vec![]),
            cancel: Cancel::new(),
            events: broadcast::channel(64).0,
            started: Mutex::new(None),
        })
    }
    fn state(&self) -> JobState {
        lock(&self.status).state
    }
    fn snapshot(&self) -> JobStatus {
        lock(&self.status).clone()
    }
    /// Changes the status and tells every listener.
    fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        let snap = {
            let mut s = lock(&self.status);
            f(&mut s);
            s.clone()
        };
        let _ = self.events.send(snap);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Metrics {
    rejected: u64,
    step_seconds: f64,
    steps: u64,
    job_seconds: f64,
    jobs: u64,
}

#[derive(Default)]
struct Queue {
    /// Jobs this process will run (a Redis front's jobs wait in Redis instead).
    waiting: VecDeque<Arc<Job>>,
    jobs: HashMap<String, Arc<Job>>,
    /// Ids in the order they were accepted (for forgetting the oldest finished ones).
    order: VecDeque<String>,
    running: Option<Arc<Job>>,
    closing: bool,
    metrics: Metrics,
}

impl Queue {
    /// Jobs accepted here that have not started.
    fn queued(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.state() == JobState::Queued)
            .count()
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    opts: ServeOptions,
    /// The model's default steps (a Redis front loads no model and does not know them).
    default_steps: Option<usize>,
    /// The Redis queue a front hands its jobs to (none: this process runs them).
    redis: Option<queue::Front>,
}

/// What running a job needs besides the pipeline.
struct Runner {
    default_steps: usize,
    default_size: usize,
    files: BTreeMap<String, String>,
}

/// The JSON body of an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// A stable code (`invalid_request`, `not_found`, `queue_full`, …).
    pub code: String,
    /// What was wrong.
    pub message: String,
}

struct ApiError {
    status: StatusCode,
    body: ApiErrorBody,
    retry_after: Option<u64>,
}

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        body: ApiErrorBody {
            code: code.into(),
            message: message.into(),
        },
        retry_after: None,
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": {
            "code": self.body.code, "message": self.body.message,
            "type": if self.status.is_client_error() { "invalid_request_error" } else { "server_error" },
        }});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        r
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let status = e.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "invalid_json",
        };
        api_error(status, code, e.body_text())
    }
}

/// A running service: [`Server::shutdown`] stops it gracefully.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<std::thread::JoinHandle<()>>,
    runner: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `opts.addr` and starts serving `pipe` (in threads of its own). Fails when the
    /// address is not loopback and no token is set, or the address cannot be bound.
    pub fn start(pipe: FluxPipeline, opts: ServeOptions) -> crate::Result<Server> {
        let runner = Runner {
            default_steps: pipe.default_steps(),
            default_size: opts.default_size,
            files: opts.files.clone(),
        };
        Server::bind(opts, Some(runner.default_steps), None, move |shared| {
            std::thread::spawn(move || run_jobs(pipe, &runner, &shared))
        })
    }

    /// Starts a front that loads no model: it hands its jobs to the Redis queue at `queue`
    /// (`redis://HOST[:PORT][/DB]`), where [`run_worker`] processes take them, and follows
    /// their progress there.
    pub fn start_front(opts: ServeOptions, queue: &str) -> crate::Result<Server> {
        let front = queue::Front::connect(queue)?;
        let url = queue.to_string();
        Server::bind(opts, None, Some(front), move |shared| {
            std::thread::spawn(move || queue::follow(&url, &shared))
        })
    }

    fn bind(
        opts: ServeOptions,
        default_steps: Option<usize>,
        redis: Option<queue::Front>,
        background: impl FnOnce(Arc<Shared>) -> std::thread::JoinHandle<()>,
    ) -> crate::Result<Server> {
        if !opts.addr.ip().is_loopback() && opts.token.as_deref().is_none_or(str::is_empty) {
            return Err(Error::InvalidRequest(format!(
                "serving on {} (not loopback) needs a token: --token or FLUX_API_TOKEN",
                opts.addr
            )));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::Device(format!("cannot start the HTTP runtime: {e}")))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(opts.addr))
            .map_err(|e| Error::InvalidRequest(format!("cannot listen on {}: {e}", opts.addr)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::InvalidRequest(format!("{e}")))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            default_steps,
            redis,
            opts,
        });
        let app = router(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let http = std::thread::spawn(move || {
            rt.block_on(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        let runner = background(shared.clone());
        Ok(Server {
            addr,
            shared,
            stop: Some(stop),
            http: Some(http),
            runner: Some(runner),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops gracefully: no new jobs are accepted, waiting ones are cancelled, the running one
    /// finishes (or is cancelled after `grace`), then the listener closes. A Redis front
    /// cancels nothing: its jobs are in Redis, and the workers finish them.
    pub fn shutdown(mut self, grace: Duration) {
        let running = {
            let mut q = lock(&self.shared.queue);
            q.closing = true;
            for job in std::mem::take(&mut q.waiting) {
                job.update(|s| s.state = JobState::Cancelled);
            }
            q.running.clone()
        };
        self.shared.wake.notify_all();
        if let Some(job) = running {
            let until = Instant::now() + grace;
            while !job.snapshot().state.done() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            job.cancel.cancel();
        }
        if let Some(r) = self.runner.take() {
            let _ = r.join();
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
    }
}

/// The generation thread: one job at a time, until the service closes.
fn run_jobs(mut pipe: FluxPipeline, runner: &Runner, shared: &Shared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(j) = q.waiting.pop_front() {
                    q.running = Some(j.clone());
                    break j;
                }
                if q.closing {
                    return;
                }
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let started = Instant::now();
        let (step_seconds, steps) = run_job(&mut pipe, runner, &job);
        let mut q = lock(&shared.queue);
        q.running = None;
        q.metrics.jobs += 1;
        q.metrics.job_seconds += started.elapsed().as_secs_f64();
        q.metrics.step_seconds += step_seconds;
        q.metrics.steps += steps;
    }
}

/// Generates a job's images, telling its listeners of every step; returns the time spent in
/// sampling steps and their count.
fn run_job(pipe: &mut FluxPipeline, runner: &Runner, job: &Job) -> (f64, u64) {
    *lock(&job.started) = Some(Instant::now());
    let status = job.snapshot();
    let r = &status.request;
    let n = status.seeds.len();
    let steps = r.steps.unwrap_or(runner.default_steps);
    job.update(|s| {
        s.state = JobState::Running;
        s.steps = steps * n;
    });
    let req = GenerateRequest {
        prompts: vec![r.prompt.clone()],
        width: r.width.unwrap_or(runner.default_size),
        height: r.height.unwrap_or(runner.default_size),
        steps: r.steps,
        guidance: r.guidance,
        seeds: status.seeds.clone(),
        num_images: n,
        negative_prompt: r.negative_prompt.clone(),
        true_cfg: r.true_cfg_scale.unwrap_or(1.0),
        cancel: Some(job.cancel.clone()),
        ..Default::default()
    };
    let mut last = Instant::now();
    let mut step_time = (0.0f64, 0u64);
    let (width, height) = (req.width, req.height);
    let result = pipe.generate_each(
        &req,
        |p, latent| {
            let preview = preview_url(latent, height, width);
            let done = p.image * p.steps + p.step + 1;
            let dt = last.elapsed().as_secs_f64();
            last = Instant::now();
            step_time.0 += dt;
            step_time.1 += 1;
            let started = *lock(&job.started);
            job.update(|s| {
                s.step = done;
                s.steps = p.steps * p.images;
                s.eta_seconds = started
                    .map(|t| t.elapsed().as_secs_f64() / done as f64 * (s.steps - done) as f64);
                s.preview = preview;
            });
        },
        |g| {
            let mut params = g.params.clone();
            params.files = runner.files.clone();
            let png = crate::png_bytes(&g.rgb, &params)?;
            let k = {
                let mut v = lock(&job.pngs);
                v.push(Arc::new(png));
                v.len() - 1
            };
            job.update(|s| s.images.push(format!("/api/v1/jobs/{}/images/{k}", s.id)));
            Ok(())
        },
    );
    match result {
        Ok(out) => job.update(|s| {
            s.preview = None;
            s.state = JobState::Succeeded;
            s.eta_seconds = Some(0.0);
            s.warnings = out.warnings;
        }),
        Err(Error::Cancelled) => job.update(|s| s.state = JobState::Cancelled),
        Err(e) => job.update(|s| {
            s.state = JobState::Failed;
            s.error = Some(ApiErrorBody {
                code: match e {
                    Error::InvalidRequest(_) => "invalid_request",
                    _ => "generation_failed",
                }
                .into(),
                message: e.to_string(),
            });
        }),
    }
    step_time
}

/// A step's latent preview as a PNG data URL (none when it cannot be made).
fn preview_url(latent: &candle::Tensor, height: usize, width: usize) -> Option<String> {
    use base64::Engine as _;
    let img = crate::latent_preview(latent, height, width).ok()?;
    let png = crate::plain_png(&img).ok()?;
    Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/images/generations", post(openai_generate))
        .route("/api/v1/jobs", post(submit).get(list_jobs))
        .route("/api/v1/jobs/{id}", get(job_status).delete(cancel_job))
        .route("/api/v1/jobs/{id}/events", get(job_events))
        .route("/api/v1/jobs/{id}/images/{k}", get(job_image))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .merge(api)
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            api_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(shared.opts.limits.max_body))
        .with_state(shared)
}

/// Constant-time comparison of the bearer token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn auth(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = shared.opts.token.as_deref() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this service needs `Authorization: Bearer <token>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The web page (the API calls it makes carry the token the user types).
async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../web/index.html"),
    )
        .into_response()
}

async fn health(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let q = lock(&shared.queue);
    Json(serde_json::json!({
        "status": if q.closing { "closing" } else { "ok" },
        "model": shared.opts.model_id,
        "queued": q.queued(),
        "queue": if shared.redis.is_some() { "redis" } else { "local" },
        "running": q.running.is_some(),
        "auth": shared.opts.token.is_some(),
        "default_size": shared.opts.default_size,
        "default_steps": shared.default_steps,
        "limits": {
            "max_side": shared.opts.limits.max_side,
            "max_steps": shared.opts.limits.max_steps,
            "max_images": shared.opts.limits.max_images,
            "max_prompt": shared.opts.limits.max_prompt,
        },
    }))
}

async fn models(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "object": "list", "data": [{
        "id": shared.opts.model_id, "object": "model", "created": now(), "owned_by": "flux",
    }]}))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks a request against the limits.
fn check(r: &JobRequest, l: &Limits) -> Result<(), ApiError> {
    if let Some(id) = &r.id {
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("`id`: 1 to 64 letters, digits, `-` or `_`"));
        }
    }
    for (what, p) in [
        ("prompt", Some(&r.prompt)),
        ("negative_prompt", r.negative_prompt.as_ref()),
    ] {
        let Some(p) = p else { continue };
        if p.len() > l.max_prompt {
            return Err(bad(format!(
                "`{what}` is {} bytes; at most {}",
                p.len(),
                l.max_prompt
            )));
        }
        if p.contains('\0') {
            return Err(bad(format!("`{what}` contains a NUL character")));
        }
    }
    if r.prompt.trim().is_empty() {
        return Err(bad("`prompt` is empty"));
    }
    for (what, v) in [("width", r.width), ("height", r.height)] {
        if let Some(v) = v {
            if v == 0 || v % 16 != 0 || v > l.max_side {
                return Err(bad(format!(
                    "`{what}` {v}: a multiple of 16 from 16 to {}",
                    l.max_side
                )));
            }
        }
    }
    if let Some(s) = r.steps {
        if s == 0 || s > l.max_steps {
            return Err(bad(format!("`steps` {s}: 1 to {}", l.max_steps)));
        }
    }
    if let Some(n) = r.n {
        if n == 0 || n > l.max_images {
            return Err(bad(format!("`n` {n}: 1 to {}", l.max_images)));
        }
    }
    if let Some(g) = r.guidance {
        if !g.is_finite() || !(0.0..=100.0).contains(&g) {
            return Err(bad(format!("`guidance` {g}: 0 to 100")));
        }
    }
    if let Some(c) = r.true_cfg_scale {
        if !c.is_finite() || !(1.0..=30.0).contains(&c) {
            return Err(bad(format!("`true_cfg_scale` {c}: 1 to 30")));
        }
    }
    Ok(())
}

/// Checks and queues a request; an existing id returns its job (and `false`).
fn enqueue(shared: &Shared, mut r: JobRequest) -> Result<(Arc<Job>, bool), ApiError> {
    check(&r, &shared.opts.limits)?;
    // the size is fixed here (not by whichever worker runs it)
    r.width.get_or_insert(shared.opts.default_size);
    r.height.get_or_insert(shared.opts.default_size);
    let mut q = lock(&shared.queue);
    if let Some(id) = &r.id {
        if let Some(job) = q.jobs.get(id) {
            if job.snapshot().request != r {
                return Err(api_error(
                    StatusCode::CONFLICT,
                    "id_in_use",
                    format!("a different job has the id `{id}`"),
                ));
            }
            return Ok((job.clone(), false));
        }
    }
    if q.closing {
        return Err(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the service is shutting down",
        ));
    }
    let queued = q.queued();
    if queued >= shared.opts.limits.queue {
        q.metrics.rejected += 1;
        let per_job = match q.metrics.jobs {
            0 => 1.0,
            n => q.metrics.job_seconds / n as f64,
        };
        let mut e = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("{queued} jobs are waiting; try again later"),
        );
        e.retry_after = Some((per_job * queued as f64).ceil().max(1.0) as u64);
        return Err(e);
    }
    let id = r.id.clone().unwrap_or_else(new_id);
    let base = r.seed.unwrap_or_else(random_seed);
    let n = r.n.unwrap_or(1);
    let status = JobStatus {
        id: id.clone(),
        state: JobState::Queued,
        created: now(),
        step: 0,
        steps: 0,
        eta_seconds: None,
        seeds: (0..n as u64).map(|i| base.wrapping_add(i)).collect(),
        images: vec![],
        warnings: vec![],
        error: None,
        request: r,
        preview: None,
    };
    let mut new = true;
    let job = match &shared.redis {
        None => {
            let job = Job::new(status);
            q.waiting.push_back(job.clone());
            job
        }
        // the id may be known to Redis (another front, or forgotten here)
        Some(front) => match front.submit(&status).map_err(unavailable)? {
            None => Job::new(status),
            Some(old) if old.request == status.request => {
                new = false;
                let job = Job::new(old);
                front.fetch_images(&job).map_err(unavailable)?;
                job
            }
            Some(_) => {
                return Err(api_error(
                    StatusCode::CONFLICT,
                    "id_in_use",
                    format!("a different job has the id `{id}`"),
                ))
            }
        },
    };
    q.jobs.insert(id.clone(), job.clone());
    q.order.push_back(id);
    // forget the oldest finished jobs beyond the limit
    let keep = shared.opts.limits.keep_jobs.max(1);
    while q.order.len() > keep + shared.opts.limits.queue + 1 {
        let Some(pos) = q
            .order
            .iter()
            .position(|i| q.jobs.get(i).is_none_or(|j| j.state().done()))
        else {
            break;
        };
        if let Some(old) = q.order.remove(pos) {
            q.jobs.remove(&old);
        }
    }
    drop(q);
    shared.wake.notify_one();
    Ok((job, new))
}

/// The Redis queue did not answer.
fn unavailable(e: Error) -> ApiError {
    let mut e = api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "queue_unavailable",
        format!("the job queue is unavailable: {e}"),
    );
    e.retry_after = Some(5);
    e
}

fn new_id() -> String {
    format!("job-{:016x}", random_seed())
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<JobRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(r) = body?;
    let (job, new) = enqueue(&shared, r)?;
    let status = if new {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job.snapshot().public())).into_response())
}

fn find(shared: &Shared, id: &str) -> Result<Arc<Job>, ApiError> {
    lock(&shared.queue).jobs.get(id).cloned().ok_or_else(|| {
        api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job `{id:.64}`"),
        )
    })
}

async fn list_jobs(State(shared): State<Arc<Shared>>) -> Json<Vec<JobStatus>> {
    let q = lock(&shared.queue);
    Json(
        q.order
            .iter()
            .filter_map(|i| q.jobs.get(i))
            .map(|j| j.snapshot().public())
            .collect(),
    )
}

async fn job_status(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    Ok(Json(find(&shared, &id)?.snapshot().public()))
}

async fn cancel_job(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let job = find(&shared, &id)?;
    if let Some(front) = &shared.redis {
        // a waiting job is cancelled in Redis at once; a running one by its worker
        if !job.state().done() {
            front.cancel(&job).map_err(unavailable)?;
        }
    } else {
        // a waiting job leaves the queue at once
        let mut q = lock(&shared.queue);
        if let Some(pos) = q.waiting.iter().position(|j| Arc::ptr_eq(j, &job)) {
            q.waiting.remove(pos);
            job.update(|s| s.state = JobState::Cancelled);
        }
    }
    job.cancel.cancel();
    Ok(Json(job.snapshot().public()))
}

/// `?preview=true` on the events route.
#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    preview: bool,
}

async fn job_events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(EventsQuery { preview }) =
        query.map_err(|e| bad(format!("the query: {}", e.body_text())))?;
    let job = find(&shared, &id)?;
    let rx = job.events.subscribe();
    let first = job.snapshot();
    let stream = futures_util::stream::unfold(
        (Some(first), rx, false),
        move |(first, mut rx, over)| async move {
            if over {
                return None;
            }
            let snap = match first {
                Some(s) => s,
                None => loop {
                    match rx.recv().await {
                        Ok(s) => break s,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                },
            };
            let done = snap.state.done();
            let snap = if preview { snap } else { snap.public() };
            let ev = SseEvent::default()
                .event(if done { "done" } else { "progress" })
                .json_data(&snap)
                .unwrap_or_default();
            Some((Ok::<_, std::convert::Infallible>(ev), (None, rx, done)))
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn job_image(
    State(shared): State<Arc<Shared>>,
    Path((id, k)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = find(&shared, &id)?;
    let k: usize = k
        .strip_suffix(".png")
        .unwrap_or(&k)
        .parse()
        .map_err(|_| bad("the image index is a number"))?;
    let png = lock(&job.pngs).get(k).cloned().ok_or_else(|| {
        api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("job `{id}` has no image {k} (yet)"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png.to_vec()).into_response())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let q = lock(&shared.queue);
    let mut by_state: HashMap<JobState, usize> = HashMap::new();
    for j in q.jobs.values() {
        *by_state.entry(j.state()).or_default() += 1;
    }
    let mut t = String::new();
    t += "# HELP flux_queue_depth Jobs waiting.\n# TYPE flux_queue_depth gauge\n";
    t += &format!("flux_queue_depth {}\n", q.queued());
    t += "# HELP flux_jobs Jobs kept, by state.\n# TYPE flux_jobs gauge\n";
    for s in JobState::ALL {
        t += &format!(
            "flux_jobs{{state=\"{}\"}} {}\n",
            s.name(),
            by_state.get(&s).copied().unwrap_or(0)
        );
    }
    t += "# HELP flux_rejected_total Requests refused with 429.\n# TYPE flux_rejected_total counter\n";
    t += &format!("flux_rejected_total {}\n", q.metrics.rejected);
    t += "# HELP flux_step_seconds Sampling step time.\n# TYPE flux_step_seconds summary\n";
    t += &format!(
        "flux_step_seconds_sum {}\nflux_step_seconds_count {}\n",
        q.metrics.step_seconds, q.metrics.steps
    );
    t += "# HELP flux_job_seconds Job time.\n# TYPE flux_job_seconds summary\n";
    t += &format!(
        "flux_job_seconds_sum {}\nflux_job_seconds_count {}\n",
        q.metrics.job_seconds, q.metrics.jobs
    );
    if let Some(b) = crate::peak_rss() {
        t += "# HELP flux_peak_memory_bytes Peak resident memory.\n# TYPE flux_peak_memory_bytes gauge\n";
        t += &format!("flux_peak_memory_bytes {b}\n");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], t).into_response()
}

/// OpenAI's images API body (fields it documents that do not apply here are accepted and
/// ignored: `quality`, `style`, `user`).
#[derive(Debug, Deserialize)]
struct OpenAiRequest {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    guidance: Option<f32>,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    true_cfg_scale: Option<f32>,
}

fn parse_size(s: &str) -> Result<(usize, usize), ApiError> {
    let err = || bad(format!("`size` `{s:.32}`: WIDTHxHEIGHT, e.g. 1024x1024"));
    let (w, h) = s.split_once('x').ok_or_else(err)?;
    Ok((w.parse().map_err(|_| err())?, h.parse().map_err(|_| err())?))
}

async fn openai_generate(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Json<OpenAiRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(o) = body?;
    if let Some(m) = o.model.as_deref() {
        if m != shared.opts.model_id && m != "flux" {
            return Err(api_error(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "model `{m:.64}` is not served here; this serves `{}`",
                    shared.opts.model_id
                ),
            ));
        }
    }
    let url = match o.response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(f) => return Err(bad(format!("`response_format` `{f:.32}`: b64_json or url"))),
    };
    let (width, height) = match &o.size {
        Some(s) => {
            let (w, h) = parse_size(s)?;
            (Some(w), Some(h))
        }
        None => (None, None),
    };
    let r = JobRequest {
        id: None,
        prompt: o.prompt,
        negative_prompt: o.negative_prompt,
        width,
        height,
        steps: o.steps,
        guidance: o.guidance,
        seed: o.seed,
        n: o.n,
        true_cfg_scale: o.true_cfg_scale,
    };
    let (job, _) = enqueue(&shared, r)?;
    let mut rx = job.events.subscribe();
    // wait for the end; a client that goes away cancels the job
    struct CancelOnDrop(Arc<Job>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            if !self.0.snapshot().state.done() {
                self.0.cancel.cancel();
            }
        }
    }
    let guard = CancelOnDrop(job.clone());
    while !job.snapshot().state.done() {
        if let Err(broadcast::error::RecvError::Closed) = rx.recv().await {
            break;
        }
    }
    drop(guard);
    let s = job.snapshot();
    match s.state {
        JobState::Succeeded => {}
        JobState::Cancelled => {
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cancelled",
                "the job was cancelled",
            ))
        }
        _ => {
            let e = s.error.unwrap_or(ApiErrorBody {
                code: "generation_failed".into(),
                message: "the generation failed".into(),
            });
            let status = if e.code == "invalid_request" {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return Err(api_error(status, &e.code, e.message));
        }
    }
    use base64::Engine as _;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let pngs = lock(&job.pngs).clone();
    let data: Vec<serde_json::Value> = pngs
        .iter()
        .enumerate()
        .map(|(k, png)| {
            let mut item =
                serde_json::json!({ "revised_prompt": s.request.prompt, "seed": s.seeds.get(k) });
            if url {
                item["url"] = format!("http://{host}/api/v1/jobs/{}/images/{k}.png", s.id).into();
            } else {
                item["b64_json"] = base64::engine::general_purpose::STANDARD
                    .encode(png.as_slice())
                    .into();
            }
            item
        })
        .collect();
    Ok(Json(serde_json::json!({ "created": s.created, "data": data, "id": s.id })).into_response())
}
