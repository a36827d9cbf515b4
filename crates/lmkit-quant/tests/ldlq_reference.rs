//! LDLQ against the QuIP reference algorithm (fixture: scripts/fixtures/make_ldlq_fixture.py).

use lmkit_quant::ldlq::{feedback, round_row};

/// Codes may differ where a value lands within float rounding of a half-integer (the reference
/// runs in float64, lmkit's rounding in f32): at most this fraction of them.
const MAX_DIFFERENT: f64 = 0.01;

#[test]
fn ldlq_matches_the_reference_rounding() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/ldlq_reference.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    for c in v["cases"].as_array().expect("cases") {
        let rows = c["rows"].as_u64().unwrap() as usize;
        let d = c["d"].as_u64().unwrap() as usize;
        let bits = c["bits"].as_u64().unwrap() as u32;
        let nums = |k: &str| -> Vec<f64> {
            c[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let w: Vec<f32> = nums("w").iter().map(|&x| x as f32).collect();
        let h = nums("h");
        let want: Vec<u8> = c["codes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect();
        let fb = feedback(&h, d, "fixture").unwrap();
        let mut got = vec![0u8; rows * d];
        for (row, out) in w.chunks(d).zip(got.chunks_mut(d)) {
            round_row(row, &fb, (1 << bits) - 1, out);
        }
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(
            (diff as f64) <= MAX_DIFFERENT * (rows * d) as f64,
            "{bits} bits, {rows}x{d}: {diff} codes differ"
        );
        // A disagreement changes later columns' feedback, so it shows up as a small run; the
        // bulk must agree exactly.
        eprintln!(
            "{bits} bits {rows}x{d}: {diff} of {} codes differ",
            rows * d
        );
    }
}
