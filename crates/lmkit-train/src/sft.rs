//! Chat data for supervised fine-tuning: a conversation rendered with the model's chat template,
//! tokenized, and masked so that only the assistant's turns are training targets (what TRL's
//! `SFTTrainer` calls assistant-only loss).
//!
//! The assistant's span of turn `k` runs from the end of the template rendered for
//! `messages[..k]` with the generation prompt to the end of the template rendered for
//! `messages[..=k]`. So it holds the reply and the template's end-of-turn text (`<|im_end|>\n`
//! for ChatML), and the model learns to stop. A token is a target when it starts inside such a
//! span. Templates whose rendering of a prefix of the conversation is not a prefix of the whole
//! conversation's rendering are rejected.

use lmkit_formats::chat::{ChatTemplate, Message};
use lmkit_formats::tokenizer::LoadedTokenizer;

use crate::{Error, Result};

/// Token ids of the rendered conversation and their target mask (1 = assistant token).
pub fn chat_tokens(
    tok: &LoadedTokenizer,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<(Vec<u32>, Vec<u8>)> {
    let render = |m: &[Message], gen: bool| {
        template
            .render(m, gen)
            .map_err(|e| Error::Data(format!("chat template: {e}")))
    };
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for (k, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..k], true)?;
        let through = render(&messages[..=k], false)?;
        if !full.starts_with(&through) || !through.starts_with(&before) {
            return Err(Error::Data(format!(
                "the chat template does not render turn {k} as a prefix of the conversation, \
                 so the assistant's tokens cannot be located"
            )));
        }
        spans.push((before.len(), through.len()));
    }
    let enc = tok
        .tokenizer
        .encode(full.as_str(), false)
        .map_err(|e| Error::Data(format!("tokenizing a conversation: {e}")))?;
    let mask = enc
        .get_offsets()
        .iter()
        .map(|&(start, _)| u8::from(spans.iter().any(|&(a, b)| start >= a && start < b)))
        .collect();
    Ok((enc.get_ids().to_vec(), mask))
}

/// Parses a JSON conversation: `{"messages": [{"role": .., "content": ..}, ..]}`.
pub fn parse_messages(v: &serde_json::Value) -> Option<Vec<Message>> {
    v.get("messages")?
        .as_array()?
        .iter()
        .map(|m| {
            Some(Message::new(
                m.get("role")?.as_str()?,
                m.get("content")?.as_str()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_formats::gguf::GgufFile;
    use lmkit_models::testing::write_tiny_gguf;
    use lmkit_models::LlamaConfig;

    #[test]
    fn only_assistant_tokens_are_targets() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Data(e.to_string()))?;
        let p = dir.path().join("t.gguf");
        write_tiny_gguf(&p, &LlamaConfig::tiny(), 1, lmkit_core::GgmlDType::F32)?;
        let tok = LoadedTokenizer::from_gguf(&GgufFile::open(&p)?)?;
        let chat = ChatTemplate::chatml().map_err(|e| Error::Data(e.to_string()))?;
        let v = serde_json::json!({"messages": [
            {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "sat on"},
            {"role": "user", "content": "the mat"},
            {"role": "assistant", "content": "and the dog"},
        ]});
        let msgs = parse_messages(&v).ok_or_else(|| Error::Data("messages".into()))?;
        let (ids, mask) = chat_tokens(&tok, &chat, &msgs)?;
        assert_eq!(ids.len(), mask.len());
        // The targets decode to the replies and their end-of-turn markers, nothing else.
        let target: Vec<u32> = ids
            .iter()
            .zip(&mask)
            .filter(|(_, &m)| m == 1)
            .map(|(&i, _)| i)
            .collect();
        let text = tok
            .tokenizer
            .decode(&target, false)
            .map_err(|e| Error::Data(e.to_string()))?;
        assert!(
            text.contains("sat on") && text.contains("and the dog"),
            "{text}"
        );
        assert!(
            !text.contains("the cat") && !text.contains("the mat"),
            "{text}"
        );
        assert!(!text.contains("user"), "{text}");
        assert!(parse_messages(&serde_json::json!({"text": "x"})).is_none());
        Ok(())
    }
}
