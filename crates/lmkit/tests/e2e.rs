//! End-to-end checks on the real default model (SmolLM2-135M-Instruct, Q4_1 as shipped).

mod common;

use lmkit::{GenerateOptions, LoadOptions, Message, PplOptions, SamplingParams, Session};

/// lmkit's perplexity may differ from llama.cpp's by this fraction (the bar is 1%).
const PPL_REL_TOL: f64 = 0.01;
/// Windows compared in the test (the full-file number is in docs/benchmarks.md).
const PPL_WINDOWS: usize = 4;

#[test]
fn perplexity_matches_llama_cpp_on_wikitext2() {
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_file(
            "tests/fixtures/llamacpp_ppl_wikitext2_q41_c512.json",
        ))
        .unwrap(),
    )
    .unwrap();
    let want = fx["cumulative_ppl"][PPL_WINDOWS - 1].as_f64().unwrap();
    let m = lmkit::load(&common::default_model(), LoadOptions::default()).unwrap();
    let text =
        std::fs::read_to_string(common::repo_file("../shared/data/wikitext-2/test.txt")).unwrap();
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let ids = m.tokenizer.encode_with_bos(text).unwrap();
    assert!(
        !m.tokenizer.special.add_bos,
        "the default model adds no BOS"
    );
    let opts = PplOptions {
        ctx: 512,
        max_windows: Some(PPL_WINDOWS),
        ..Default::default()
    };
    let r = lmkit::perplexity(&m.model, &ids, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(r.scored_tokens, PPL_WINDOWS * 255);
    let rel = (r.ppl - want).abs() / want;
    eprintln!(
        "lmkit {:.4} vs llama.cpp {want:.4} ({:.3}%)",
        r.ppl,
        100.0 * rel
    );
    assert!(rel < PPL_REL_TOL, "lmkit {} vs llama.cpp {want}", r.ppl);
}

#[test]
fn greedy_chat_answers_and_is_deterministic() {
    let m = lmkit::load(&common::default_model(), LoadOptions::default()).unwrap();
    let text = m
        .chat
        .render(
            &[Message::new("user", "What is the capital of Germany?")],
            true,
        )
        .unwrap();
    assert!(
        text.starts_with("<|im_start|>system\n"),
        "default system prompt: {text}"
    );
    let ids = m.tokenizer.encode(&text).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    let opts = GenerateOptions {
        max_tokens: 24,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let mut streamed = String::new();
    let mut s = Session::new(&m.model);
    let a = lmkit::generate(&m.model, &m.tokenizer, &mut s, &ids, &opts, &mut |p| {
        streamed.push_str(p);
        true
    })
    .unwrap();
    assert!(a.text.contains("Berlin"), "{}", a.text);
    assert_eq!(streamed, a.text, "streamed pieces add up to the text");
    // A fresh session and a reused one give the same greedy tokens.
    let b = lmkit::generate(
        &m.model,
        &m.tokenizer,
        &mut Session::new(&m.model),
        &ids,
        &opts,
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(a.tokens, b.tokens);
    let c = lmkit::generate(&m.model, &m.tokenizer, &mut s, &ids, &opts, &mut |_| true).unwrap();
    assert_eq!(a.tokens, c.tokens);
    assert!(
        c.prompt_tokens_run < c.prompt_tokens,
        "the session reused its cache"
    );
}

#[test]
fn stop_strings_end_generation() {
    let m = lmkit::load(&common::default_model(), LoadOptions::default()).unwrap();
    let ids = m.tokenizer.encode("1, 2, 3, 4, 5,").unwrap();
    let opts = GenerateOptions {
        max_tokens: 40,
        sampling: SamplingParams::greedy(),
        stop: vec!["8".into()],
        ..Default::default()
    };
    let g = lmkit::generate(
        &m.model,
        &m.tokenizer,
        &mut Session::new(&m.model),
        &ids,
        &opts,
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(g.finish, lmkit::FinishReason::Stop);
    assert!(!g.text.contains('8'), "{}", g.text);
    assert!(g.text.contains('7'), "{}", g.text);
}

/// Native vs reference logits, f32 weights (summation order only).
const NATIVE_F32_TOL: f32 = 2e-3;
/// With 8-bit activations, a one-ulp change can round an activation to the next level and the
/// flips add up over 30 layers: logits move by up to ~1.1 between any two summation orders
/// (measured both native vs reference and SIMD vs scalar reference). Steps where the reference's
/// top two logits are closer than this are near-ties where either token is a correct choice.
const QUANT_NEAR_TIE: f32 = 1.5;

/// Greedy decoding on the native CPU path picks the same tokens as on the reference path
/// (candle ops, the pre-kernel forward) on fixed prompts: exactly, with equal logits to
/// float noise, on the f32 model; away from near-ties on the Q4_1 model. Both paths are fed the
/// reference's choice.
#[test]
fn native_and_reference_paths_decode_the_same_tokens() {
    use lmkit::Tensor;
    let top2 = |logits: &Tensor| -> (u32, f32, Vec<f32>) {
        let v = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        (idx[0] as u32, v[idx[0]] - v[idx[1]], v)
    };
    for dequantize in [true, false] {
        let opts = LoadOptions {
            dequantize,
            ..Default::default()
        };
        let m = lmkit::load(&common::default_model(), opts).unwrap();
        assert!(m.model.is_native());
        let (mut compared, mut ties) = (0, 0);
        for prompt in [
            "The capital of Germany is",
            "Water boils at a temperature of",
            "def add(a, b):",
            "Once upon a time, there was a",
        ] {
            let (mut native, mut reference) = (m.model.new_cache(), m.model.new_reference_cache());
            let mut ids = m.tokenizer.encode(prompt).unwrap();
            for step in 0..24 {
                let x = Tensor::new(ids.as_slice(), m.model.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let (n, _, a) = top2(&m.model.forward_last(&x, &mut native).unwrap());
                let (r, margin, b) = top2(&m.model.forward_last(&x, &mut reference).unwrap());
                if dequantize {
                    let d = a
                        .iter()
                        .zip(&b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(d < NATIVE_F32_TOL, "{prompt:?} step {step}: |Δlogit| {d}");
                }
                if dequantize || margin > QUANT_NEAR_TIE {
                    assert_eq!(n, r, "{prompt:?} step {step}: native {n} vs reference {r}");
                    compared += 1;
                } else {
                    ties += 1;
                }
                ids = vec![r];
            }
        }
        let floor = if dequantize { 96 } else { 30 };
        assert!(
            compared >= floor,
            "{compared} steps compared, {ties} near-ties"
        );
    }
}

/// The generation tasks' teacher forcing on a prompt's cache scores as the fresh path does,
/// and the model's own greedy tokens are all its top choices (per-token accuracy 1).
#[test]
fn teacher_forcing_on_the_cache_matches_the_fresh_path() {
    use lmkit::eval::loglik::{score_on_cache, Encoded, LoglikScorer};
    let m = lmkit::load(&common::default_model(), LoadOptions::default()).unwrap();
    let ctx = m
        .tokenizer
        .encode_with_bos("Question: What is 12 plus 30?\nAnswer:")
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: 6,
        sampling: SamplingParams::greedy(),
        stop_at_eos: false,
        ..Default::default()
    };
    let mut s = Session::new(&m.model);
    let g = lmkit::generate(&m.model, &m.tokenizer, &mut s, &ctx, &opts, &mut |_| true).unwrap();
    assert_eq!(g.tokens.len(), 6);
    let mut s = Session::new(&m.model);
    let (last, _) = s.feed(&m.model, &ctx).unwrap();
    let on_cache = score_on_cache(&m.model, &mut s.cache, ctx.len(), &last, &g.tokens).unwrap();
    assert_eq!(on_cache.correct, 6);
    assert!(on_cache.greedy && on_cache.brier < 6.0 && on_cache.brier > 0.0);
    let request = Encoded {
        context: ctx.clone(),
        continuation: g.tokens.clone(),
    };
    let (fresh, _) = LoglikScorer::new(&m.model).score(&[request], 2048).unwrap();
    assert!(
        (fresh[0].logprob - on_cache.logprob).abs() < 1e-3,
        "{} vs {}",
        fresh[0].logprob,
        on_cache.logprob
    );
    assert!((fresh[0].brier - on_cache.brier).abs() < 1e-3);
    // The cache was cut back: the next item's prompt reuses exactly the context.
    let (again, reused) = s.feed(&m.model, &ctx).unwrap();
    assert_eq!(reused, ctx.len() - 1);
    assert!((again[0] - last[0]).abs() < 1e-3);
}
