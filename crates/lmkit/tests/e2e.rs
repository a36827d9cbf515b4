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
