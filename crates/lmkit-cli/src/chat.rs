//! `lmkit chat`: interactive multi-turn chat. The conversation is re-rendered with the model's
//! template each turn; the KV cache reuses the shared prefix, and the oldest turns are dropped
//! when the conversation no longer fits the context.

use std::io::{BufRead, Write};

use anyhow::Result;
use lmkit::{Message, Session};

use crate::common::ModelArgs;
use crate::run::SamplingArgs;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  lmkit chat\n  lmkit chat --system \"You are a terse assistant.\" --temperature 0.3\n\nIn the chat: /reset clears the history, /exit (or Ctrl-D) quits."
)]
pub struct Args {
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub kv: crate::kv::KvArgs,
}

pub fn main(a: Args) -> Result<()> {
    let opts = a.sampling.options();
    opts.sampling.validate()?;
    let m = a.model.load()?;
    let ctx = m.model.config().max_position_embeddings;
    let mut session = match a.kv.single()? {
        Some(p) => Session::with_policy(&m.model, p)?,
        None => Session::new(&m.model),
    };
    let mut history: Vec<Message> = vec![];
    if let Some(s) = &a.system {
        history.push(Message::new("system", s));
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("chatting with {} (/reset, /exit)", m.path.display());
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        // Drop the oldest non-system turns until the prompt and the reply fit.
        let ids = loop {
            let text = m.chat.render(&history, true)?;
            let ids = m.tokenizer.encode_with_bos(&text)?;
            let first = history.iter().position(|m| m.role != "system");
            if ids.len().saturating_add(opts.max_tokens) <= ctx
                || first.is_none()
                || history.len() <= 1
            {
                break ids;
            }
            if let Some(i) = first {
                if history.len() - i <= 1 {
                    break ids;
                }
                history.remove(i);
            }
        };
        let g = lmkit::generate(
            &m.model,
            &m.tokenizer,
            &mut session,
            &ids,
            &opts,
            &mut |p| {
                print!("{p}");
                let _ = out.flush();
                true
            },
        );
        match g {
            Ok(g) => {
                println!();
                history.push(Message::new("assistant", g.text.trim()));
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
    Ok(())
}
