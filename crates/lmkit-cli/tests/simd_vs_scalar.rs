//! The SIMD kernels change no result on the real default model, checked against every kernel
//! forced to its scalar reference (`LMKIT_FORCE_SCALAR=1`) and with AVX-512 or VNNI turned off:
//!
//! - dequantized to f32 (`--dequantize`: no 8-bit activations, so the paths differ by f32
//!   summation order only): the same greedy tokens and perplexity to 0.1%;
//! - as shipped (Q4_1 with 8-bit activations): perplexity within [`QUANT_PPL_REL_TOL`].

use std::process::Command;

/// f32 weights: summation order only.
const F32_PPL_REL_TOL: f64 = 1e-3;
/// With 8-bit activations a one-ulp difference can round an activation to the neighbouring
/// level, and the flips add up through 30 layers: on ~100 scored tokens the scalar and SIMD
/// perplexities differ by 0.1–0.9% (measured), averaging out over long texts. A wrong kernel
/// moves it by far more. (The AVX2/VNNI/AVX-512 paths sum in the same order and agree exactly.)
const QUANT_PPL_REL_TOL: f64 = 0.015;

const TEXT: &str = "The river runs through the old town, past the mill and the market square, \
where farmers sell apples, cheese and bread every Saturday morning. In the winter the water \
freezes at the edges and children slide along the banks while their parents watch from the \
bridge. The town council has argued for years about whether to build a second bridge further \
downstream, since the traffic on market days makes the crossing slow and sometimes dangerous. \
Some say a ferry would be cheaper; others point out that the current is strong in spring, when \
the snow melts in the hills and the river rises by almost two metres. A study published last \
year estimated the cost of a new bridge at four million euros, about the same as the new school \
that opened in September. For now the council has decided to widen the old bridge instead, and \
work will begin after the harvest festival in October, when fewer visitors come to the town.";

fn lmkit(env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let model = lmkit::default_model::ensure(&mut |_, _, _| {}).expect("default model");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lmkit"));
    cmd.args(args).arg("--model").arg(&model).arg("--json");
    for v in ["LMKIT_FORCE_SCALAR", "LMKIT_NO_AVX512", "LMKIT_NO_VNNI"] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn greedy_tokens_and_perplexity_are_the_same_on_every_kernel_path() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    let text = text.to_str().unwrap();
    let paths: [&[(&str, &str)]; 4] = [
        &[],
        &[("LMKIT_FORCE_SCALAR", "1")],
        &[("LMKIT_NO_AVX512", "1")],
        &[("LMKIT_NO_VNNI", "1"), ("LMKIT_NO_AVX512", "1")],
    ];
    let prompts = ["The capital of Germany is", "def fibonacci(n):"];
    for dequantize in [true, false] {
        let extra: &[&str] = if dequantize { &["--dequantize"] } else { &[] };
        let mut first: Option<(Vec<serde_json::Value>, f64)> = None;
        for env in paths {
            let run = |args: &[&str]| lmkit(env, &[args, extra].concat());
            let tokens: Vec<serde_json::Value> = if dequantize {
                prompts
                    .iter()
                    .map(|p| {
                        run(&["run", p, "--greedy", "--ignore-eos", "-n", "16"])["tokens"].clone()
                    })
                    .collect()
            } else {
                vec![]
            };
            let ppl = run(&["ppl", text, "--ctx", "64", "--max-windows", "3"])["ppl"]
                .as_f64()
                .unwrap();
            assert!(ppl > 1.0 && ppl < 1000.0, "{env:?}: ppl {ppl}");
            let tol = if dequantize {
                F32_PPL_REL_TOL
            } else {
                QUANT_PPL_REL_TOL
            };
            match &first {
                None => first = Some((tokens, ppl)),
                Some((t0, p0)) => {
                    assert_eq!(&tokens, t0, "{env:?}: greedy tokens differ");
                    assert!(
                        (ppl - p0).abs() <= tol * p0,
                        "{env:?} dequantize={dequantize}: ppl {ppl} vs {p0}"
                    );
                }
            }
        }
    }
}
