//! `cargo xtask bench`: our transformer against candle-transformers' FLUX and PyTorch (diffusers)
//! on the same seeded weights and inputs, each peer in its own process (so peak memory is its
//! own), with a check that the three outputs agree.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

use crate::root;

struct Opts {
    depth: usize,
    single: usize,
    hidden: usize,
    heads: usize,
    res: Vec<usize>,
    threads: usize,
    iters: usize,
    pipeline: bool,
    quant: Vec<String>,
    full_depth: bool,
    cfg_batch: bool,
    lora: bool,
}

fn parse(args: &[&str]) -> Result<Opts> {
    let mut o = Opts {
        depth: 1,
        single: 2,
        hidden: 3072,
        heads: 24,
        res: vec![256, 512, 1024],
        threads: 2,
        iters: 5,
        pipeline: false,
        quant: vec![],
        full_depth: false,
        cfg_batch: false,
        lora: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match *a {
            "--depth" => o.depth = val()?.parse()?,
            "--single" => o.single = val()?.parse()?,
            "--hidden" => o.hidden = val()?.parse()?,
            "--heads" => o.heads = val()?.parse()?,
            "--res" => {
                o.res = val()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--threads" => o.threads = val()?.parse()?,
            "--iters" => o.iters = val()?.parse()?,
            "--pipeline" => o.pipeline = true,
            "--quant" => o.quant = val()?.split(',').map(String::from).collect(),
            "--full-depth" => o.full_depth = true,
            "--cfg-batch" => o.cfg_batch = true,
            "--lora" => o.lora = true,
            other => bail!("unknown option {other}; see `cargo xtask help`"),
        }
    }
    Ok(o)
}

/// FLOPs of one forward (multiply-adds ×2) for batch 1 with `l_img` image and `l_txt` text tokens.
fn flops(o: &Opts, l_img: f64, l_txt: f64) -> f64 {
    let h = o.hidden as f64;
    let mlp = 4.0 * h;
    let l = l_img + l_txt;
    let lin = |rows: f64, i: f64, out: f64| 2.0 * rows * i * out;
    let mut f = lin(l_img, 64.0, h)
        + lin(l_txt, 4096.0, h)
        + 3.0 * lin(1.0, 256.0, h)
        + 3.0 * lin(1.0, h, h)
        + lin(1.0, 768.0, h);
    let double = |ls: f64| {
        lin(ls, h, 3.0 * h)
            + lin(ls, h, h)
            + lin(ls, h, mlp)
            + lin(ls, mlp, h)
            + lin(1.0, h, 6.0 * h)
    };
    f += o.depth as f64 * (double(l_img) + double(l_txt) + 4.0 * l * l * h);
    f += o.single as f64
        * (lin(l, h, 3.0 * h + mlp) + lin(l, h + mlp, h) + lin(1.0, h, 3.0 * h) + 4.0 * l * l * h);
    f + lin(l_img, h, 64.0) + lin(1.0, h, 2.0 * h)
}

struct Run {
    secs: f64,
    peak_rss: f64,
}

fn run_json(cmd: &mut Command) -> Result<Run> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    Ok(Run {
        secs: v["secs"].as_f64().context("secs")?,
        peak_rss: v["peak_rss"].as_f64().unwrap_or(0.0),
    })
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn build(args: &[&str]) -> Result<()> {
    let st = Command::new(cargo())
        .current_dir(root())
        .args(args)
        .status()?;
    if !st.success() {
        bail!("cargo {args:?} failed");
    }
    Ok(())
}

/// The bench's own virtualenv with stable-diffusion.cpp (PyPI's bindings build the vendored
/// sd.cpp and ggml with CMake, ≈ 7 min on 2 cores, once).
fn sdcpp_python() -> Result<Option<std::path::PathBuf>> {
    let venv = root().join("target/bench/sdcpp-venv");
    let python = venv.join("bin/python");
    let probe = |p: &std::path::Path| {
        Command::new(p)
            .args(["-c", "import stable_diffusion_cpp"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if python.exists() && probe(&python) {
        return Ok(Some(python));
    }
    eprintln!("bench: installing stable-diffusion-cpp-python==0.4.7 into target/bench/sdcpp-venv (builds sd.cpp, ≈ 7 min)");
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()?
        .success()
        && Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "stable-diffusion-cpp-python==0.4.7",
            ])
            .status()?
            .success();
    Ok((ok && probe(&python)).then_some(python))
}

/// `cargo xtask bench --quant q8_0,q4_k`: the full-width transformer (reduced depth) from GGUF
/// files of the same seeded weights: ours (decode + f32 GEMM, and candle's integer kernels),
/// ours in f32 from the dense file, and stable-diffusion.cpp on the same GGUF file (its
/// per-step time of the second step; it also loads the full-size random T5/CLIP/VAE of
/// `cargo xtask fullsize`, which its pipeline needs).
fn quant_bench(o: &Opts) -> Result<()> {
    build(&["build", "--release", "-p", "flux-bench"])?;
    let bench = root().join("target/release/flux-bench");
    let dir = root().join(format!(
        "target/bench/d{}s{}h{}n{}",
        o.depth, o.single, o.hidden, o.heads
    ));
    let full = root().join("target/fullsize");
    if !Command::new(&bench)
        .arg("fullsize-write")
        .arg(&full)
        .status()?
        .success()
    {
        bail!("writing the full-size encoder files failed");
    }
    let sdcpp = sdcpp_python()?;
    if sdcpp.is_none() {
        eprintln!("bench: stable-diffusion.cpp is unavailable; its column is skipped");
    }
    let threads = o.threads.to_string();
    if o.full_depth {
        return full_depth_bench(o, &bench, &full, sdcpp.as_deref(), &threads);
    }
    let res: Vec<String> = o.res.iter().map(|r| r.to_string()).collect();
    bench_weights(o, &bench, &dir)?;
    let iters = o.iters.to_string();
    let mut lines = vec![];
    println!("peer              type   res   s/forward  peak RSS");
    for q in &o.quant {
        let out = Command::new(&bench)
            .arg("quantize")
            .arg(&dir)
            .args(["--to", q])
            .output()?;
        if !out.status.success() {
            bail!(
                "quantizing the bench weights to {q}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let file = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let name = std::path::Path::new(&file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for r in &res {
            let ours_run = |extra: &[&str], file: &str| -> Result<Run> {
                let mut c = Command::new(&bench);
                c.arg("run")
                    .arg(&dir)
                    .args(["--res", r, "--iters", &iters, "--file", file]);
                c.args(extra)
                    .arg("--out")
                    .arg(dir.join(format!("out_q_{r}.safetensors")));
                threads_env(&mut c, &threads);
                run_json(&mut c)
            };
            let decode = ours_run(&[], &name)?;
            let integer = ours_run(&["--integer"], &name)?;
            let f32_run = ours_run(&[], "flux.safetensors")?;
            let sd = sdcpp
                .as_ref()
                .and_then(|py| sdcpp_run(py, &full, Path::new(&file), r, &threads));
            let row = |who: &str, run: &Run| {
                println!(
                    "{who:<17} {q:<6} {r:>4}  {:>9.3}  {:>6.2} GB",
                    run.secs,
                    run.peak_rss / 1e9
                )
            };
            row("ours (decode)", &decode);
            row("ours (integer)", &integer);
            row("ours f32 (dense)", &f32_run);
            if let Some(s) = &sd {
                row("sd.cpp", s);
            }
            let ratio = |x: &Run| {
                sd.as_ref()
                    .map_or("n/a".into(), |s| format!("{:.2}", x.secs / s.secs))
            };
            lines.push(format!(
                "bench: dit-cpu-{q} res={r} ours={:.3}s ours_integer={:.3}s ours_f32={:.3}s sdcpp={} ours/sdcpp={} ours_integer/sdcpp={} ours/ours_f32={:.2}",
                decode.secs,
                integer.secs,
                f32_run.secs,
                sd.as_ref().map_or("n/a".into(), |s| format!("{:.3}s", s.secs)),
                ratio(&decode),
                ratio(&integer),
                decode.secs / f32_run.secs
            ));
        }
    }
    println!("({} threads; ours: median of {} forwards; sd.cpp: its second sampling step; sd.cpp's peak RSS includes its T5, CLIP and VAE)", o.threads, o.iters);
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// The seeded bench weights of `o`'s shape and the inputs at its resolutions, in `dir` (written
/// once by `flux-bench weights`).
fn bench_weights(o: &Opts, bench: &Path, dir: &Path) -> Result<()> {
    let res: Vec<String> = o.res.iter().map(|r| r.to_string()).collect();
    let st = Command::new(bench)
        .arg("weights")
        .arg(dir)
        .args(["--depth", &o.depth.to_string()])
        .args(["--single", &o.single.to_string()])
        .args(["--hidden", &o.hidden.to_string()])
        .args(["--heads", &o.heads.to_string(), "--res"])
        .args(&res)
        .status()?;
    if !st.success() {
        bail!("writing bench weights failed");
    }
    Ok(())
}

/// Builds `flux-bench` and writes (once) the seeded weights and inputs of `o`'s model: the
/// binary and the folder.
fn bench_model(o: &Opts) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    build(&["build", "--release", "-p", "flux-bench"])?;
    let bench = root().join("target/release/flux-bench");
    let dir = root().join(format!(
        "target/bench/d{}s{}h{}n{}",
        o.depth, o.single, o.hidden, o.heads
    ));
    bench_weights(o, &bench, &dir)?;
    Ok((bench, dir))
}

/// `cargo xtask bench --cfg-batch`: true CFG's two transformer passes per step, one after the
/// other (diffusers; `--batch 1`) against one pass over a batch of two (`--batch 2`), on the
/// full-width transformer (reduced depth).
fn cfg_batch_bench(o: &Opts) -> Result<()> {
    let (bench, dir) = bench_model(o)?;
    let (threads, iters) = (o.threads.to_string(), o.iters.to_string());
    println!("mode                 res   s/step  peak RSS");
    let mut lines = vec![];
    for r in &o.res {
        let rs = r.to_string();
        let timed = |batch: &str| -> Result<Run> {
            let mut c = Command::new(&bench);
            c.arg("run")
                .arg(&dir)
                .args(["--res", &rs, "--iters", &iters, "--batch", batch, "--out"])
                .arg(dir.join(format!("out_cfg{batch}_{r}.safetensors")));
            threads_env(&mut c, &threads);
            run_json(&mut c)
        };
        let (one, two) = (timed("1")?, timed("2")?);
        println!(
            "sequential (2 × B=1) {r:>4}  {:>7.3}  {:>6.2} GB",
            2.0 * one.secs,
            one.peak_rss / 1e9
        );
        println!(
            "batched (B=2)        {r:>4}  {:>7.3}  {:>6.2} GB",
            two.secs,
            two.peak_rss / 1e9
        );
        lines.push(format!(
            "bench: dit-cpu-cfg res={r} sequential={:.3}s batched={:.3}s batched/sequential={:.2} rss_sequential={:.2}GB rss_batched={:.2}GB",
            2.0 * one.secs,
            two.secs,
            two.secs / (2.0 * one.secs),
            one.peak_rss / 1e9,
            two.peak_rss / 1e9
        ));
    }
    println!(
        "({} threads; median of {} forwards; transformer depth {}+{}, width {})",
        o.threads, o.iters, o.depth, o.single, o.hidden
    );
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// Weight values of the linear layers of a FLUX transformer of width `h` with `d` double and
/// `s` single blocks (dev's embedders).
fn linear_params(h: f64, d: f64, s: f64) -> f64 {
    let double = 2.0 * (6.0 + 3.0 + 1.0 + 4.0 + 4.0) * h * h;
    let single = (7.0 + 5.0 + 3.0) * h * h;
    let top = h * (64.0 + 2.0 * 256.0 + 768.0 + 4096.0 + 64.0) + 3.0 * h * h + 2.0 * h * h;
    d * double + s * single + top
}

/// `cargo xtask bench --lora`: the time to merge a rank-16 and a rank-64 LoRA (every linear
/// layer) into the full-width transformer (reduced depth; extrapolated to 19+38 blocks by
/// weight count), and the per-forward cost of run-time LoRA against the same model without
/// one, in the same run.
fn lora_bench(o: &Opts) -> Result<()> {
    let (bench, dir) = bench_model(o)?;
    let (threads, iters) = (o.threads.to_string(), o.iters.to_string());
    let ranks = [16usize, 64];
    let mut files = vec![];
    for r in ranks {
        let out = Command::new(&bench)
            .arg("lora-file")
            .arg(&dir)
            .args(["--rank", &r.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("writing the rank-{r} LoRA failed");
        }
        files.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let full = linear_params(o.hidden as f64, 19.0, 38.0)
        / linear_params(o.hidden as f64, o.depth as f64, o.single as f64);
    println!("mode              rank   res  s/forward  vs none  merge s  (19+38 est.)  peak RSS");
    let mut lines = vec![];
    for res in &o.res {
        let rs = res.to_string();
        let timed = |lora: Option<(&str, &str)>| -> Result<(Run, f64, f64)> {
            let mut c = Command::new(&bench);
            c.arg("run")
                .arg(&dir)
                .args(["--res", &rs, "--iters", &iters, "--out"])
                .arg(dir.join(format!("out_lora_{res}.safetensors")));
            if let Some((f, mode)) = lora {
                c.args(["--lora", f, "--lora-mode", mode]);
            }
            threads_env(&mut c, &threads);
            let out = c.output()?;
            if !out.status.success() {
                bail!("{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .rev()
                .find(|l| l.starts_with('{'))
                .context("no JSON line")?;
            let v: serde_json::Value = serde_json::from_str(line)?;
            Ok((
                Run {
                    secs: v["secs"].as_f64().context("secs")?,
                    peak_rss: v["peak_rss"].as_f64().unwrap_or(0.0),
                },
                v["lora_secs"].as_f64().unwrap_or(0.0),
                v["secs_without_lora"].as_f64().unwrap_or(0.0),
            ))
        };
        // the model without a LoRA before and after the others (the faster of the two: these
        // machines are noisy)
        let (first, _, _) = timed(None)?;
        let mut rows = vec![];
        for (r, f) in ranks.iter().zip(&files) {
            for mode in ["runtime", "merge", "merge-once"] {
                rows.push((*r, mode, timed(Some((f, mode)))?));
            }
        }
        let (last, _, _) = timed(None)?;
        let none = if first.secs <= last.secs { first } else { last };
        println!(
            "none                     {res:>4}  {:>9.3}  {:>7}  {:>7}  {:>12}  {:>6.2} GB",
            none.secs,
            "1.000",
            "-",
            "-",
            none.peak_rss / 1e9
        );
        {
            for (r, mode, (run, apply, alternate)) in rows {
                // run time: against the same model without it, timed alternately in its
                // process; merges: against the runs without a LoRA
                let ratio = run.secs
                    / if alternate > 0.0 {
                        alternate
                    } else {
                        none.secs
                    };
                println!(
                    "{mode:<17} {r:>4}  {res:>4}  {:>9.3}  {ratio:>7.3}  {apply:>7.2}  {:>12.1}  {:>6.2} GB",
                    run.secs,
                    apply * full,
                    run.peak_rss / 1e9
                );
                lines.push(format!(
                    "bench: dit-cpu-lora res={res} rank={r} mode={mode} s_forward={:.3} none={:.3} ratio={ratio:.3} apply_s={apply:.2} apply_s_19x38_est={:.1}",
                    run.secs,
                    if alternate > 0.0 { alternate } else { none.secs },
                    apply * full
                ));
            }
        }
    }
    println!(
        "({} threads; median of {} forwards; transformer depth {}+{}, width {}; every linear layer adapted;\n merge and run-time set-up times measured on this depth, the 19+38 column scales them by weight count ({full:.1}x);\n merge keeps the weights as loaded for removal, merge-once does not (the CLI's);\n run time's \"vs none\" is against the same model with the LoRA taken off, timed alternately in one process)",
        o.threads, o.iters, o.depth, o.single, o.hidden
    );
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

fn threads_env(c: &mut Command, threads: &str) {
    c.env("RAYON_NUM_THREADS", threads)
        .env("OMP_NUM_THREADS", threads);
}

/// stable-diffusion.cpp's second sampling step on `dit` at `res`², with the full-size random
/// T5/CLIP/VAE of `cargo xtask fullsize` (its pipeline needs them); `None` (and why) if it fails.
fn sdcpp_run(py: &Path, full: &Path, dit: &Path, res: &str, threads: &str) -> Option<Run> {
    let mut c = Command::new(py);
    c.arg(root().join("xtask/bench/sdcpp_bench.py"))
        .arg("--dit")
        .arg(dit)
        .args(["--res", res, "--threads", threads])
        .arg("--clip")
        .arg(full.join("clip_l.safetensors"))
        .arg("--t5")
        .arg(full.join("t5xxl-Q8_0.gguf"))
        .arg("--vae")
        .arg(full.join("ae.safetensors"));
    threads_env(&mut c, threads);
    run_json(&mut c)
        .map_err(|e| eprintln!("bench: stable-diffusion.cpp failed: {e}"))
        .ok()
}

/// Memory the kernel says is available now (bytes), to skip a run that cannot fit.
fn mem_available() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::INFINITY, |kb| kb * 1024.0)
}

/// `--full-depth`: the full-size random-block schnell GGUFs of `cargo xtask fullsize` (19 + 38
/// blocks), one 256² forward each, ours against stable-diffusion.cpp on the same file.
fn full_depth_bench(
    o: &Opts,
    bench: &Path,
    full: &Path,
    sdcpp: Option<&Path>,
    threads: &str,
) -> Result<()> {
    let mut lines = vec![];
    println!("peer              type   res   s/forward  peak RSS   (full depth)");
    for q in &o.quant {
        let file = full.join(format!("flux1-schnell-{}.gguf", q.to_uppercase()));
        if !file.exists() {
            bail!(
                "{} is missing: `cargo xtask fullsize` writes Q8_0 and Q4_K",
                file.display()
            );
        }
        let ours = |integer: bool| -> Result<Run> {
            let mut c = Command::new(bench);
            c.arg("fullsize-dit").arg(&file).args(["--res", "256"]);
            if integer {
                c.arg("--integer");
            }
            threads_env(&mut c, threads);
            let out = c.output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = text
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l).ok())
                .with_context(|| format!("fullsize-dit {}: no result", file.display()))?;
            Ok(Run {
                secs: v["forward_secs"].as_f64().context("forward_secs")?,
                peak_rss: v["peak_rss"].as_f64().unwrap_or(0.0),
            })
        };
        let decode = ours(false)?;
        // the integer kernels keep candle's repacked copy beside the blocks (≈ 2× the file)
        let size = std::fs::metadata(&file)?.len() as f64;
        let integer = if 2.2 * size < mem_available() {
            Some(ours(true)?)
        } else {
            eprintln!(
                "bench: ours (integer) {q} skipped: ≈ {:.1} GB needed",
                2.2 * size / 1e9
            );
            None
        };
        let sd = sdcpp.and_then(|py| sdcpp_run(py, full, &file, "256", threads));
        let row = |who: &str, run: &Run| {
            println!(
                "{who:<17} {q:<6}  256  {:>9.3}  {:>6.2} GB",
                run.secs,
                run.peak_rss / 1e9
            )
        };
        row("ours (decode)", &decode);
        if let Some(i) = &integer {
            row("ours (integer)", i);
        }
        if let Some(s) = &sd {
            row("sd.cpp", s);
        }
        let fmt = |x: Option<&Run>| x.map_or("n/a".into(), |x| format!("{:.3}s", x.secs));
        let ratio = |x: Option<&Run>| match (x, &sd) {
            (Some(x), Some(s)) => format!("{:.2}", x.secs / s.secs),
            _ => "n/a".into(),
        };
        lines.push(format!(
            "bench: dit-cpu-{q}-full res=256 ours={} ours_integer={} sdcpp={} ours/sdcpp={} ours_integer/sdcpp={}",
            fmt(Some(&decode)),
            fmt(integer.as_ref()),
            fmt(sd.as_ref()),
            ratio(Some(&decode)),
            ratio(integer.as_ref()),
        ));
    }
    println!("({threads} threads; ours: one forward; sd.cpp: its second sampling step)");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// `cargo xtask bench --pipeline`: the `flux` binary end to end on the tiny models, the stage
/// times of text-to-image and of every image task (img2img, inpainting, Kontext, true CFG,
/// Fill, Canny), 256² (the tasks 96×64 on their test pictures), 28 steps.
fn pipeline_bench() -> Result<()> {
    build(&["build", "--release", "-p", "flux-pipeline", "--bin", "flux"])?;
    let golden = root().join("flux-pipeline/tests/golden");
    let tmp = std::env::temp_dir().join(format!("flux-bench-pipeline-{}", std::process::id()));
    // the Fill and Canny/Depth transformers in copies of the tiny model folder
    let with_transformer = |name: &str, t: &str| -> Result<String> {
        let dst = tmp.join(name);
        copy_tree(&golden.join("tiny-dev"), &dst)?;
        std::fs::remove_dir_all(dst.join("transformer"))?;
        copy_tree(&golden.join(t), &dst.join("transformer"))?;
        Ok(dst.display().to_string())
    };
    let fill = with_transformer("fill", "tiny-fill/transformer")?;
    let control = with_transformer("control", "tiny-control/transformer")?;
    let dev = golden.join("tiny-dev").display().to_string();
    let pic = |f: &str| golden.join(f).display().to_string();
    let (init, mask) = (pic("img2img_init.png"), pic("inpaint_mask.png"));
    let small = ["--width", "96", "--height", "64"];
    let cfg = [
        &["generate", "--model", &dev, "--negative-prompt", "blurry"][..],
        &["--true-cfg", "4"],
        &small,
    ]
    .concat();
    let runs: Vec<(&str, Vec<&str>)> = vec![
        (
            "text-to-image res=256",
            vec![
                "generate", "--model", &dev, "--width", "256", "--height", "256",
            ],
        ),
        (
            "img2img s=0.6",
            [&["generate", "--model", &dev, "--image", &init][..], &small].concat(),
        ),
        (
            "inpaint s=0.8",
            [
                &[
                    "generate",
                    "--model",
                    &dev,
                    "--image",
                    &init,
                    "--mask",
                    &mask,
                    "--strength",
                    "0.8",
                ][..],
                &small,
            ]
            .concat(),
        ),
        (
            "kontext (picture kept at 96x64)",
            [
                &["edit", "--model", &dev, "--image", &init, "--keep-size"][..],
                &small,
            ]
            .concat(),
        ),
        ("true-cfg 4", cfg.clone()),
        ("true-cfg 4 batch 2", [&cfg[..], &["--batch", "2"]].concat()),
        (
            "fill",
            [
                &["fill", "--model", &fill, "--image", &init, "--mask", &mask][..],
                &small,
            ]
            .concat(),
        ),
        (
            "canny",
            [
                &["control", "--model", &control, "--canny", &init][..],
                &small,
            ]
            .concat(),
        ),
    ];
    let out = tmp.join("out-{seed}.png");
    let out = out.display().to_string();
    for (name, args) in runs {
        let o = Command::new(root().join("target/release/flux"))
            .current_dir(root())
            .args(&args)
            .args([
                "--offline",
                "--prompt",
                "a photo of a forest with mist",
                "--seed",
                "42",
            ])
            .args(["--steps", "28", "--overwrite", "--output", &out])
            .output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        let line = err
            .lines()
            .find(|l| l.starts_with("encode"))
            .with_context(|| format!("{name}: no stage line from flux: {err}"))?;
        println!("bench: pipeline-tiny-dev {name} steps=28 {line}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// Copies folder `src` to `dst` recursively (links followed).
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        if from.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

/// `cargo xtask bench [--depth D] [--single S] [--hidden H] [--heads N] [--res 256,512]
/// [--threads T] [--iters N] [--pipeline]`.
pub fn bench(args: &[&str]) -> Result<()> {
    let o = parse(args)?;
    if o.pipeline {
        return pipeline_bench();
    }
    if !o.quant.is_empty() {
        return quant_bench(&o);
    }
    if o.cfg_batch {
        return cfg_batch_bench(&o);
    }
    if o.lora {
        return lora_bench(&o);
    }
    build(&["build", "--release", "-p", "flux-bench"])?;
    let ours_bin = root().join("target/release/flux-bench");
    let candle_target = root().join("target/bench-candle");
    let candle_bin = candle_target.join("release/flux-bench-candle");
    let candle_ok = Command::new(cargo())
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--manifest-path",
            "xtask/bench-candle/Cargo.toml",
            "--target-dir",
        ])
        .arg(&candle_target)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !candle_ok {
        eprintln!("bench: candle-transformers peer did not build; its column is skipped");
    }
    let python = root().join("xtask/reference/.venv/bin/python");
    if !python.exists() {
        eprintln!("bench: no reference virtualenv (create it with `cargo xtask golden gen`); the PyTorch column is skipped");
    }
    let dir = root().join(format!(
        "target/bench/d{}s{}h{}n{}",
        o.depth, o.single, o.hidden, o.heads
    ));
    bench_weights(&o, &ours_bin, &dir)?;
    let threads = o.threads.to_string();
    let iters = o.iters.to_string();
    println!("{}", cpu_line());
    println!("peer      res   s/forward  GFLOP/s  peak RSS  max rel diff vs ours");
    let mut lines = vec![];
    for r in &o.res {
        let rs = r.to_string();
        // the largest sizes take tens of seconds a forward: fewer of them
        let iters = if *r >= 1024 {
            o.iters.min(2).to_string()
        } else {
            iters.clone()
        };
        let l_img = ((r / 16) * (r / 16)) as f64;
        let gflop = flops(&o, l_img, 256.0) / 1e9;
        let out = |who: &str| dir.join(format!("out_{who}_{r}.safetensors"));
        let with_env = |c: &mut Command| {
            c.env("RAYON_NUM_THREADS", &threads)
                .env("OMP_NUM_THREADS", &threads);
        };
        let mut c = Command::new(&ours_bin);
        c.arg("run")
            .arg(&dir)
            .args(["--res", &rs, "--iters", &iters, "--out"])
            .arg(out("ours"));
        with_env(&mut c);
        let ours = run_json(&mut c)?;
        let mut candle = None;
        if candle_ok {
            let mut c = Command::new(&candle_bin);
            c.arg(&dir)
                .args(["--res", &rs, "--iters", &iters, "--out"])
                .arg(out("candle"));
            with_env(&mut c);
            candle = Some(run_json(&mut c)?);
        }
        let mut torch = None;
        if python.exists() {
            let mut c = Command::new(&python);
            c.arg(root().join("xtask/reference/bench_torch.py"))
                .arg(&dir);
            c.args([
                "--res",
                &rs,
                "--iters",
                &iters,
                "--threads",
                &threads,
                "--out",
            ])
            .arg(out("torch"));
            with_env(&mut c);
            torch = Some(run_json(&mut c)?);
        }
        let diff = |who: &str| -> String {
            Command::new(&ours_bin)
                .arg("compare")
                .arg(out(who))
                .arg(out("ours"))
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let row = |who: &str, run: &Run, d: String| {
            println!(
                "{who:<8} {r:>5}  {:>9.3}  {:>7.1}  {:>6.2} GB  {d}",
                run.secs,
                gflop / run.secs,
                run.peak_rss / 1e9
            )
        };
        row("ours", &ours, "-".into());
        if let Some(c) = &candle {
            row("candle", c, diff("candle"));
        }
        if let Some(t) = &torch {
            row("torch", t, diff("torch"));
        }
        let fmt = |x: &Option<Run>| {
            x.as_ref()
                .map(|r| format!("{:.3}s", r.secs))
                .unwrap_or_else(|| "n/a".into())
        };
        let best = [&candle, &torch]
            .iter()
            .filter_map(|x| x.as_ref().map(|r| r.secs))
            .fold(f64::INFINITY, f64::min);
        let ratio = if best.is_finite() {
            format!("{:.2}", ours.secs / best)
        } else {
            "n/a".into()
        };
        lines.push(format!(
            "bench: dit-cpu-f32 res={r} ours={:.3}s candle={} torch={} ours/best={ratio}",
            ours.secs,
            fmt(&candle),
            fmt(&torch)
        ));
    }
    println!(
        "({:.1} GFLOP per forward at the first size; {} threads, median of {} forwards, at most 2 from 1024²)",
        flops(&o, ((o.res[0] / 16).pow(2)) as f64, 256.0) / 1e9,
        o.threads,
        o.iters
    );
    // attention alone against a GEMM of the same tokens, in this process's conditions: 1024²'s
    // image tokens and dev's 512 text tokens
    let tokens = 4096 + 512;
    let mut c = Command::new(&ours_bin);
    c.args(["attn", "-", "--tokens", &tokens.to_string()])
        .args(["--heads", &o.heads.to_string()])
        .args(["--dim", &(o.hidden / o.heads).to_string(), "--iters", "3"])
        .env("RAYON_NUM_THREADS", &threads);
    let out = c.output().context("running flux-bench attn")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("flux-bench attn: {text}"))?;
    let (attn, gemm) = (
        v["attn_gflops"].as_f64().context("attn_gflops")?,
        v["gemm_gflops"].as_f64().context("gemm_gflops")?,
    );
    println!(
        "attention at {tokens} tokens: {attn:.1} GFLOP/s, GEMM {gemm:.1} GFLOP/s ({:.0} %)",
        100.0 * attn / gemm
    );
    for l in lines {
        println!("{l}");
    }
    println!(
        "bench: attention tokens={tokens} attn={attn:.1}GFLOP/s gemm={gemm:.1}GFLOP/s ratio={:.2}",
        attn / gemm
    );
    Ok(())
}

/// `cpu: MODEL (SIMD features)` from `/proc/cpuinfo` and run-time detection.
fn cpu_line() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    #[allow(unused_mut)]
    let mut simd: Vec<&str> = vec![];
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! have {
            ($($f:tt)*) => {
                $(if std::arch::is_x86_feature_detected!($f) {
                    simd.push($f);
                })*
            };
        }
        have!("sse4.2" "avx" "avx2" "fma" "f16c" "avx512f" "avx512bw" "avx512vnni" "avx512bf16");
    }
    #[cfg(target_arch = "aarch64")]
    simd.push("neon");
    format!(
        "cpu: {model} ({}; {} logical cores)",
        simd.join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}
