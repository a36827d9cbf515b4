//! Training a new byte-level BPE tokenizer (the `tokenizers` crate's trainer) with the
//! pre-tokenizer of the default model (SmolLM2's: digits one by one, then GPT-2 byte-level
//! BPE without a prefix space), so the result writes to GGUF as a `smollm` tokenizer and
//! llama.cpp reads it.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::tokenizer::{LoadedTokenizer, SpecialTokens};
use crate::write::atomic_write;
use crate::{Error, Result};

/// The special tokens a trained tokenizer gets, ids 0, 1, 2: end of text (also bos/eos) and
/// the ChatML turn markers, so chat data and templates work out of the box.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// ChatML, the template a trained tokenizer carries.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Trains a BPE tokenizer of `vocab_size` tokens (the 256 byte symbols and [`SPECIALS`]
/// included) on `texts`; pairs seen fewer than `min_frequency` times are not merged.
pub fn train_bpe<I, S>(texts: I, vocab_size: usize, min_frequency: u64) -> Result<LoadedTokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let floor = 256 + SPECIALS.len();
    if vocab_size <= floor {
        return Err(Error::Tokenizer(format!(
            "vocab size {vocab_size} must exceed the {floor} byte and special tokens"
        )));
    }
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]))));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| Error::Tokenizer(format!("BPE training: {e}")))?;
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| Error::Tokenizer(format!("special tokens: {e}")))?;
    let eos = tokenizer.token_to_id(SPECIALS[0]);
    let mut special = SpecialTokens {
        bos: eos,
        eos,
        stop: Vec::new(),
        add_bos: false,
    };
    for s in [SPECIALS[0], SPECIALS[2]] {
        special.stop.extend(tokenizer.token_to_id(s));
    }
    Ok(LoadedTokenizer {
        tokenizer,
        special,
        chat_template: Some(CHATML.into()),
    })
}

/// Writes `tok` as an HF tokenizer folder: `tokenizer.json` and `tokenizer_config.json`
/// (special tokens and chat template), each atomically.
pub fn save_folder(tok: &LoadedTokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = tok
        .tokenizer
        .to_string(true)
        .map_err(|e| Error::Tokenizer(format!("serializing: {e}")))?;
    let path = dir.join("tokenizer.json");
    atomic_write(&path, |w| std::io::Write::write_all(w, json.as_bytes()))?;
    let name = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let cfg = serde_json::json!({
        "bos_token": name(tok.special.bos),
        "eos_token": name(tok.special.eos),
        "add_bos_token": tok.special.add_bos,
        "chat_template": tok.chat_template,
    });
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Tokenizer(e.to_string()))?;
    atomic_write(&dir.join("tokenizer_config.json"), |w| {
        std::io::Write::write_all(w, text.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_saves_and_reloads() -> Result<()> {
        let text: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "the quick brown fox {i} jumps over the lazy dog number {}",
                    i * 7
                )
            })
            .collect();
        let tok = train_bpe(text.iter(), 400, 2)?;
        assert!(tok.tokenizer.get_vocab_size(true) <= 400);
        assert_eq!(tok.tokenizer.token_to_id("<|endoftext|>"), Some(0));
        let ids = tok.encode("the quick brown fox 123")?;
        // Merges happened (fewer tokens than bytes), digits stay one per token, and decoding
        // gives the text back.
        assert!(ids.len() < "the quick brown fox 123".len());
        let back = tok
            .tokenizer
            .decode(&ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        assert_eq!(back, "the quick brown fox 123");
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        save_folder(&tok, dir.path())?;
        let re = LoadedTokenizer::from_tokenizer_json(&dir.path().join("tokenizer.json"))?;
        assert_eq!(re.encode("the quick brown fox 123")?, ids);
        assert_eq!(re.special.eos, Some(0));
        assert!(re.chat_template.is_some());
        // And it writes to GGUF metadata as a `smollm` tokenizer.
        let meta = re.gguf_metadata()?;
        let pre = meta.iter().find(|(k, _)| k == "tokenizer.ggml.pre");
        assert!(matches!(pre, Some((_, crate::gguf::Value::String(s))) if s == "smollm"));
        assert!(train_bpe(text.iter(), 100, 2).is_err());
        Ok(())
    }
}
