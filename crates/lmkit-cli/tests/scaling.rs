//! `lmkit scaling`: the reference's numbers through the command line, a fit of synthetic runs,
//! and clear errors for bad input.

use std::process::{Command, Output};

use lmkit::data::scaling::Law;

fn lmkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmkit"))
        .args(args)
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn predict_and_optimal_give_the_reference_numbers() {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    let p = json(&lmkit(&[
        "scaling", "predict", "--params", "6.34e9", "--tokens", "242B", "--unique", "25B", "--json",
    ]));
    assert!(
        close(p["loss"].as_f64().unwrap(), 2.2256440889984477),
        "{p}"
    );
    let o = json(&lmkit(&[
        "scaling", "optimal", "--flops", "1e22", "--unique", "25e9", "--json",
    ]));
    assert!(
        close(o["optimal"]["tokens"].as_f64().unwrap(), 237336955477.55075),
        "{o}"
    );
    assert!(
        close(o["optimal"]["params"].as_f64().unwrap(), 7022364735.879969),
        "{o}"
    );
    let bad = lmkit(&[
        "scaling", "predict", "--params", "0", "--epochs", "4", "--unique", "1B",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("positive count"));
}

#[test]
fn fit_finds_the_decay_constants_and_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let truth = Law {
        rd_star: 9.0,
        rn_star: 3.0,
        ..Law::published()
    };
    let mut lines = String::new();
    for (k, &n) in [2e8, 8e8, 3.2e9].iter().enumerate() {
        for (j, &epochs) in [1.0, 3.0, 9.0, 27.0, 60.0].iter().enumerate() {
            let (u, d) = (2e9, 2e9 * epochs);
            let noise = 1.0 + 0.001 * (((k * 5 + j) % 3) as f64 - 1.0);
            let loss = truth.loss(n, d, u) * noise;
            lines.push_str(&format!(
                "{{\"N\": {n}, \"D\": {d}, \"U\": {u}, \"loss\": {loss}}}\n"
            ));
        }
    }
    let runs = dir.path().join("runs.jsonl");
    std::fs::write(&runs, &lines).unwrap();
    let svg = dir.path().join("fit.svg");
    let f = json(&lmkit(&[
        "scaling",
        "fit",
        runs.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
        "--json",
    ]));
    let rd = f["law"]["rd_star"].as_f64().unwrap();
    let rn = f["law"]["rn_star"].as_f64().unwrap();
    assert!((rd - 9.0).abs() < 1.0 && (rn - 3.0).abs() < 0.6, "{f}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<circle"));
    // A malformed line: an error naming file and line, or skipped and counted on request.
    std::fs::write(&runs, format!("{lines}{{\"N\": 1e9, \"D\": \"many\"}}\n")).unwrap();
    let o = lmkit(&["scaling", "fit", runs.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("runs.jsonl:16"));
    let f = json(&lmkit(&[
        "scaling",
        "fit",
        runs.to_str().unwrap(),
        "--skip-bad",
        "--json",
    ]));
    assert_eq!(
        (f["runs"].as_u64(), f["skipped"].as_u64()),
        (Some(15), Some(1))
    );
}
