//! Scale-out over Redis: a front (`flux serve --queue redis://…`) puts jobs on a Stream;
//! workers (`flux worker`) take them through a consumer group, run them, and report progress
//! and results back through Redis.
//!
//! Keys:
//! - `flux:jobs`: the Stream of job ids; consumer group `flux-workers`.
//! - `flux:job:{id}`: a hash: `status` (the [`JobStatus`] as JSON), `state`, `owner` (the worker
//!   running it), `attempts`, `cancel`; kept [`KEEP_SECONDS`] after the job ends.
//! - `flux:image:{id}:{k}`: image `k` as PNG, kept as long.
//! - `flux:events`: a capped Stream of every status change (`id`, `status`), which fronts follow.
//!
//! A worker renews its claim on the entry it runs every [`WorkerOptions::claim_timeout`] / 3
//! (at most every second); an entry left idle longer (its worker died) is taken over by
//! another worker with XAUTOCLAIM and run again from the start. Only the hash's `owner` may
//! change a job's status, so a job ends once whoever ran it; a job whose workers died
//! [`WorkerOptions::max_attempts`] times fails instead of being tried forever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{Connection, Script};

use super::{lock, ApiErrorBody, Job, JobState, JobStatus, Runner, Shared};
use crate::{Cancel, Error, FluxPipeline};

const STREAM: &str = "flux:jobs";
const GROUP: &str = "flux-workers";
const EVENTS: &str = "flux:events";
/// Seconds a finished job's status and images stay in Redis.
pub const KEEP_SECONDS: u64 = 3600;
/// Status changes kept in `flux:events` (approximately).
const EVENTS_KEPT: usize = 2000;

fn job_key(id: &str) -> String {
    format!("flux:job:{id}")
}

fn image_key(id: &str, k: usize) -> String {
    format!("flux:image:{id}:{k}")
}

fn redis_error(what: &str, e: redis::RedisError) -> Error {
    Error::Queue(format!("{what}: {e}"))
}

fn connect(url: &str) -> crate::Result<Connection> {
    let client = redis::Client::open(url).map_err(|e| {
        Error::Queue(format!(
            "`{url}` is not a Redis URL (redis://HOST[:PORT][/DB]): {e}"
        ))
    })?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(|e| redis_error(&format!("cannot reach the queue at {url}"), e))?;
    con.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| redis_error("queue connection", e))?;
    // the group reads the stream from its start, so jobs queued before any worker are kept
    let made: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut con);
    match made {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(redis_error("creating the job group", e)),
        _ => Ok(con),
    }
}

/// Runs blocking Redis work from an HTTP handler without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(f),
        Err(_) => f(),
    }
}

fn json(s: &JobStatus) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// A front's connection to the queue.
pub(super) struct Front {
    con: Mutex<Connection>,
}

impl Front {
    pub(super) fn connect(url: &str) -> crate::Result<Front> {
        Ok(Front {
            con: Mutex::new(connect(url)?),
        })
    }

    /// Queues a new job; returns the status of the job that already has its id, if one does.
    pub(super) fn submit(&self, status: &JobStatus) -> crate::Result<Option<JobStatus>> {
        let script = Script::new(
            r"if redis.call('EXISTS', KEYS[1]) == 1 then
                return redis.call('HGET', KEYS[1], 'status')
              end
              redis.call('HSET', KEYS[1], 'status', ARGV[1], 'state', 'queued')
              redis.call('XADD', KEYS[2], '*', 'id', ARGV[2])
              return false",
        );
        let old: Option<String> = blocking(|| {
            script
                .key(job_key(&status.id))
                .key(STREAM)
                .arg(json(status))
                .arg(&status.id)
                .invoke(&mut *lock(&self.con))
        })
        .map_err(|e| redis_error("queueing the job", e))?;
        old.map(|o| {
            serde_json::from_str(&o)
                .map_err(|e| Error::Queue(format!("job `{}` in Redis: {e}", status.id)))
        })
        .transpose()
    }

    /// Cancels a job: a waiting one at once (and tells every front), a running one through its
    /// hash's `cancel` field, which its worker watches.
    pub(super) fn cancel(&self, job: &Job) -> crate::Result<()> {
        let mut s = job.snapshot().public();
        s.state = JobState::Cancelled;
        let script = Script::new(
            r"if redis.call('HGET', KEYS[1], 'state') == 'queued' then
                redis.call('HSET', KEYS[1], 'state', 'cancelled', 'status', ARGV[1])
                redis.call('EXPIRE', KEYS[1], ARGV[3])
                redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[2], 'status', ARGV[1])
                return 1
              end
              redis.call('HSET', KEYS[1], 'cancel', '1')
              return 0",
        );
        let _: i64 = blocking(|| {
            script
                .key(job_key(&s.id))
                .key(EVENTS)
                .arg(json(&s))
                .arg(&s.id)
                .arg(KEEP_SECONDS)
                .arg(EVENTS_KEPT)
                .invoke(&mut *lock(&self.con))
        })
        .map_err(|e| redis_error("cancelling the job", e))?;
        Ok(())
    }

    /// Loads the images of a job found in Redis.
    pub(super) fn fetch_images(&self, job: &Job) -> crate::Result<()> {
        let s = job.snapshot();
        blocking(|| fetch_images(&mut lock(&self.con), job, &s))
    }
}

/// Fetches the images `status` names that `job` lacks.
fn fetch_images(con: &mut Connection, job: &Job, status: &JobStatus) -> crate::Result<()> {
    let have = lock(&job.pngs).len();
    for k in have..status.images.len() {
        let png: Option<Vec<u8>> = redis::cmd("GET")
            .arg(image_key(&status.id, k))
            .query(con)
            .map_err(|e| redis_error("reading an image", e))?;
        match png {
            Some(p) => lock(&job.pngs).push(Arc::new(p)),
            None => break,
        }
    }
    Ok(())
}

/// Applies a status read from Redis to the front's copy of the job.
fn apply(con: &mut Connection, shared: &Shared, mut status: JobStatus) -> crate::Result<()> {
    let Some(job) = lock(&shared.queue).jobs.get(&status.id).cloned() else {
        return Ok(());
    };
    if job.state().done() {
        return Ok(());
    }
    fetch_images(con, &job, &status)?;
    // name only the images this front can serve
    let have = lock(&job.pngs).len();
    status.images.truncate(have);
    if status.state == JobState::Running && job.state() == JobState::Queued {
        *lock(&job.started) = Some(Instant::now());
    }
    let done = status.state.done();
    job.update(|s| *s = status);
    if done {
        let took = lock(&job.started).map(|t| t.elapsed().as_secs_f64());
        let mut q = lock(&shared.queue);
        q.metrics.jobs += 1;
        q.metrics.job_seconds += took.unwrap_or(0.0);
    }
    Ok(())
}

/// A front's follower: applies every status change in `flux:events` to its jobs, and every few
/// seconds reads the unfinished ones' hashes (so nothing is missed across a lost connection or
/// a trimmed event stream), until the service closes.
pub(super) fn follow(url: &str, shared: &Shared) {
    let mut last = "$".to_string();
    let mut con: Option<Connection> = None;
    let mut synced = None;
    loop {
        if lock(&shared.queue).closing {
            return;
        }
        let c = match con.as_mut() {
            Some(c) => c,
            None => match connect(url) {
                Ok(c) => {
                    synced = None;
                    con.insert(c)
                }
                Err(e) => {
                    eprintln!("flux serve: {e}; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let r = follow_once(c, shared, &mut last, &mut synced);
        if let Err(e) = r {
            eprintln!("flux serve: following the queue: {e}; reconnecting");
            con = None;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn follow_once(
    con: &mut Connection,
    shared: &Shared,
    last: &mut String,
    synced: &mut Option<Instant>,
) -> crate::Result<()> {
    if synced.is_none_or(|t| t.elapsed() > Duration::from_secs(3)) {
        *synced = Some(Instant::now());
        let open: Vec<String> = {
            let q = lock(&shared.queue);
            q.jobs
                .iter()
                .filter(|(_, j)| !j.state().done())
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in open {
            let s: Option<String> = redis::cmd("HGET")
                .arg(job_key(&id))
                .arg("status")
                .query(con)
                .map_err(|e| redis_error("reading a job", e))?;
            if let Some(s) = s.and_then(|s| serde_json::from_str(&s).ok()) {
                apply(con, shared, s)?;
            }
        }
    }
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(100)
        .arg("BLOCK")
        .arg(500)
        .arg("STREAMS")
        .arg(EVENTS)
        .arg(&*last)
        .query(con)
        .map_err(|e| redis_error("reading progress", e))?;
    for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
        *last = entry.id.clone();
        let status: Option<String> = entry.get("status");
        if let Some(s) = status.and_then(|s| serde_json::from_str(&s).ok()) {
            apply(con, shared, s)?;
        }
    }
    Ok(())
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The queue, `redis://HOST[:PORT][/DB]`.
    pub queue: String,
    /// This worker's consumer name (unique among the workers).
    pub name: String,
    /// How long a job's entry may go without its worker's heartbeat before another worker
    /// takes it over.
    pub claim_timeout: Duration,
    /// Runs of a job (its workers having died) after which it fails.
    pub max_attempts: u32,
    /// Image side when a request gives none (fronts normally fill it in).
    pub default_size: usize,
    /// Component files recorded in every PNG.
    pub files: std::collections::BTreeMap<String, String>,
    /// Raised to stop after the running job.
    pub stop: Cancel,
}

/// A worker: takes jobs from the queue one at a time and runs them on `pipe`, until
/// `opts.stop` is raised (the running job is finished first).
pub fn run_worker(mut pipe: FluxPipeline, opts: &WorkerOptions) -> crate::Result<()> {
    let runner = Runner {
        default_steps: pipe.default_steps(),
        default_size: opts.default_size,
        files: opts.files.clone(),
    };
    // a queue that cannot be reached at the start is an error; later, it is waited for
    let mut con = Some(connect(&opts.queue)?);
    while !opts.stop.is_cancelled() {
        let Some(c) = con.as_mut() else {
            std::thread::sleep(Duration::from_secs(1));
            match connect(&opts.queue) {
                Ok(c) => con = Some(c),
                Err(e) => eprintln!("flux worker {}: {e}; retrying", opts.name),
            }
            continue;
        };
        let r = next_entry(c, opts)
            .and_then(|e| e.map_or(Ok(()), |e| run_entry(&mut pipe, &runner, c, opts, &e)));
        if let Err(e) = r {
            // a job left unacknowledged is run again after the claim timeout
            eprintln!("flux worker {}: {e}; reconnecting", opts.name);
            con = None;
        }
    }
    Ok(())
}

/// An entry another worker left idle too long, else a new one (waiting up to a second).
fn next_entry(con: &mut Connection, opts: &WorkerOptions) -> crate::Result<Option<StreamId>> {
    let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(STREAM)
        .arg(GROUP)
        .arg(&opts.name)
        .arg(opts.claim_timeout.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(1)
        .query(con)
        .map_err(|e| redis_error("reclaiming jobs", e))?;
    if let Some(e) = claimed.claimed.into_iter().next() {
        return Ok(Some(e));
    }
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(&opts.name)
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(1000)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(con)
        .map_err(|e| redis_error("reading jobs", e))?;
    Ok(reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .next())
}

/// Publishes a status if this worker still owns the job; `false` when it does not.
fn publish(con: &mut Connection, owner: &str, s: &JobStatus) -> crate::Result<bool> {
    let script = Script::new(
        r"if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
          redis.call('HSET', KEYS[1], 'state', ARGV[2], 'status', ARGV[3])
          redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'id', ARGV[4], 'status', ARGV[3])
          if ARGV[5] == '1' then redis.call('EXPIRE', KEYS[1], ARGV[7]) end
          return 1",
    );
    let state = serde_json::to_value(s.state).unwrap_or_default();
    let ok: i64 = script
        .key(job_key(&s.id))
        .key(EVENTS)
        .arg(owner)
        .arg(state.as_str().unwrap_or_default())
        .arg(json(s))
        .arg(&s.id)
        .arg(if s.state.done() { "1" } else { "0" })
        .arg(EVENTS_KEPT)
        .arg(KEEP_SECONDS)
        .invoke(con)
        .map_err(|e| redis_error("publishing progress", e))?;
    Ok(ok == 1)
}

fn ack(con: &mut Connection, entry: &str) -> crate::Result<()> {
    let _: i64 = redis::cmd("XACK")
        .arg(STREAM)
        .arg(GROUP)
        .arg(entry)
        .query(con)
        .map_err(|e| redis_error("acknowledging a job", e))?;
    Ok(())
}

/// Runs one stream entry's job (or skips it when it is over), then acknowledges it.
fn run_entry(
    pipe: &mut FluxPipeline,
    runner: &Runner,
    con: &mut Connection,
    opts: &WorkerOptions,
    entry: &StreamId,
) -> crate::Result<()> {
    let Some(id) = entry.get::<String>("id") else {
        return ack(con, &entry.id);
    };
    // take the job unless it is over (finished, cancelled while waiting, or expired)
    let claim = Script::new(
        r"local st = redis.call('HGET', KEYS[1], 'state')
          if st ~= 'queued' and st ~= 'running' then return false end
          local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
          redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'state', 'running')
          return {redis.call('HGET', KEYS[1], 'status'), n, redis.call('HGET', KEYS[1], 'cancel') or ''}",
    );
    let taken: Option<(String, u32, String)> = claim
        .key(job_key(&id))
        .arg(&opts.name)
        .invoke(con)
        .map_err(|e| redis_error("taking a job", e))?;
    let Some((status, attempts, cancel)) = taken else {
        return ack(con, &entry.id);
    };
    let mut status: JobStatus = match serde_json::from_str(&status) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flux worker: job `{id}` is unreadable ({e}); dropped");
            return ack(con, &entry.id);
        }
    };
    if attempts > opts.max_attempts.max(1) || !cancel.is_empty() {
        if !cancel.is_empty() {
            status.state = JobState::Cancelled;
        } else {
            status.state = JobState::Failed;
            status.error = Some(ApiErrorBody {
                code: "worker_lost".into(),
                message: format!(
                    "the workers running this job stopped {} times; it was given up",
                    attempts - 1
                ),
            });
        }
        publish(con, &opts.name, &status)?;
        return ack(con, &entry.id);
    }
    let job = Job::new(status);
    let started = Instant::now();
    let rx = job.events.subscribe();
    let done = Arc::new(AtomicBool::new(false));
    let beat = {
        let (url, name, entry, cancel, done, timeout) = (
            opts.queue.clone(),
            opts.name.clone(),
            entry.id.clone(),
            job.cancel.clone(),
            done.clone(),
            opts.claim_timeout,
        );
        let key = job_key(&id);
        std::thread::spawn(move || heartbeat(&url, &name, &entry, &key, &cancel, &done, timeout))
    };
    let forward = {
        let (url, name, job) = (opts.queue.clone(), opts.name.clone(), job.clone());
        std::thread::spawn(move || forward(&url, &name, &job, rx))
    };
    super::run_job(pipe, runner, &job);
    let forwarded = forward.join();
    done.store(true, Ordering::Relaxed);
    let _ = beat.join();
    match forwarded {
        Ok(Ok(true)) => {}
        // taken over: the entry is the other worker's to acknowledge
        Ok(Ok(false)) => return Ok(()),
        // the entry stays pending: a worker runs it again after the claim timeout
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(Error::Queue("the progress thread panicked".into())),
    }
    let s = job.snapshot();
    eprintln!(
        "flux worker {}: job {id} {} in {:.1} s",
        opts.name,
        serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    ack(con, &entry.id)
}

/// Keeps the job's entry claimed and watches its `cancel` field while it runs.
fn heartbeat(
    url: &str,
    name: &str,
    entry: &str,
    key: &str,
    cancel: &Cancel,
    done: &AtomicBool,
    timeout: Duration,
) {
    let every = (timeout / 3).min(Duration::from_secs(1));
    let mut con = None;
    while !done.load(Ordering::Relaxed) {
        if con.is_none() {
            con = connect(url).ok();
        }
        if let Some(c) = con.as_mut() {
            let r: redis::RedisResult<(redis::Value, Option<String>)> = redis::pipe()
                .cmd("XCLAIM")
                .arg(STREAM)
                .arg(GROUP)
                .arg(name)
                .arg(0)
                .arg(entry)
                .arg("JUSTID")
                .cmd("HGET")
                .arg(key)
                .arg("cancel")
                .query(c);
            match r {
                Ok((_, Some(_))) => cancel.cancel(),
                Ok(_) => {}
                Err(_) => con = None,
            }
        }
        let until = Instant::now() + every;
        while Instant::now() < until && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends the job's status changes (and its images, before the status that names them) to
/// Redis until it ends; a job taken over by another worker is cancelled here (`false`).
fn forward(
    url: &str,
    name: &str,
    job: &Job,
    mut rx: tokio::sync::broadcast::Receiver<JobStatus>,
) -> crate::Result<bool> {
    use tokio::sync::broadcast::error::RecvError;
    let mut con = connect(url)?;
    let mut sent = 0;
    loop {
        let s = match rx.blocking_recv() {
            Ok(s) => s,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return Ok(true),
        };
        let pngs = lock(&job.pngs).clone();
        for (k, png) in pngs.iter().enumerate().skip(sent) {
            let _: () = redis::cmd("SET")
                .arg(image_key(&s.id, k))
                .arg(png.as_slice())
                .arg("EX")
                .arg(KEEP_SECONDS)
                .query(&mut con)
                .map_err(|e| redis_error("storing an image", e))?;
            sent = k + 1;
        }
        if !publish(&mut con, name, &s)? {
            eprintln!(
                "flux worker {name}: job {} was taken over; stopping it",
                s.id
            );
            job.cancel.cancel();
            return Ok(false);
        }
        if s.state.done() {
            return Ok(true);
        }
    }
}
