//! Logits parity with HF transformers on the dequantized default model.
//!
//! Fixture: `tests/fixtures/hf_logits_smollm2.json`, made by
//! `scripts/fixtures/make_hf_logits.py` (transformers loads the GGUF and dequantizes it to f32).
//! For three prompts of 133–158 tokens it holds the token ids, the argmax at every position, the
//! top-8 logits, and the logits of 64 fixed vocabulary ids at every position.

mod common;

use lmkit::{LoadOptions, Tensor};
use serde::Deserialize;

/// Max |Δlogit| allowed between lmkit (f32) and transformers (f32).
const MAX_ABS_LOGIT_DIFF: f32 = 1e-3;

#[derive(Deserialize)]
struct Fixture {
    hello_text: String,
    hello_ids: Vec<u32>,
    probe_vocab_ids: Vec<u32>,
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    name: String,
    text: String,
    ids: Vec<u32>,
    argmax: Vec<u32>,
    top: Vec<Vec<(u32, f32)>>,
    probe_logits: Vec<Vec<f32>>,
}

fn fixture() -> Fixture {
    let p = common::repo_file("tests/fixtures/hf_logits_smollm2.json");
    let text = std::fs::read_to_string(&p).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn tokenizer_matches_transformers() {
    let fx = fixture();
    let m = lmkit::load(&common::default_model(), LoadOptions::default()).unwrap();
    assert_eq!(m.tokenizer.encode(&fx.hello_text).unwrap(), fx.hello_ids);
    for p in &fx.prompts {
        let ids = m.tokenizer.encode(&p.text).unwrap();
        assert_eq!(ids, p.ids, "token ids differ for prompt `{}`", p.name);
        assert_eq!(
            m.tokenizer.decode(&ids).unwrap(),
            p.text,
            "round trip `{}`",
            p.name
        );
    }
}

#[test]
fn dequantized_logits_match_transformers() {
    let fx = fixture();
    let m = lmkit::load(
        &common::default_model(),
        LoadOptions {
            dequantize: true,
            ..Default::default()
        },
    )
    .unwrap();
    for p in &fx.prompts {
        assert!(p.ids.len() >= 100);
        let x = Tensor::new(p.ids.as_slice(), m.model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.model.forward(&x, &mut m.model.new_cache()).unwrap();
        let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap(); // (t, v)
        assert_eq!(rows.len(), p.ids.len());
        let mut worst = 0.0f32;
        for (t, row) in rows.iter().enumerate() {
            for (k, &id) in fx.probe_vocab_ids.iter().enumerate() {
                worst = worst.max((row[id as usize] - p.probe_logits[t][k]).abs());
            }
            for &(id, l) in &p.top[t] {
                worst = worst.max((row[id as usize] - l).abs());
            }
            let ours = lmkit::generate_mod::sampler::argmax(row);
            assert_eq!(
                ours, p.argmax[t],
                "argmax differs at position {t} of `{}`",
                p.name
            );
        }
        eprintln!(
            "{}: {} positions, max |Δlogit| = {worst:.2e}",
            p.name,
            rows.len()
        );
        assert!(
            worst <= MAX_ABS_LOGIT_DIFF,
            "`{}`: max |Δlogit| {worst} > {MAX_ABS_LOGIT_DIFF}",
            p.name
        );
    }
}

#[test]
fn quantized_path_stays_close_to_the_reference() {
    // The Q4_1 path runs the same weights without dequantizing first (activations are quantized
    // to 8 bits inside the matmul), so it differs slightly; top-1 must still mostly agree.
    let fx = fixture();
    let m = lmkit::load(&common::default_model(), LoadOptions::default()).unwrap();
    let p = &fx.prompts[0];
    let x = Tensor::new(p.ids.as_slice(), m.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = m.model.forward(&x, &mut m.model.new_cache()).unwrap();
    let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let agree = rows
        .iter()
        .zip(&p.argmax)
        .filter(|(r, &a)| lmkit::generate_mod::sampler::argmax(r) == a)
        .count();
    let frac = agree as f64 / rows.len() as f64;
    eprintln!("Q4_1 vs f32 reference top-1 agreement: {frac:.3}");
    assert!(frac >= 0.9, "top-1 agreement {frac}");
}
