//! The hub path against a test hub on loopback: a small HTTP server serving the committed tiny
//! model in the hub's URL layout (`/{repo}/resolve/{revision}/{file}`, ETag, commit and
//! Content-Range headers, Range requests), with `HF_ENDPOINT` pointed at it. Covers the first
//! download into an empty cache, cached re-use, `--offline` hits and misses, a gated repo,
//! a missing file, an interrupted download, a sharded index with a missing shard, and a single
//! component file named `owner/name:file`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Files of each repository (path in repo → bytes), and what the server does.
#[derive(Default)]
struct Hub {
    repos: HashMap<String, HashMap<String, Vec<u8>>>,
    /// Repos answering 401 to everything.
    gated: Vec<String>,
    /// (repo, file): the first full GET of it is cut off halfway.
    flaky: Mutex<Vec<(String, String)>>,
    /// Requests for file bodies (not the 1-byte metadata probes), per file name.
    downloads: Mutex<HashMap<String, usize>>,
    requests: AtomicUsize,
}

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny-dev")
}

fn files_under(root: &Path) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn etag(bytes: &[u8]) -> String {
    // FNV-1a, enough to name blobs uniquely here
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:08x}", bytes.len())
}

fn respond(mut s: TcpStream, hub: &Hub) {
    hub.requests.fetch_add(1, Ordering::SeqCst);
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().strip_prefix("bytes=").map(String::from);
            }
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let status = |s: &mut TcpStream, code: &str| {
        let _ = write!(
            s,
            "HTTP/1.1 {code}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    };
    // /{owner}/{name}/resolve/{rev}/{file...}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return status(&mut s, "404 Not Found");
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let file = parts[4].to_string();
    if hub.gated.contains(&repo) {
        return status(&mut s, "401 Unauthorized");
    }
    let Some(bytes) = hub.repos.get(&repo).and_then(|r| r.get(&file)) else {
        return status(&mut s, "404 Not Found");
    };
    let size = bytes.len();
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => (
            a.parse::<usize>().unwrap_or(0),
            b.parse::<usize>()
                .map_or(size.saturating_sub(1), |e| e.min(size - 1)),
        ),
        None => (0, size.saturating_sub(1)),
    };
    let body = &bytes[start.min(size)..(end + 1).min(size)];
    let probe = range.as_deref() == Some("0-0");
    if !probe {
        *hub.downloads
            .lock()
            .unwrap()
            .entry(file.clone())
            .or_default() += 1;
    }
    let _ = write!(
        s,
        "HTTP/1.1 206 Partial Content\r\nETag: \"{}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {start}-{end}/{size}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        etag(bytes),
        body.len()
    );
    let mut flaky = hub.flaky.lock().unwrap();
    let cut = !probe && start == 0 && {
        let i = flaky.iter().position(|(r, f)| *r == repo && *f == file);
        i.map(|i| flaky.remove(i)).is_some()
    };
    drop(flaky);
    if cut {
        // half the body, then the connection drops
        let _ = s.write_all(&body[..body.len() / 2]);
        let _ = s.flush();
        let _ = s.shutdown(std::net::Shutdown::Both);
        return;
    }
    let _ = s.write_all(body);
}

fn serve(hub: Arc<Hub>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let hub = hub.clone();
            std::thread::spawn(move || {
                let mut s = s;
                respond(s.try_clone().unwrap(), &hub);
                let _ = s.flush();
                let mut sink = [0u8; 64];
                let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(50)));
                let _ = s.read(&mut sink);
            });
        }
    });
    format!("http://{addr}")
}

struct Env {
    endpoint: String,
    home: PathBuf,
    out: PathBuf,
}

impl Env {
    fn flux(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_flux"))
            .env("HF_ENDPOINT", &self.endpoint)
            .env("HF_HOME", &self.home)
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_CACHE")
            .current_dir(&self.out)
            .args([
                "generate", "--width", "64", "--height", "64", "--steps", "1",
            ])
            .args(["--seed", "3", "--prompt", "a hut"])
            .args(args)
            .output()
            .unwrap()
    }
}

fn tmp(name: &str) -> PathBuf {
    flux_golden::scratch_dir(&format!("hub-{name}"))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn hub_downloads_caches_and_fails_clearly() {
    let model = files_under(&tiny());
    let mut hub = Hub::default();
    hub.repos.insert("tiny/flux".into(), model.clone());
    hub.repos.insert("flaky/flux".into(), model.clone());
    let mut broken = model.clone();
    broken.remove("text_encoder_2/model-00002-of-00002.safetensors");
    hub.repos.insert("broken/flux".into(), broken);
    hub.gated.push("gated/flux".into());
    let bfl = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny-dev-bfl");
    hub.repos
        .insert("files/flux-parts".into(), files_under(&bfl));
    hub.flaky.lock().unwrap().push((
        "flaky/flux".into(),
        "transformer/diffusion_pytorch_model.safetensors".into(),
    ));
    let hub = Arc::new(hub);
    let env = Env {
        endpoint: serve(hub.clone()),
        home: tmp("home"),
        out: tmp("out"),
    };

    // 1. first download into an empty cache, then the same image from the folder
    let o = env.flux(&["--model", "tiny/flux", "-o", "hub.png"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let from_folder = {
        let d = tiny();
        env.flux(&[
            "--model",
            d.to_str().unwrap(),
            "-o",
            "folder.png",
            "--offline",
        ])
    };
    assert!(from_folder.status.success(), "{}", stderr(&from_folder));
    let a = flux_pipeline::read_png(&env.out.join("hub.png")).unwrap();
    let b = flux_pipeline::read_png(&env.out.join("folder.png")).unwrap();
    assert_eq!(a.image, b.image, "hub download = local folder");
    let tr = "transformer/diffusion_pytorch_model.safetensors";
    assert_eq!(hub.downloads.lock().unwrap().get(tr), Some(&1));

    // 2. cached re-use: no body downloaded again
    let o = env.flux(&["--model", "tiny/flux", "-o", "hub2.png"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        hub.downloads.lock().unwrap().get(tr),
        Some(&1),
        "re-downloaded"
    );

    // 3. --offline: a hit without any request, a miss naming the cache
    let before = hub.requests.load(Ordering::SeqCst);
    let o = env.flux(&["--model", "tiny/flux", "--offline", "-o", "off.png"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        hub.requests.load(Ordering::SeqCst),
        before,
        "offline touched the network"
    );
    let o = env.flux(&["--model", "other/flux", "--offline", "-o", "miss.png"]);
    assert!(
        !o.status.success() && stderr(&o).contains("not in the Hugging Face cache"),
        "{}",
        stderr(&o)
    );

    // 4. gated: the HF_TOKEN hint
    let o = env.flux(&["--model", "gated/flux", "-o", "gated.png"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("HF_TOKEN"), "{e}");
    assert!(e.contains("401"), "{e}");

    // 5. a missing file names it
    let o = env.flux(&["--model", "nobody/flux", "-o", "none.png"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("model_index.json"), "{e}");

    // 6. a sharded index whose shard is missing
    let o = env.flux(&["--model", "broken/flux", "-o", "broken.png"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("model-00002-of-00002"),
        "{e}"
    );

    // 7. an interrupted download is retried (resumed) and the cache entry is whole
    let o = env.flux(&["--model", "flaky/flux", "-o", "flaky.png"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = flux_pipeline::read_png(&env.out.join("flaky.png")).unwrap();
    assert_eq!(c.image, a.image, "resumed file is whole");
    let blobs = env.home.join("hub/models--flaky--flux/blobs");
    let want = &model[tr];
    let stored = std::fs::read_dir(&blobs)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read(e.path()).map(|b| &b == want).unwrap_or(false))
        .count();
    assert_eq!(stored, 1, "the transformer blob is complete");
    assert!(
        !std::fs::read_dir(&blobs).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".part")),
        "partial download left in the cache"
    );

    // 8. one component file from a hub repo (`owner/name:file`): only that file is fetched
    let o = env.flux(&[
        "--model",
        "tiny/flux",
        "--transformer",
        "files/flux-parts:flux.safetensors",
        "-o",
        "part.png",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = hub.downloads.lock().unwrap();
    assert_eq!(d.get("flux.safetensors"), Some(&1));
    assert_eq!(
        d.get("ae.safetensors"),
        None,
        "fetched more than the named file"
    );
    let p = flux_pipeline::read_png(&env.out.join("part.png")).unwrap();
    assert_eq!(p.image, a.image, "the BFL file is the same transformer");
}
