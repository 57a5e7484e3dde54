//! A bounded load run against `flux serve` on the committed tiny model, alone in its process
//! (the memory it measures is the server's, not other tests').

use std::time::{Duration, Instant};

use flux_pipeline::serve::Limits;
use serde_json::{json, Value};

mod common;
use common::http::*;

/// 8 clients × 25 requests through the OpenAI route against a queue of 4: every request ends
/// in an image or a 429, long jobs cancelled along the way free their place, memory does not
/// grow with the jobs.
#[test]
fn bounded_load() {
    // 8 clients, each until it has 25 images (200 jobs); a 429 counts as that request's end
    // and the client tries again shortly after
    let server = start(
        Limits {
            queue: 4,
            keep_jobs: 16,
            ..Default::default()
        },
        None,
    );
    let addr = server.addr();
    let started = Instant::now();
    let images = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // resident memory sampled over the run: the peak of the second half of the jobs is not
    // above the first half's
    let sampler = {
        let images = images.clone();
        std::thread::spawn(move || {
            let (mut first, mut second) = (0u64, 0u64);
            while images.load(std::sync::atomic::Ordering::Relaxed) < 200 {
                let done = images.load(std::sync::atomic::Ordering::Relaxed);
                let m = current_rss();
                if done < 100 {
                    first = first.max(m);
                } else {
                    second = second.max(m);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (first, second.max(current_rss()))
        })
    };
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let images = images.clone();
            std::thread::spawn(move || {
                let mut out = vec![];
                let mut r = 0;
                let mut cancelled = 0;
                while out.iter().filter(|(s, _)| *s == 200).count() < 25 {
                    r += 1;
                    if r % 5 == 0 {
                        // a long job, cancelled at once: it must not hold its place
                        let body = json!({"prompt": "to cancel", "steps": 100}).to_string();
                        let mut resp = agent()
                            .post(format!("http://{addr}/api/v1/jobs"))
                            .header("content-type", "application/json")
                            .send(body.as_bytes())
                            .unwrap();
                        if resp.status() == 202 {
                            let v: Value = resp.body_mut().read_json().unwrap();
                            let id = v["id"].as_str().unwrap();
                            let resp = agent()
                                .delete(format!("http://{addr}/api/v1/jobs/{id}"))
                                .call()
                                .unwrap();
                            assert_eq!(resp.status(), 200);
                            cancelled += 1;
                        }
                    }
                    let t = Instant::now();
                    let body =
                        json!({"prompt": format!("client {c} request {r}"), "steps": 1, "seed": r})
                            .to_string();
                    let mut resp = agent()
                        .post(format!("http://{addr}/v1/images/generations"))
                        .header("content-type", "application/json")
                        .send(body.as_bytes())
                        .unwrap();
                    let status = resp.status().as_u16();
                    let v: Value = serde_json::from_slice(
                        &resp
                            .body_mut()
                            .with_config()
                            .limit(64 << 20)
                            .read_to_vec()
                            .unwrap(),
                    )
                    .unwrap();
                    match status {
                        200 => {
                            assert!(v["data"][0]["b64_json"].as_str().unwrap().len() > 100);
                            images.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        429 => assert_eq!(v["error"]["code"], "queue_full"),
                        s => panic!("status {s}: {v}"),
                    }
                    out.push((status, t.elapsed()));
                    if status == 429 {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                (out, cancelled)
            })
        })
        .collect();
    let (mut all, mut cancelled) = (vec![], 0);
    for c in clients {
        let (out, n) = c.join().unwrap();
        all.extend(out);
        cancelled += n;
    }
    let wall = started.elapsed();
    let (first, second) = sampler.join().unwrap();
    let ok: Vec<Duration> = all.iter().filter(|r| r.0 == 200).map(|r| r.1).collect();
    let refused = all.len() - ok.len();
    assert_eq!(ok.len(), 200);
    assert!(all.iter().all(|r| r.0 == 200 || r.0 == 429));
    let mut sorted = ok.clone();
    sorted.sort();
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    let (_, h) = get(&server, "/api/v1/jobs");
    assert!(
        h.as_array().unwrap().len() <= 16 + 4 + 1,
        "finished jobs are forgotten"
    );
    assert!(
        second < first + (32 << 20),
        "peak memory grew over the run: {first} then {second} bytes"
    );
    // nothing is waiting or running once every client has its images
    let (_, h) = get(&server, "/health");
    assert_eq!(
        (h["queued"].as_u64(), h["running"].as_bool()),
        (Some(0), Some(false))
    );
    eprintln!(
        "load: 8 clients, {} requests: 200 images, {refused} × 429, {cancelled} long jobs cancelled, jobs lost 0, p50 {:.0} ms, p95 {:.0} ms, wall {:.1} s, peak RSS {:.0} MiB (jobs 1-100) → {:.0} MiB (jobs 101-200)",
        all.len(),
        pct(0.5),
        pct(0.95),
        wall.as_secs_f64(),
        first as f64 / 1048576.0,
        second as f64 / 1048576.0
    );
    server.shutdown(Duration::from_secs(10));
}
