//! `flux serve` on the committed tiny model, called over loopback HTTP.

use std::path::Path;
use std::time::{Duration, Instant};

use flux_pipeline::serve::{Limits, ServeOptions, Server};
use flux_pipeline::{FluxPipeline, ModelSource, PipelineOptions};
use serde_json::Value;

pub fn tiny() -> FluxPipeline {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny-dev");
    let files = ModelSource::Folder(dir).resolve().unwrap();
    let opts = PipelineOptions {
        keep_loaded: true,
        ..Default::default()
    };
    FluxPipeline::new(files, opts).unwrap()
}

pub fn start(limits: Limits, token: Option<&str>) -> Server {
    Server::start(
        tiny(),
        ServeOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: token.map(String::from),
            limits,
            model_id: "tiny-dev".into(),
            files: Default::default(),
            default_size: 64,
        },
    )
    .unwrap()
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// (status, headers' Retry-After, body bytes)
pub fn call(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    token: Option<&str>,
) -> (u16, Option<String>, Vec<u8>) {
    let url = format!("http://{}{path}", server.addr());
    let req = ureq::http::Request::builder().method(method).uri(&url);
    let req = match token {
        Some(t) => req.header("authorization", format!("Bearer {t}")),
        None => req,
    };
    let resp = match body {
        Some((ct, b)) => agent().run(req.header("content-type", ct).body(b.to_vec()).unwrap()),
        None => agent().run(req.body(()).unwrap()),
    };
    let mut resp = resp.unwrap();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let status = resp.status().as_u16();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap();
    (status, retry, bytes)
}

pub fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let text = body.to_string();
    let (s, _, b) = call(
        server,
        "POST",
        path,
        Some(("application/json", text.as_bytes())),
        None,
    );
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

pub fn get(server: &Server, path: &str) -> (u16, Value) {
    let (s, _, b) = call(server, "GET", path, None, None);
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

pub fn wait_done(server: &Server, id: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, v) = get(server, &format!("/api/v1/jobs/{id}"));
        assert_eq!(s, 200, "{v}");
        if ["succeeded", "failed", "cancelled"].contains(&v["state"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < until, "job {id} did not finish: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resident memory now (Linux), bytes.
pub fn current_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
