//! Preference pairs for DPO: JSONL (optionally gzip-compressed) in the common
//! `{"prompt", "chosen", "rejected"}` layout, or Anthropic HH-RLHF's `{"chosen", "rejected"}` full
//! dialogues, split as the DPO reference code splits them: the prompt is `chosen` up to and
//! including its last `"\n\nAssistant:"`, the responses are what follows in each.

use std::io::Read;
use std::path::Path;

use lmkit_core::{Device, Tensor};
use lmkit_formats::tokenizer::LoadedTokenizer;

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

const ASSISTANT: &str = "\n\nAssistant:";

/// Reads every pair of a `.jsonl` or `.jsonl.gz` file.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    let err = |why: String| Error::Data(format!("{}: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let text = if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .map_err(|e| err(format!("gzip: {e}")))?;
        s
    } else {
        String::from_utf8(bytes).map_err(|e| err(e.to_string()))?
    };
    let mut out = Vec::new();
    let (mut skipped, mut same) = (0, 0);
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("line {}: {e}", i + 1)))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
        let pair = match (s("prompt"), s("chosen"), s("rejected")) {
            (Some(prompt), Some(chosen), Some(rejected)) => Pair {
                prompt,
                chosen,
                rejected,
            },
            (None, Some(c), Some(r)) => {
                let at = c.rfind(ASSISTANT).ok_or_else(|| {
                    err(format!(
                        "line {}: no prompt and no \"\\n\\nAssistant:\" turn",
                        i + 1
                    ))
                })?;
                let prompt = c[..at + ASSISTANT.len()].to_string();
                if !r.starts_with(&prompt) {
                    // A few HH-RLHF pairs diverge before the last turn: not a pair for DPO.
                    skipped += 1;
                    continue;
                }
                Pair {
                    chosen: c[prompt.len()..].to_string(),
                    rejected: r[prompt.len()..].to_string(),
                    prompt,
                }
            }
            _ => {
                return Err(err(format!(
                    "line {}: expected string fields prompt/chosen/rejected (or chosen/rejected)",
                    i + 1
                )))
            }
        };
        // The same response twice states no preference (its DPO gradient is zero).
        if pair.chosen == pair.rejected {
            same += 1;
            continue;
        }
        out.push(pair);
    }
    if same > 0 {
        tracing::warn!(
            "{}: skipped {same} pairs whose chosen and rejected responses are the same",
            path.display()
        );
    }
    if skipped > 0 {
        tracing::warn!(
            "{}: skipped {skipped} dialogue pairs whose chosen and rejected differ before the last \
             assistant turn",
            path.display()
        );
    }
    if out.is_empty() {
        let why = match same {
            0 => "no preference pairs".to_string(),
            n => format!("no preference pairs ({n} with the same chosen and rejected response)"),
        };
        return Err(err(why));
    }
    Ok(out)
}

/// A pair as token ids: prompt + response, with the response's positions marked, cut to
/// `max_len` tokens (the prompt is cut from the left, keeping at least `max_len / 2` response
/// tokens' room).
#[derive(Debug, Clone)]
pub struct TokenPair {
    pub chosen: (Vec<u32>, Vec<u32>),
    pub rejected: (Vec<u32>, Vec<u32>),
}

fn join(prompt: &[u32], resp: &[u32], max_len: usize) -> (Vec<u32>, Vec<u32>) {
    let resp = &resp[..resp.len().min(max_len.saturating_sub(1).max(1))];
    let keep = max_len.saturating_sub(resp.len()).min(prompt.len());
    let prompt = &prompt[prompt.len() - keep..];
    let ids: Vec<u32> = prompt.iter().chain(resp).copied().collect();
    let mask: Vec<u32> = (0..ids.len())
        .map(|j| u32::from(j >= prompt.len()))
        .collect();
    (ids, mask)
}

pub fn tokenize(tok: &LoadedTokenizer, p: &Pair, max_len: usize) -> Result<TokenPair> {
    let prompt = tok.encode(&p.prompt)?;
    let mut c = tok.encode(&p.chosen)?;
    let mut r = tok.encode(&p.rejected)?;
    if let Some(eos) = tok.special.eos {
        c.push(eos);
        r.push(eos);
    }
    Ok(TokenPair {
        chosen: join(&prompt, &c, max_len),
        rejected: join(&prompt, &r, max_len),
    })
}

/// Sequences padded on the right to one length: `(ids (b, t), mask (b, t))`; padding is masked.
pub fn pad(seqs: &[&(Vec<u32>, Vec<u32>)], pad_id: u32) -> Result<(Tensor, Tensor)> {
    let t = seqs.iter().map(|s| s.0.len()).max().unwrap_or(1).max(2);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for (i, m) in seqs.iter().map(|s| (&s.0, &s.1)) {
        ids.extend(i.iter().copied().chain(std::iter::repeat(pad_id)).take(t));
        mask.extend(m.iter().copied().chain(std::iter::repeat(0)).take(t));
    }
    let b = seqs.len();
    Ok((
        Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
        Tensor::from_vec(mask, (b, t), &Device::Cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_rlhf_dialogues_split_at_the_last_assistant_turn() {
        let dir = std::env::temp_dir().join(format!("lmkit-prefs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("p.jsonl");
        std::fs::write(
            &p,
            "{\"chosen\": \"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: ok?\\n\\nAssistant: yes\", \
             \"rejected\": \"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: ok?\\n\\nAssistant: no\"}\n\
             {\"prompt\": \"Q\", \"chosen\": \" a\", \"rejected\": \" b\"}\n",
        )
        .unwrap();
        let v = read_pairs(&p).unwrap();
        assert_eq!(
            v[0].prompt,
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: ok?\n\nAssistant:"
        );
        assert_eq!(
            (v[0].chosen.as_str(), v[0].rejected.as_str()),
            (" yes", " no")
        );
        assert_eq!(v[1].prompt, "Q");
        std::fs::write(&p, "{\"chosen\": 1}\n").unwrap();
        assert!(read_pairs(&p).unwrap_err().to_string().contains("line 1"));
        // Identical responses are no pair; only such lines: an error that says so.
        let same = "{\"prompt\": \"Q\", \"chosen\": \"\", \"rejected\": \"\"}\n";
        std::fs::write(
            &p,
            format!("{same}{{\"prompt\": \"Q\", \"chosen\": \" a\", \"rejected\": \" b\"}}\n"),
        )
        .unwrap();
        assert_eq!(read_pairs(&p).unwrap().len(), 1);
        std::fs::write(&p, same).unwrap();
        let e = read_pairs(&p).unwrap_err().to_string();
        assert!(e.contains("same chosen and rejected"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn joining_keeps_the_response_and_marks_it() {
        let (ids, mask) = join(&[1, 2, 3, 4, 5], &[8, 9], 4);
        assert_eq!(ids, [4, 5, 8, 9]);
        assert_eq!(mask, [0, 0, 1, 1]);
    }
}
