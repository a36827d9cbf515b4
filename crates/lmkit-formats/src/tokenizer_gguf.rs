//! The tokenizer pipelines llama.cpp builds from GGUF metadata (`tokenizer.ggml.model`), as HF
//! `tokenizers` pipelines, so a GGUF file tokenizes as llama.cpp tokenizes it:
//! - `gpt2`: byte-level BPE on the file's merges, after the pre-tokenizer regexes llama.cpp
//!   uses for `tokenizer.ggml.pre` (`src/llama-vocab.cpp`; Llama 3's merges are skipped for
//!   words that are whole tokens, llama.cpp's `ignore_merges`);
//! - `llama` (SentencePiece BPE): merges derived from the piece scores (the pair whose result
//!   scores highest merges first), a `▁` prefix and `▁` for spaces, unknown characters as
//!   `<0xNN>` byte tokens;
//! - `gemma4`: BPE on raw UTF-8 with `▁` for spaces, byte fallback, lines split first;
//! - `t5` (SentencePiece unigram): Viterbi over the piece scores after the precompiled
//!   normalization map, `▁` as the word boundary;
//! - `bert` (WordPiece): lower-cased, accents stripped, CJK characters split; GGUF writes a
//!   word's first piece as `▁x` and continuations bare, WordPiece wants `x` and `##x`.
//!
//! Checked against llama.cpp's own tokenizer test sets (`models/ggml-vocab-*.gguf.inp/.out`) in
//! `crates/lmkit-formats/tests/vocab_parity.rs`.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as StripDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::strip::Strip;
use tokenizers::normalizers::{NormalizerWrapper, Sequence as NormSequence};
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::gguf::GgufFile;
use crate::{Error, Result};

/// GPT-2's split (llama.cpp's list, without HF's trailing `\s+`, which matches nothing more).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const CONTRACTIONS: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";

/// The pre-tokenizer names this module knows (llama.cpp's `tokenizer.ggml.pre`).
pub const PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt-2",
    "gpt2",
    "phi-2",
    "mpt",
    "olmo",
    "jais",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "stablelm2",
    "deepseek-r1-qwen",
    "qwen35",
    "falcon",
    "deepseek-llm",
    "deepseek-coder",
];

/// llama.cpp's regexes for a pre-tokenizer name (applied in turn, each match and each gap a
/// piece), and whether Llama 3's `ignore_merges` applies. `None`: the GPT-2 byte-level split.
fn regexes(pre: &str) -> Result<(Option<Vec<String>>, bool)> {
    let llama3 = format!(
        r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    let qwen2 = format!(
        r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    let qwen35 = format!(
        r"{CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+|\p{{N}}| ?[^\s\p{{L}}\p{{M}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    let list = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    Ok(match pre {
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => (None, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
        | "minerva-7b" => (list(&[r"\p{N}", GPT2]), false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => (Some(vec![llama3]), true),
        "dbrx" | "smaug-bpe" => (Some(vec![llama3]), false),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => (Some(vec![qwen2]), false),
        "qwen35" => (Some(vec![qwen35]), false),
        "falcon" => (
            list(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"]),
            false,
        ),
        "deepseek-llm" => (
            list(&[
                "[\r\n]",
                DEEPSEEK_LLM_LETTERS,
                r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
                r"\s+$",
                r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
                r"\p{N}+",
            ]),
            false,
        ),
        "deepseek-coder" => (
            list(&[
                "[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
                r"\p{N}",
            ]),
            false,
        ),
        "default" => (
            list(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]),
            false,
        ),
        other => {
            return Err(Error::Tokenizer(format!(
                "pre-tokenizer `{other}` is not supported (known: {}); pass an HF folder with tokenizer.json instead",
                PRE_TOKENIZERS.join(", ")
            )))
        }
    })
}

/// DeepSeek LLM's letter classes (Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee and
/// other cased scripts), as its tokenizer.json lists them (escaped: some of these characters
/// change under Unicode normalization).
const DEEPSEEK_LLM_LETTERS: &str = r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+";

fn split(re: &str) -> Result<PreTokenizerWrapper> {
    Split::new(
        SplitPattern::Regex(re.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map(PreTokenizerWrapper::Split)
    .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex `{re}`: {e}")))
}

/// The pre-tokenizer of a byte-level BPE, and whether to skip merges for whole-token words.
pub(crate) fn byte_level_pre(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level = |regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
    // SmolLM2 (the default model) keeps the form it was checked with: digits one by one, then
    // the byte-level split, which is the same split.
    if matches!(pre, "smollm" | "starcoder" | "refact") {
        return Ok((
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ])),
            false,
        ));
    }
    let (res, ignore_merges) = regexes(pre)?;
    let Some(res) = res else {
        return Ok((byte_level(true), ignore_merges));
    };
    let mut steps = res.iter().map(|r| split(r)).collect::<Result<Vec<_>>>()?;
    steps.push(byte_level(false));
    Ok((
        PreTokenizerWrapper::Sequence(Sequence::new(steps)),
        ignore_merges,
    ))
}

/// The metadata a builder reads.
pub(crate) struct Vocabulary {
    pub tokens: Vec<String>,
    pub types: Vec<i64>,
    pub scores: Vec<f64>,
}

fn bad(gguf: &GgufFile, field: &str, why: String) -> Error {
    Error::Field {
        path: gguf.path().into(),
        field: field.into(),
        why,
    }
}

pub(crate) fn vocabulary(gguf: &GgufFile) -> Result<Vocabulary> {
    let tokens = gguf
        .get_array("tokenizer.ggml.tokens")?
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.as_str().map(String::from).ok_or_else(|| {
                bad(
                    gguf,
                    "tokenizer.ggml.tokens",
                    format!("item {i} is not a string"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let n = tokens.len();
    let types = match gguf
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
    {
        Some(a) => a.iter().map(|t| t.as_i64().unwrap_or(1)).collect(),
        None => vec![1; n],
    };
    let scores = match gguf.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
        Some(a) => a.iter().map(|s| s.as_f64().unwrap_or(0.0)).collect(),
        None => vec![0.0; n],
    };
    if types.len() != n || scores.len() != n {
        return Err(bad(
            gguf,
            "tokenizer.ggml.token_type",
            format!(
                "{} token types and {} scores for {n} tokens",
                types.len(),
                scores.len()
            ),
        ));
    }
    Ok(Vocabulary {
        tokens,
        types,
        scores,
    })
}

fn merges(gguf: &GgufFile) -> Result<Merges> {
    let mut out = Vec::new();
    if let Some(m) = gguf.get("tokenizer.ggml.merges").and_then(|v| v.as_array()) {
        for (i, item) in m.iter().enumerate() {
            let pair = item
                .as_str()
                .and_then(|s| s.split_once(' '))
                .ok_or_else(|| {
                    bad(
                        gguf,
                        "tokenizer.ggml.merges",
                        format!("item {i} is not `left right`"),
                    )
                })?;
            out.push((pair.0.to_string(), pair.1.to_string()));
        }
    }
    Ok(out)
}

fn vocab_map(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

fn unk_id(gguf: &GgufFile, default: usize) -> usize {
    gguf.get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.as_u64())
        .map_or(default, |v| v as usize)
}

fn flag(gguf: &GgufFile, key: &str, default: bool) -> bool {
    gguf.get(key).and_then(|v| v.as_bool()).unwrap_or(default)
}

fn build_err(gguf: &GgufFile, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{}: building {what}: {e}", gguf.path().display()))
}

/// SentencePiece BPE merges from the scores: every split of a normal piece into two pieces
/// of the vocabulary, the splits of higher-scoring pieces first.
fn spm_merges(v: &Vocabulary, ids: &Vocab) -> Merges {
    let mut out: Vec<(String, String, f64)> = Vec::new();
    for (i, t) in v.tokens.iter().enumerate() {
        if v.types[i] != 1 {
            continue;
        }
        let mut local: Vec<(u32, u32, &str, &str)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(k, _)| {
                let (a, b) = t.split_at(k);
                Some((*ids.get(a)?, *ids.get(b)?, a, b))
            })
            .collect();
        local.sort_by_key(|&(a, b, _, _)| (a, b));
        out.extend(
            local
                .into_iter()
                .map(|(_, _, a, b)| (a.to_string(), b.to_string(), v.scores[i])),
        );
    }
    // Stable: equal scores keep vocabulary order.
    out.sort_by(|x, y| y.2.total_cmp(&x.2));
    out.into_iter().map(|(a, b, _)| (a, b)).collect()
}

fn spm_decoder(gguf: &GgufFile) -> Result<DecoderWrapper> {
    let space = Replace::new("▁", " ").map_err(|e| build_err(gguf, "decoder", e))?;
    Ok(DecoderWrapper::Sequence(DecoderSequence::new(vec![
        DecoderWrapper::Replace(space),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
        DecoderWrapper::Strip(StripDecoder::new(' ', 1, 0)),
    ])))
}

/// Builds the tokenizer of a GGUF file's `tokenizer.ggml.*` metadata.
pub(crate) fn build(gguf: &GgufFile, model: &str, v: &Vocabulary) -> Result<Tokenizer> {
    let ids = vocab_map(&v.tokens);
    let replace = |from: &str, to: &str| -> Result<NormalizerWrapper> {
        Replace::new(from, to)
            .map(NormalizerWrapper::Replace)
            .map_err(|e| build_err(gguf, "normalizer", e))
    };
    let tok = match model {
        "gpt2" => {
            let pre = gguf
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            let (pre, ignore_merges) = byte_level_pre(pre)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", gguf.path().display())))?;
            let bpe = BPE::builder()
                .vocab_and_merges(ids, merges(gguf)?)
                .ignore_merges(ignore_merges)
                .build()
                .map_err(|e| build_err(gguf, "BPE", e))?;
            let mut t = Tokenizer::new(bpe);
            t.with_pre_tokenizer(Some(pre));
            t.with_decoder(Some(ByteLevelDecoder::default()));
            t
        }
        "llama" => {
            let unk = v
                .tokens
                .get(unk_id(gguf, 0))
                .cloned()
                .unwrap_or_else(|| "<unk>".into());
            let m = spm_merges(v, &ids);
            let bpe = BPE::builder()
                .vocab_and_merges(ids, m)
                .byte_fallback(true)
                .unk_token(unk)
                .fuse_unk(true)
                .build()
                .map_err(|e| build_err(gguf, "SentencePiece BPE", e))?;
            let mut t = Tokenizer::new(bpe);
            let mut norms = Vec::new();
            if flag(gguf, "tokenizer.ggml.add_space_prefix", true) {
                norms.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
            }
            norms.push(replace(" ", "▁")?);
            t.with_normalizer(Some(NormSequence::new(norms)))
                .map_err(|e| build_err(gguf, "normalizer", e))?;
            t.with_decoder(Some(spm_decoder(gguf)?));
            t
        }
        "gemma4" => {
            let bpe = BPE::builder()
                .vocab_and_merges(ids, merges(gguf)?)
                .byte_fallback(true)
                .build()
                .map_err(|e| build_err(gguf, "BPE", e))?;
            let mut t = Tokenizer::new(bpe);
            t.with_normalizer(Some(replace(" ", "▁")?))
                .map_err(|e| build_err(gguf, "normalizer", e))?;
            t.with_pre_tokenizer(Some(split(r"[^\n]+|[\n]+")?));
            t.with_decoder(Some(spm_decoder(gguf)?));
            t
        }
        "t5" => {
            let pieces: Vec<(String, f64)> = v
                .tokens
                .iter()
                .cloned()
                .zip(v.scores.iter().copied())
                .collect();
            let uni = Unigram::from(pieces, Some(unk_id(gguf, 2)), false)
                .map_err(|e| build_err(gguf, "unigram model", e))?;
            let mut t = Tokenizer::new(uni);
            let mut norms = Vec::new();
            if let Some(map) = gguf
                .get("tokenizer.ggml.precompiled_charsmap")
                .and_then(|v| v.as_array())
            {
                let bytes: Vec<u8> = map.iter().map(|b| b.as_i64().unwrap_or(0) as u8).collect();
                let p = Precompiled::from(&bytes)
                    .map_err(|e| build_err(gguf, "precompiled normalizer", e))?;
                norms.push(NormalizerWrapper::Precompiled(p));
            }
            if flag(gguf, "tokenizer.ggml.remove_extra_whitespaces", true) {
                let squeeze = Replace::new(
                    tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
                    " ",
                )
                .map_err(|e| build_err(gguf, "normalizer", e))?;
                norms.push(NormalizerWrapper::Replace(squeeze));
                norms.push(NormalizerWrapper::StripNormalizer(Strip::new(true, true)));
            }
            t.with_normalizer(Some(NormSequence::new(norms)))
                .map_err(|e| build_err(gguf, "normalizer", e))?;
            let scheme = if flag(gguf, "tokenizer.ggml.add_space_prefix", true) {
                PrependScheme::Always
            } else {
                PrependScheme::Never
            };
            t.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, true)));
            t.with_decoder(Some(tokenizers::decoders::metaspace::Metaspace::new(
                '▁', scheme, true,
            )));
            t
        }
        "bert" => {
            let mut wp = Vocab::default();
            for (i, t) in v.tokens.iter().enumerate() {
                let key = match t.strip_prefix('▁') {
                    Some(word) => word.to_string(),
                    None if v.types[i] == 3 || (t.starts_with('[') && t.ends_with(']')) => {
                        t.clone()
                    }
                    None => format!("##{t}"),
                };
                wp.insert(key, i as u32);
            }
            let unk = v
                .tokens
                .get(unk_id(gguf, 100))
                .cloned()
                .unwrap_or_else(|| "[UNK]".into());
            let model = WordPiece::builder()
                .vocab(wp)
                .unk_token(unk)
                .max_input_chars_per_word(100)
                .build()
                .map_err(|e| build_err(gguf, "WordPiece", e))?;
            let mut t = Tokenizer::new(model);
            t.with_normalizer(Some(BertNormalizer::new(true, true, Some(true), true)))
                .map_err(|e| build_err(gguf, "normalizer", e))?;
            t.with_pre_tokenizer(Some(BertPreTokenizer));
            t.with_decoder(Some(WordPieceDecoder::default()));
            t
        }
        other => {
            return Err(Error::Unsupported {
                path: gguf.path().into(),
                why: format!(
                    "tokenizer model `{other}` (lmkit builds gpt2, llama, gemma4, t5 and bert tokenizers from GGUF; pass an HF folder with tokenizer.json for others)"
                ),
            })
        }
    };
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_pre_tokenizer_builds_and_unknown_ones_are_named() {
        for p in PRE_TOKENIZERS {
            byte_level_pre(p).unwrap();
        }
        let e = byte_level_pre("no-such-pre").unwrap_err().to_string();
        assert!(e.contains("no-such-pre") && e.contains("llama-bpe"), "{e}");
        assert!(byte_level_pre("llama-bpe").unwrap().1);
        assert!(!byte_level_pre("qwen2").unwrap().1);
    }

    #[test]
    fn spm_merges_follow_the_scores() {
        let v = Vocabulary {
            tokens: ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
                .map(String::from)
                .to_vec(),
            types: vec![2, 1, 1, 1, 1, 1, 1],
            scores: vec![0.0, -1.0, -1.0, -1.0, -3.0, -2.0, -4.0],
        };
        let ids = vocab_map(&v.tokens);
        let m = spm_merges(&v, &ids);
        // "bc" (−2) before "ab" (−3) before the two ways to make "abc" (−4), by ids.
        assert_eq!(
            m,
            [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .to_vec()
        );
    }
}
