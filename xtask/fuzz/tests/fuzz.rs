//! The bounded fuzz run of `cargo test` (the long one is `cargo xtask fuzz --minutes N`): every
//! target, a few thousand mutants of its committed seeds, and every saved regression input;
//! none may panic.

use flux_fuzz::{fuzz, regressions, run_one, targets, Budget};

#[test]
fn every_target_survives_a_bounded_run() {
    let mut failures = vec![];
    for t in targets() {
        assert!(
            !flux_fuzz::corpus(t.name).is_empty(),
            "{}: no seeds",
            t.name
        );
        let r = fuzz(
            &t,
            7,
            Budget {
                inputs: 1500,
                until: None,
            },
            None,
        );
        eprintln!(
            "fuzz: target={} inputs={} panics={}",
            t.name,
            r.inputs,
            r.panics.len()
        );
        for (i, msg, _) in r.panics {
            failures.push(format!("{} input {i}: {msg}", t.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn saved_regressions_do_not_panic() {
    let scratch = std::env::temp_dir().join(format!("flux-fuzz-reg-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    for t in targets() {
        for (path, bytes) in regressions(t.name) {
            assert!(
                run_one(&t, &bytes, &scratch).is_ok(),
                "{} panics on {}",
                t.name,
                path.display()
            );
        }
    }
}
