//! Tokenizers: from GGUF metadata (BPE vocab, merges, pre-tokenizer, special tokens) or from an
//! HF `tokenizer.json`.
//!
//! The GGUF path builds the tokenizer itself because the pre-tokenizer matters: SmolLM2's
//! (`tokenizer.ggml.pre = "smollm"`) splits digits one by one and then applies byte-level BPE
//! without a prefix space; a generic fallback that adds a prefix space encodes every chat turn
//! wrongly.

use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::GgufFile;
use crate::{Error, Result};

/// Special ids a runtime needs.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end a chat turn or a document (eos, `<|im_end|>`, `<|eot_id|>`, ...).
    pub stop: Vec<u32>,
    pub add_bos: bool,
}

/// A tokenizer plus the special ids and chat template found next to it.
#[derive(Clone)]
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for LoadedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTokenizer")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("special", &self.special)
            .finish()
    }
}

impl LoadedTokenizer {
    /// Encodes text; special-token strings in `text` become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text for scoring or generation: adds BOS when the model asks for it.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if self.special.add_bos {
            if let Some(b) = self.special.bos {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text (special tokens are kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.tokenizer.token_to_id(s)
    }

    /// The unknown token's id, for vocabularies that have one (`<unk>`, `[UNK]`).
    pub fn unk_id(&self) -> Option<u32> {
        ["<unk>", "[UNK]", "<UNK>", "<|unk|>"]
            .iter()
            .find_map(|s| self.tokenizer.token_to_id(s))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Loads an HF `tokenizer.json`, with special ids from `tokenizer_config.json` when present.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Missing {
                path: path.into(),
                what: "tokenizer.json".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut special = SpecialTokens::default();
        let mut chat_template = None;
        let cfg = path.with_file_name("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg) {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: cfg.clone(),
                    err: source,
                })?;
            let tok = |k: &str| -> Option<u32> {
                let s = match &v[k] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                    _ => return None,
                };
                tokenizer.token_to_id(&s)
            };
            special.bos = tok("bos_token");
            special.eos = tok("eos_token");
            special.add_bos = v["add_bos_token"].as_bool().unwrap_or(false);
            chat_template = v["chat_template"].as_str().map(String::from);
        }
        finish_special(&tokenizer, &mut special);
        Ok(Self {
            tokenizer,
            special,
            chat_template,
        })
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`): byte-level BPE (`gpt2`),
    /// SentencePiece BPE (`llama`), `gemma4`, SentencePiece unigram (`t5`) or WordPiece
    /// (`bert`), as llama.cpp builds them (see [`crate::tokenizer_gguf`]).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path();
        let model = gguf.get_str("tokenizer.ggml.model")?;
        let v = crate::tokenizer_gguf::vocabulary(gguf)?;
        let mut tokenizer = crate::tokenizer_gguf::build(gguf, model, &v)?;
        let strings = &v.tokens;

        // Control (3) and user-defined (4) tokens are matched before BPE, as llama.cpp does.
        let mut added = Vec::new();
        for (i, t) in v.types.iter().enumerate() {
            if matches!(t, 3 | 4) {
                if let Some(s) = strings.get(i) {
                    added.push(AddedToken::from(s.clone(), true));
                }
            }
        }
        tokenizer
            .add_special_tokens(added)
            .map_err(|e| Error::Tokenizer(format!("{}: special tokens: {e}", path.display())))?;

        let id = |k: &str| gguf.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let mut special = SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            stop: Vec::new(),
            add_bos: gguf
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        if let Some(e) = id("tokenizer.ggml.eot_token_id") {
            special.stop.push(e);
        }
        finish_special(&tokenizer, &mut special);
        let chat_template = gguf
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(String::from);
        Ok(Self {
            tokenizer,
            special,
            chat_template,
        })
    }
}

impl LoadedTokenizer {
    /// The `tokenizer.*` GGUF metadata of this tokenizer, as llama.cpp reads it: a byte-level
    /// BPE (`gpt2` model) with its tokens in id order, merges, token types (added special tokens
    /// are control tokens), the pre-tokenizer's llama.cpp name, the special ids and the chat
    /// template. The inverse of [`LoadedTokenizer::from_gguf`].
    pub fn gguf_metadata(&self) -> Result<Vec<(String, crate::gguf::Value)>> {
        use crate::gguf::Value;
        let bad = |why: String| Error::Tokenizer(format!("GGUF export of the tokenizer: {why}"));
        let json: serde_json::Value = serde_json::from_str(
            &self
                .tokenizer
                .to_string(false)
                .map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        let model = &json["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(bad(format!(
                "only byte-level BPE tokenizers can be written to GGUF, this one is {}",
                model["type"]
            )));
        }
        let n = self.tokenizer.get_vocab_size(true);
        let mut tokens = vec![String::new(); n];
        for (tok, id) in self.tokenizer.get_vocab(true) {
            if let Some(slot) = tokens.get_mut(id as usize) {
                *slot = tok;
            }
        }
        if let Some(i) = tokens.iter().position(|t| t.is_empty()) {
            return Err(bad(format!(
                "token id {i} has no string (ids must be dense)"
            )));
        }
        let specials: std::collections::HashSet<u32> = json["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["special"].as_bool() == Some(true))
            .filter_map(|t| t["id"].as_u64().map(|v| v as u32))
            .collect();
        let types: Vec<Value> = (0..n as u32)
            .map(|i| Value::I32(if specials.contains(&i) { 3 } else { 1 }))
            .collect();
        // Merges are stored as "a b" strings or as ["a", "b"] pairs, by tokenizers version.
        let merges: Vec<Value> = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(p) => {
                    Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                }
                _ => None,
            })
            .map(Value::String)
            .collect();
        let mut meta = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".into(),
                Value::String(pre_name(&json["pre_tokenizer"]).into()),
            ),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.merges".into(), Value::Array(merges)),
            (
                "tokenizer.ggml.add_bos_token".into(),
                Value::Bool(self.special.add_bos),
            ),
        ];
        if let Some(b) = self.special.bos {
            meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
        }
        if let Some(e) = self.special.eos {
            meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
        }
        if let Some(t) = &self.chat_template {
            meta.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
        }
        Ok(meta)
    }
}

/// llama.cpp's name for a tokenizer.json pre-tokenizer (the inverse of [`pre_tokenizer`]).
fn pre_name(pre: &serde_json::Value) -> &'static str {
    let kinds: Vec<&str> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str())
            .collect(),
        Some(t) => vec![t],
        None => vec![],
    };
    match kinds.as_slice() {
        ["Digits", "ByteLevel"] => "smollm",
        ["Split", "ByteLevel"] => "llama-bpe",
        _ => "gpt2",
    }
}

/// Adds eos and the usual end-of-turn tokens to the stop set.
fn finish_special(tokenizer: &Tokenizer, special: &mut SpecialTokens) {
    if let Some(e) = special.eos {
        special.stop.push(e);
    }
    for s in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"] {
        if let Some(id) = tokenizer.token_to_id(s) {
            special.stop.push(id);
        }
    }
    special.stop.sort_unstable();
    special.stop.dedup();
}
