//! `flux serve` on the committed tiny model: every route, every class of bad input, the queue
//! limit, cancellation, the token, graceful shutdown, the web page in a browser, Redis
//! workers (the load run is `load.rs`, a process of its own so that its memory is its own).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use flux_pipeline::serve::{Limits, ServeOptions, Server};
use serde_json::{json, Value};

mod common;
use common::http::*;

/// The PNG decodes and carries the CLI's metadata.
fn check_png(bytes: &[u8], prompt: &str, seed: u64) {
    let dir = flux_golden::scratch_dir(&format!("serve-{seed}"));
    let path = dir.join("x.png");
    std::fs::write(&path, bytes).unwrap();
    let png = flux_pipeline::read_png(&path).unwrap();
    let p = png.params.expect("the PNG records its parameters");
    assert_eq!((p.prompt.as_str(), p.seed), (prompt, seed));
    assert_eq!((png.image.width, png.image.height), (64, 64));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn openai_and_jobs_routes() {
    let server = start(Limits::default(), None);
    let (s, h) = get(&server, "/health");
    assert_eq!((s, h["status"].as_str()), (200, Some("ok")));
    assert_eq!(
        (h["default_size"].as_u64(), h["auth"].as_bool()),
        (Some(64), Some(false))
    );
    let (s, m) = get(&server, "/v1/models");
    assert_eq!((s, m["data"][0]["id"].as_str()), (200, Some("tiny-dev")));

    // OpenAI: b64_json (default) and url
    let (s, v) = post(
        &server,
        "/v1/images/generations",
        &json!({"prompt": "a cat", "size": "64x64", "seed": 7, "steps": 2, "n": 2, "model": "tiny-dev", "quality": "hd"}),
    );
    assert_eq!(s, 200, "{v}");
    use base64::Engine as _;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (k, item) in data.iter().enumerate() {
        let png = base64::engine::general_purpose::STANDARD
            .decode(item["b64_json"].as_str().unwrap())
            .unwrap();
        check_png(&png, "a cat", 7 + k as u64);
    }
    let (s, v) = post(
        &server,
        "/v1/images/generations",
        &json!({"prompt": "a dog", "seed": 3, "steps": 2, "response_format": "url"}),
    );
    assert_eq!(s, 200, "{v}");
    let url = v["data"][0]["url"].as_str().unwrap();
    let path = &url[url.find("/api/").unwrap()..];
    let (s, _, png) = call(&server, "GET", path, None, None);
    assert_eq!(s, 200);
    check_png(&png, "a dog", 3);

    // native jobs: submit, progress events, result
    let (s, v) = post(
        &server,
        "/api/v1/jobs",
        &json!({"prompt": "a boat", "seed": 11, "steps": 3}),
    );
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let url = format!(
        "http://{}/api/v1/jobs/{id}/events?preview=true",
        server.addr()
    );
    let resp = agent().get(&url).call().unwrap();
    let mut steps = vec![];
    let mut previews = std::collections::BTreeSet::new();
    let mut last = Value::Null;
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data:") {
            last = serde_json::from_str(d.trim()).unwrap();
            steps.push(last["step"].as_u64().unwrap());
            if let Some(p) = last["preview"].as_str() {
                // a PNG of an eighth of the image's side
                let png = base64::engine::general_purpose::STANDARD
                    .decode(p.strip_prefix("data:image/png;base64,").unwrap())
                    .unwrap();
                let info = png::Decoder::new(std::io::Cursor::new(png))
                    .read_info()
                    .unwrap();
                assert_eq!((info.info().width, info.info().height), (8, 8));
                previews.insert(last["step"].as_u64().unwrap());
            }
        }
        if last["state"] == "succeeded" {
            break;
        }
    }
    assert_eq!(last["state"], "succeeded", "{last}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert_eq!(*steps.last().unwrap(), 3);
    assert_eq!(previews, [1, 2, 3].into(), "a preview every step");
    assert!(
        last.get("preview").is_none(),
        "the final event has no preview"
    );
    let v = wait_done(&server, &id);
    assert!(v.get("preview").is_none(), "status routes carry no preview");
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    let (s, _, png) = call(&server, "GET", v["images"][0].as_str().unwrap(), None, None);
    assert_eq!(s, 200);
    check_png(&png, "a boat", 11);
    let (s, list) = get(&server, "/api/v1/jobs");
    assert_eq!(s, 200);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));

    // idempotent by id
    let body = json!({"id": "mine-1", "prompt": "a hat", "seed": 1, "steps": 1});
    let (s, a) = post(&server, "/api/v1/jobs", &body);
    assert_eq!(s, 202, "{a}");
    let (s, b) = post(&server, "/api/v1/jobs", &body);
    assert_eq!((s, &b["id"]), (200, &a["id"]));
    let (s, c) = post(
        &server,
        "/api/v1/jobs",
        &json!({"id": "mine-1", "prompt": "another", "steps": 1}),
    );
    assert_eq!((s, c["error"]["code"].as_str()), (409, Some("id_in_use")));
    assert_eq!(wait_done(&server, "mine-1")["state"], "succeeded");

    let (s, _, metrics) = call(&server, "GET", "/metrics", None, None);
    let metrics = String::from_utf8(metrics).unwrap();
    assert_eq!(s, 200);
    for name in [
        "flux_queue_depth 0",
        "flux_jobs{state=\"succeeded\"} 4",
        "flux_step_seconds_count",
        "flux_rejected_total 0",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
    server.shutdown(Duration::from_secs(10));
}

#[test]
fn bad_requests_get_json_errors() {
    let server = start(
        Limits {
            max_body: 4096,
            max_prompt: 1000,
            ..Default::default()
        },
        None,
    );
    let json_ct = "application/json";
    let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(5000));
    let long = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(1001));
    type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a [u8])>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, b"{")),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, b"[1]")),
            422,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, b"{}")),
            422,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","colour":1}"#)),
            422,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","width":"wide"}"#)),
            422,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","width":-16}"#)),
            422,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","width":65}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","height":100000}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","steps":0}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","steps":1000}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","n":0}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","n":99}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","guidance":1e9}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","true_cfg_scale":0.5}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"  "}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a\u0000b"}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, br#"{"prompt":"a","id":"../../etc"}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, long.as_bytes())),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some((json_ct, big.as_bytes())),
            413,
            "body_too_large",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(("text/plain", br#"{"prompt":"a"}"#)),
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/images/generations",
            Some((json_ct, br#"{"prompt":"a","size":"big"}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/images/generations",
            Some((json_ct, br#"{"prompt":"a","size":"64x65"}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/images/generations",
            Some((json_ct, br#"{"prompt":"a","response_format":"gif"}"#)),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/images/generations",
            Some((json_ct, br#"{"prompt":"a","model":"dall-e-3"}"#)),
            404,
            "model_not_found",
        ),
        ("GET", "/api/v1/jobs/nope", None, 404, "not_found"),
        ("DELETE", "/api/v1/jobs/nope", None, 404, "not_found"),
        ("GET", "/api/v1/jobs/nope/images/0", None, 404, "not_found"),
        ("GET", "/api/v1/jobs/nope/events", None, 404, "not_found"),
        ("GET", "/nothing/here", None, 404, "not_found"),
        ("GET", "/../../etc/passwd", None, 404, "not_found"),
        ("PUT", "/api/v1/jobs", None, 405, "method_not_allowed"),
        (
            "GET",
            "/v1/images/generations",
            None,
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (s, _, b) = call(&server, method, path, body, None);
        let v: Value = serde_json::from_slice(&b).unwrap_or_else(|_| {
            panic!("{method} {path}: not JSON: {}", String::from_utf8_lossy(&b))
        });
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path} {:?}: {v}",
            body.map(|b| String::from_utf8_lossy(&b.1[..b.1.len().min(60)]).into_owned())
        );
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // an image index that is not a number, on a real job
    let (_, v) = post(&server, "/api/v1/jobs", &json!({"prompt": "a", "steps": 1}));
    let id = v["id"].as_str().unwrap();
    let (s, v) = get(&server, &format!("/api/v1/jobs/{id}/images/abc"));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    // the service still works
    assert_eq!(wait_done(&server, id)["state"], "succeeded");
    server.shutdown(Duration::from_secs(10));
}

#[test]
fn full_queue_is_429_and_cancelling_frees_it() {
    let server = start(
        Limits {
            queue: 1,
            ..Default::default()
        },
        None,
    );
    let long = json!({"prompt": "slow", "steps": 100, "n": 4});
    let (s, running) = post(&server, "/api/v1/jobs", &long);
    assert_eq!(s, 202);
    let running = running["id"].as_str().unwrap().to_string();
    // wait until it runs, so the next one waits
    let until = Instant::now() + Duration::from_secs(60);
    while get(&server, &format!("/api/v1/jobs/{running}")).1["state"] != "running" {
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(10));
    }
    let (s, waiting) = post(&server, "/api/v1/jobs", &long);
    assert_eq!(s, 202);
    let waiting = waiting["id"].as_str().unwrap().to_string();
    let text = long.to_string();
    let (s, retry, b) = call(
        &server,
        "POST",
        "/api/v1/jobs",
        Some(("application/json", text.as_bytes())),
        None,
    );
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (429, Some("queue_full")));
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    // the OpenAI route is refused the same way
    let (s, v) = post(&server, "/v1/images/generations", &long);
    assert_eq!((s, v["error"]["code"].as_str()), (429, Some("queue_full")));

    // cancelling the waiting job frees its place at once
    let (s, _, _) = call(
        &server,
        "DELETE",
        &format!("/api/v1/jobs/{waiting}"),
        None,
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(
        get(&server, &format!("/api/v1/jobs/{waiting}")).1["state"],
        "cancelled"
    );
    let (s, next) = post(
        &server,
        "/api/v1/jobs",
        &json!({"prompt": "quick", "steps": 1}),
    );
    assert_eq!(s, 202, "{next}");
    // cancelling the running one stops it at its next step, and the queue moves on
    let (s, _, _) = call(
        &server,
        "DELETE",
        &format!("/api/v1/jobs/{running}"),
        None,
        None,
    );
    assert_eq!(s, 200);
    let v = wait_done(&server, &running);
    assert_eq!(v["state"], "cancelled", "{v}");
    assert!(v["step"].as_u64().unwrap() < 400, "{v}");
    assert_eq!(
        wait_done(&server, next["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    let (_, _, m) = call(&server, "GET", "/metrics", None, None);
    assert!(String::from_utf8(m)
        .unwrap()
        .contains("flux_rejected_total 2"));
    server.shutdown(Duration::from_secs(10));
}

#[test]
fn token_is_required_when_set_and_off_loopback() {
    let server = start(Limits::default(), Some("s3cret"));
    let (s, _, b) = call(&server, "GET", "/v1/models", None, None);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, _, _) = call(&server, "GET", "/v1/models", None, Some("wrong"));
    assert_eq!(s, 401);
    let (s, _, _) = call(&server, "GET", "/metrics", None, None);
    assert_eq!(s, 401);
    let (s, _, _) = call(&server, "GET", "/v1/models", None, Some("s3cret"));
    assert_eq!(s, 200);
    let (s, _, _) = call(&server, "GET", "/health", None, None);
    assert_eq!(s, 200);
    server.shutdown(Duration::from_secs(10));

    let err = Server::start(
        tiny(),
        ServeOptions {
            addr: "0.0.0.0:0".parse().unwrap(),
            token: None,
            limits: Limits::default(),
            model_id: "tiny-dev".into(),
            files: Default::default(),
            default_size: 64,
        },
    )
    .err()
    .expect("no token off loopback");
    assert!(err.to_string().contains("needs a token"), "{err}");
}

#[test]
fn shutdown_finishes_the_running_job_and_cancels_the_waiting() {
    let server = start(Limits::default(), None);
    let (_, a) = post(
        &server,
        "/api/v1/jobs",
        &json!({"prompt": "a", "steps": 20}),
    );
    let (_, b) = post(
        &server,
        "/api/v1/jobs",
        &json!({"prompt": "b", "steps": 20}),
    );
    let a = a["id"].as_str().unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(60);
    while get(&server, &format!("/api/v1/jobs/{a}")).1["state"] != "running" {
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(5));
    }
    let addr = server.addr();
    // watch both jobs' ends from the events route while the server shuts down
    let watch = |id: String| {
        std::thread::spawn(move || {
            let url = format!("http://{addr}/api/v1/jobs/{id}/events");
            let resp = agent().get(&url).call().unwrap();
            let mut last = Value::Null;
            for line in BufReader::new(resp.into_body().into_reader()).lines() {
                let Ok(line) = line else { break };
                if let Some(d) = line.strip_prefix("data:") {
                    last = serde_json::from_str(d.trim()).unwrap();
                }
            }
            last
        })
    };
    let (wa, wb) = (watch(a), watch(b["id"].as_str().unwrap().to_string()));
    std::thread::sleep(Duration::from_millis(50));
    server.shutdown(Duration::from_secs(60));
    assert_eq!(wa.join().unwrap()["state"], "succeeded");
    assert_eq!(wb.join().unwrap()["state"], "cancelled");
    // and the port is closed
    assert!(std::net::TcpStream::connect(addr).is_err());
}

/// A headless Chromium driven over the DevTools protocol (one page).
struct Browser {
    child: std::process::Child,
    page: tungstenite::WebSocket<std::net::TcpStream>,
    next: u64,
    dir: std::path::PathBuf,
}

impl Browser {
    /// Starts Chromium (`FLUX_CHROMIUM`, else the first of Debian's names on `PATH`); `None`
    /// when there is none, unless `FLUX_REQUIRE_E2E` is set (CI), where that is a failure.
    fn launch() -> Option<Browser> {
        let names = ["chromium-headless-shell", "chromium", "google-chrome"];
        let found = std::env::var("FLUX_CHROMIUM").ok().or_else(|| {
            let path = std::env::var_os("PATH")?;
            names.iter().find_map(|n| {
                std::env::split_paths(&path)
                    .map(|d| d.join(n))
                    .find(|p| p.is_file())
                    .map(|p| p.display().to_string())
            })
        });
        let Some(bin) = found else {
            assert!(
                std::env::var_os("FLUX_REQUIRE_E2E").is_none(),
                "FLUX_REQUIRE_E2E is set but no Chromium was found ({names:?} or FLUX_CHROMIUM)"
            );
            eprintln!(
                "skipped: no Chromium (install chromium-headless-shell, or set FLUX_CHROMIUM)"
            );
            return None;
        };
        let dir = flux_golden::scratch_dir("browser");
        let mut child = std::process::Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", dir.display()))
            .arg("about:blank")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("ws://").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
                }
            }
        });
        let host = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("Chromium did not print its DevTools address");
        let targets: Value = agent()
            .get(&format!("http://{host}/json/list"))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        let ws = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let stream = std::net::TcpStream::connect(&host).unwrap();
        let (page, _) = tungstenite::client(ws.as_str(), stream).unwrap();
        Some(Browser {
            child,
            page,
            next: 0,
            dir,
        })
    }

    /// One DevTools command; its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(tungstenite::Message::text(msg)).unwrap();
        loop {
            let m = self.page.read().unwrap();
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page (awaiting a promise) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is truthy.
    fn wait_for(&mut self, expr: &str, secs: u64) {
        let until = Instant::now() + Duration::from_secs(secs);
        while !self.eval(&format!("!!({expr})")).as_bool().unwrap() {
            assert!(Instant::now() < until, "timed out waiting for {expr}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `text` into the element `#id`, as a user would.
    fn type_into(&mut self, id: &str, text: &str) {
        self.eval(&format!("document.getElementById('{id}').focus()"));
        self.call("Input.insertText", json!({ "text": text }));
    }

    /// Clicks the middle of the element `#id` with the mouse.
    fn click(&mut self, id: &str) {
        let r = self.eval(&format!(
            "(() => {{ const r = document.getElementById('{id}').getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn web_page_in_a_headless_browser() {
    let Some(mut browser) = Browser::launch() else {
        return;
    };
    let server = start(Limits::default(), Some("page-token"));
    let url = format!("http://{}/", server.addr());
    browser.call("Page.navigate", json!({ "url": url }));
    browser.wait_for("document.body && document.body.dataset.ready === '1'", 30);
    // the service wants a token: the page shows its field
    assert_eq!(
        browser.eval("document.getElementById('token-row').hidden"),
        json!(false)
    );
    assert_eq!(browser.eval("document.getElementById('width').value"), "64");
    browser.type_into("token", "page-token");
    browser.type_into("prompt", "a lighthouse at dusk");
    browser.eval("document.getElementById('seed').value = ''");
    browser.type_into("seed", "5");
    browser.type_into("steps", "3");
    browser.click("go");
    browser.wait_for("document.querySelector('#gallery img')", 120);
    // the image decodes in the browser, its caption has its parameters, and the page showed
    // previews while it ran
    let r = browser.eval(
        "(async () => { const img = document.querySelector('#gallery img'); await img.decode(); \
         return [img.naturalWidth, img.naturalHeight, \
                 document.querySelector('#gallery figcaption').textContent, \
                 document.querySelector('#gallery a[download]').getAttribute('download'), \
                 Number(document.body.dataset.previews || 0), \
                 document.getElementById('status').textContent]; })()",
    );
    assert_eq!((&r[0], &r[1]), (&json!(64), &json!(64)), "{r}");
    let caption = r[2].as_str().unwrap();
    assert!(
        caption.contains("a lighthouse at dusk") && caption.contains("seed 5"),
        "{r}"
    );
    assert_eq!(r[3], "flux-5.png");
    assert!(
        r[4].as_u64().unwrap() >= 1,
        "no preview reached the page: {r}"
    );
    assert!(r[5].as_str().unwrap().starts_with("done"), "{r}");
    // the service made exactly that job, and its PNG is the CLI's
    let (s, _, b) = call(&server, "GET", "/api/v1/jobs", None, Some("page-token"));
    assert_eq!(s, 200);
    let jobs: Value = serde_json::from_slice(&b).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["request"]["steps"], 3);
    let img = jobs[0]["images"][0].as_str().unwrap();
    let (s, _, png) = call(&server, "GET", img, None, Some("page-token"));
    assert_eq!(s, 200);
    check_png(&png, "a lighthouse at dusk", 5);
    // a reload shows the earlier result in the gallery
    browser.call("Page.reload", json!({}));
    browser.wait_for("document.body && document.body.dataset.ready === '1'", 30);
    browser.wait_for("document.querySelectorAll('#gallery img').length === 1", 30);
    server.shutdown(Duration::from_secs(5));
}

/// A program the end-to-end tests need: `None` (skip) when it is not on `PATH`, unless
/// `FLUX_REQUIRE_E2E` is set (CI), where that is a failure.
fn program(names: &[&str]) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("FLUX_REQUIRE_E2E").is_none(),
            "FLUX_REQUIRE_E2E is set but none of {names:?} is on PATH"
        );
        eprintln!("skipped: none of {names:?} is installed");
    }
    found
}

/// A `redis-server` of this test's own on a free loopback port, without persistence.
struct RedisServer {
    child: std::process::Child,
    url: String,
    dir: std::path::PathBuf,
}

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let bin = program(&["redis-server"])?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = flux_golden::scratch_dir(&format!("redis-{port}"));
        let child = std::process::Command::new(bin)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--port")
            .arg(port.to_string())
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("redis://127.0.0.1:{port}");
        let server = RedisServer { child, url, dir };
        let until = Instant::now() + Duration::from_secs(20);
        while server.con().is_none() {
            assert!(Instant::now() < until, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    fn con(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(self.url.as_str())
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `flux worker` process on the tiny model.
fn worker(queue: &str, name: &str) -> std::process::Child {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny-dev");
    std::process::Command::new(env!("CARGO_BIN_EXE_flux"))
        .args(["worker", "--queue", queue, "--name", name])
        .args(["--default-size", "64", "--claim-timeout", "2", "--model"])
        .arg(model)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn front(queue: &str) -> Server {
    Server::start_front(
        ServeOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: None,
            limits: Limits {
                queue: 32,
                ..Default::default()
            },
            model_id: "tiny-dev".into(),
            files: Default::default(),
            default_size: 64,
        },
        queue,
    )
    .unwrap()
}

/// The job hashes' fields, by id.
fn job_field(con: &mut redis::Connection, id: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("flux:job:{id}"))
        .arg(field)
        .query(con)
        .unwrap()
}

#[test]
fn redis_workers_take_over_from_a_killed_one() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis.con().unwrap();
    let server = front(&redis.url);
    let (s, h) = get(&server, "/health");
    assert_eq!((s, h["queue"].as_str()), (200, Some("redis")), "{h}");
    // jobs queued before any worker runs wait in Redis
    let mut ids = vec![];
    for k in 0..8u64 {
        let (s, v) = post(
            &server,
            "/api/v1/jobs",
            &json!({"id": format!("job-{k}"), "prompt": format!("a tower {k}"), "seed": k, "steps": 24}),
        );
        assert_eq!(s, 202, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(get(&server, "/api/v1/jobs/job-0").1["state"], "queued");
    let mut w1 = worker(&redis.url, "w1");
    let mut w2 = worker(&redis.url, "w2");
    // kill w1 (SIGKILL) in the middle of a job
    let until = Instant::now() + Duration::from_secs(120);
    let killed = loop {
        let running = ids.iter().find(|id| {
            job_field(&mut con, id, "owner").as_deref() == Some("w1")
                && job_field(&mut con, id, "state").as_deref() == Some("running")
                && job_field(&mut con, id, "status")
                    .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                    .is_some_and(|s| s["step"].as_u64().unwrap_or(0) >= 2)
        });
        if let Some(id) = running {
            break id.clone();
        }
        assert!(Instant::now() < until, "w1 never ran a job");
        std::thread::sleep(Duration::from_millis(5));
    };
    w1.kill().unwrap();
    w1.wait().unwrap();
    // every job ends in an image, the killed one run again by w2
    for (k, id) in ids.iter().enumerate() {
        let v = wait_done(&server, id);
        assert_eq!(v["state"], "succeeded", "{v}");
        let (s, _, png) = call(&server, "GET", v["images"][0].as_str().unwrap(), None, None);
        assert_eq!(s, 200);
        check_png(&png, &format!("a tower {k}"), k as u64);
    }
    assert_eq!(job_field(&mut con, &killed, "owner").as_deref(), Some("w2"));
    assert_eq!(
        job_field(&mut con, &killed, "attempts").as_deref(),
        Some("2")
    );
    // exactly once: one `succeeded` per job in the event stream, and nothing left pending
    let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("flux:events")
        .arg("-")
        .arg("+")
        .query(&mut con)
        .unwrap();
    for id in &ids {
        let ends = events
            .iter()
            .filter(|(_, f)| {
                let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
                get("id") == Some(id.as_str())
                    && get("status")
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                        .is_some_and(|s| s["state"] == "succeeded")
            })
            .count();
        assert_eq!(ends, 1, "job {id} ended {ends} times");
    }
    // (a worker acknowledges its entry just after publishing the end)
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg("flux:jobs")
            .arg("flux-workers")
            .query(&mut con)
            .unwrap();
        if pending.0 == 0 {
            break;
        }
        assert!(Instant::now() < until, "entries left pending: {pending:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // idempotent by id across fronts; cancelling a waiting and a running job
    let other = front(&redis.url);
    let (s, v) = post(
        &other,
        "/api/v1/jobs",
        &json!({"id": "job-3", "prompt": "a tower 3", "seed": 3, "steps": 24}),
    );
    assert_eq!((s, v["state"].as_str()), (200, Some("succeeded")), "{v}");
    let (s, _, png) = call(&other, "GET", v["images"][0].as_str().unwrap(), None, None);
    assert_eq!(s, 200);
    check_png(&png, "a tower 3", 3);
    let (s, v) = post(
        &other,
        "/api/v1/jobs",
        &json!({"id": "job-3", "prompt": "another", "seed": 3}),
    );
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("id_in_use")));
    let (_, long) = post(
        &server,
        "/api/v1/jobs",
        &json!({"prompt": "a long one", "steps": 100, "n": 4}),
    );
    let (_, waiting) = post(
        &server,
        "/api/v1/jobs",
        &json!({"prompt": "a waiting one", "steps": 100, "n": 4}),
    );
    let (_, third) = post(
        &server,
        "/api/v1/jobs",
        &json!({"prompt": "a third", "steps": 100}),
    );
    let long = long["id"].as_str().unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(60);
    while get(&server, &format!("/api/v1/jobs/{long}")).1["step"].as_u64() < Some(1) {
        assert!(Instant::now() < until, "the long job never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let third = third["id"].as_str().unwrap().to_string();
    let (s, _, _) = call(
        &server,
        "DELETE",
        &format!("/api/v1/jobs/{third}"),
        None,
        None,
    );
    assert_eq!(s, 200);
    let (s, _, _) = call(
        &server,
        "DELETE",
        &format!("/api/v1/jobs/{long}"),
        None,
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(wait_done(&server, &long)["state"], "cancelled");
    assert_eq!(wait_done(&server, &third)["state"], "cancelled");
    let waiting = waiting["id"].as_str().unwrap().to_string();
    call(
        &server,
        "DELETE",
        &format!("/api/v1/jobs/{waiting}"),
        None,
        None,
    );
    assert_eq!(wait_done(&server, &waiting)["state"], "cancelled");

    other.shutdown(Duration::from_secs(1));
    server.shutdown(Duration::from_secs(1));
    w2.kill().unwrap();
    w2.wait().unwrap();
}
