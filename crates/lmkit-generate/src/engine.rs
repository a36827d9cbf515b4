//! Continuous batching: one thread owns the model and runs every active request's next tokens in
//! one batched forward call per step (`Llama::forward_batch_last`), so each weight matrix is
//! read once per step for all of them. Requests join between steps (their prompts are read in
//! chunks, sharing steps with the others' decoding) and leave as soon as they finish or their
//! receiver goes away (the client disconnected), which frees their slot and KV cache at once.
//!
//! The queue in front is bounded: [`EngineHandle::submit`] refuses a request when it is full
//! rather than letting latency grow without limit.
//!
//! A model on the reference path (the GPU, `--dtype bf16`, formats without lmkit kernels) runs
//! the same scheduler, but each request's step is its own forward call: requests interleave and
//! share the device, without batched products.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use lmkit_formats::tokenizer::LoadedTokenizer;
use lmkit_models::{KvCache, KvPolicy, Llama};

use crate::error::NonFinite;
use crate::generate::{FinishReason, GenerateOptions};
use crate::sampler::Sampler;
use crate::stop::{StopMatcher, StopState};
use crate::{Error, Result};

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests decoded together at most (the "slots").
    pub max_batch: usize,
    /// Requests waiting for a slot at most; beyond it `submit` answers `QueueFull`.
    pub max_queue: usize,
    /// Prompt tokens read per step at most, over all requests (the rest wait a step).
    pub prefill_tokens: usize,
    /// Prompts whose keys and values are kept for later requests that start the same way (a
    /// chat template's system prompt, a shared few-shot preamble); 0 turns this off.
    pub prefix_cache: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 64,
            prefill_tokens: 512,
            prefix_cache: 8,
        }
    }
}

/// One generated token, with log-probabilities when asked for.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: u32,
    /// `log p(id)` under the model (before temperature and truncation).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What a request's sink receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// New text (may be empty while a stop string or a UTF-8 sequence is pending) and the tokens
    /// generated since the last event.
    Text {
        piece: String,
        tokens: Vec<TokenInfo>,
    },
    /// The request finished.
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed (the message says why).
    Failed(String),
}

/// A request's receiver of events: returns `false` when nobody listens any more (the request
/// is then cancelled). An empty `Text` event (no piece, no tokens) is only a liveness probe,
/// sent while a request reads its prompt: answer it without passing it on.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// A generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// Top log-probabilities to report per token (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
    /// KV-cache policy for this request (`None`: the full cache).
    pub kv: Option<Arc<dyn KvPolicy>>,
    pub sink: Sink,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    QueueFull,
    Stopped,
}

/// Counters the server exports.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub steps: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead of being run.
    pub prompt_tokens_cached: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    /// Bytes of keys and values held by the active requests after the last step.
    pub kv_bytes: AtomicU64,
    /// Whether the engine thread is running (false once it ended, normally or not).
    pub alive: std::sync::atomic::AtomicBool,
}

/// Marks the engine stopped when its thread ends, even by a panic.
struct Alive<'a>(&'a EngineStats);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Relaxed);
    }
}

/// The submitting side of an engine; cheap to clone. When every handle is dropped the engine
/// finishes its active requests and its thread ends.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    stats: Arc<EngineStats>,
    context: usize,
    max_batch: usize,
}

impl EngineHandle {
    /// Queues `job`, or refuses it at once when the queue is full or the engine stopped.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Refused> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => Refused::QueueFull,
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// The model's context length: a prompt plus its new tokens must fit.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}

/// Starts the engine thread for `model`: batched steps on lmkit's native CPU path, one forward
/// call per request and step on the reference path (see the module doc).
pub fn start(
    model: Arc<Llama>,
    tokenizer: Arc<LoadedTokenizer>,
    cfg: EngineConfig,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    if cfg.max_batch == 0 || cfg.prefill_tokens == 0 {
        return Err(Error::Option {
            option: "max_batch / prefill_tokens".into(),
            why: "must be at least 1".into(),
        });
    }
    let (tx, rx) = sync_channel(cfg.max_queue);
    let stats = Arc::new(EngineStats::default());
    stats.alive.store(true, Ordering::Relaxed);
    let handle = EngineHandle {
        tx,
        stats: stats.clone(),
        context: model.config().max_position_embeddings,
        max_batch: cfg.max_batch,
    };
    let thread = std::thread::Builder::new()
        .name("lmkit-engine".into())
        .spawn(move || run(&model, &tokenizer, &cfg, &rx, &stats))
        .map_err(|e| Error::Kv(format!("cannot start the engine thread: {e}")))?;
    Ok((handle, thread))
}

/// One request in flight.
struct Seq {
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    cache: KvCache,
    sampler: Sampler,
    stops: StopMatcher,
    opts: GenerateOptions,
    logprobs: Option<usize>,
    out: Vec<u32>,
    history: Vec<u32>,
    text: String,
    emitted: usize,
    /// The last sampled token, to run next step.
    pending: Option<u32>,
    /// Tokens generated since the last event.
    fresh: Vec<TokenInfo>,
    sink: Sink,
    /// Whether this prompt may be kept in the prefix cache once read (no eviction policy).
    cacheable: bool,
}

/// Recently read prompts and their caches, most recent first.
#[derive(Default)]
struct Prefixes {
    entries: std::collections::VecDeque<(Vec<u32>, KvCache)>,
}

/// Fewest shared tokens worth reusing.
const MIN_PREFIX: usize = 8;

impl Prefixes {
    /// The longest cached prefix of `prompt` (leaving at least its last token to run): its
    /// length and a copy of its cache cut to it.
    fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, KvCache)> {
        let limit = prompt.len().saturating_sub(1);
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (t, _))| {
                let n = t.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (i, n.min(limit))
            })
            .max_by_key(|&(_, n)| n)?;
        if n < MIN_PREFIX {
            return None;
        }
        let mut cache = self.entries[i].1.snapshot()?;
        cache.truncate(n).ok()?;
        // Most recently used first.
        if let Some(e) = self.entries.remove(i) {
            self.entries.push_front(e);
        }
        Some((n, cache))
    }

    fn insert(&mut self, prompt: &[u32], cache: &KvCache, max: usize) {
        if max == 0 || prompt.len() < MIN_PREFIX {
            return;
        }
        // Already covered by an entry that extends it.
        if self
            .entries
            .iter()
            .any(|(t, _)| t.len() >= prompt.len() && t[..prompt.len()] == *prompt)
        {
            return;
        }
        let Some(snap) = cache.snapshot() else { return };
        self.entries
            .retain(|(t, _)| !(t.len() < prompt.len() && prompt[..t.len()] == **t));
        self.entries.push_front((prompt.to_vec(), snap));
        self.entries.truncate(max);
    }
}

impl Seq {
    /// The sequence for `job`, or the reason it cannot run and its sink (to report it).
    #[allow(clippy::result_large_err)]
    fn new(
        model: &Llama,
        job: Job,
        prefixes: &mut Prefixes,
    ) -> std::result::Result<Self, (Error, Sink)> {
        let Job {
            prompt,
            opts,
            logprobs,
            kv,
            sink,
        } = job;
        let ctx = model.config().max_position_embeddings;
        let cacheable = kv.is_none();
        let checked = (|| -> Result<(KvCache, Sampler, usize)> {
            if prompt.is_empty() {
                return Err(Error::EmptyPrompt);
            }
            let vocab = model.config().vocab_size;
            if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::Model(lmkit_models::Error::TokenOutOfRange {
                    id,
                    vocab,
                }));
            }
            if prompt.len().saturating_add(opts.max_tokens) > ctx {
                return Err(Error::PromptTooLong {
                    prompt: prompt.len(),
                    new: opts.max_tokens,
                    context: ctx,
                });
            }
            let (mut cache, fed) = match kv {
                Some(p) => {
                    let mut c = model.new_cache();
                    c.set_policy(p)?;
                    (c, 0)
                }
                None => match prefixes.lookup(&prompt) {
                    Some((n, c)) => (c, n),
                    None => (model.new_cache(), 0),
                },
            };
            cache.plan(prompt.len() + opts.max_tokens);
            Ok((cache, Sampler::new(opts.sampling.clone())?, fed))
        })();
        let (cache, sampler, fed) = match checked {
            Ok(c) => c,
            Err(e) => return Err((e, sink)),
        };
        Ok(Self {
            sampler,
            stops: StopMatcher::new(opts.stop.clone()),
            history: prompt.clone(),
            prompt,
            fed,
            cache,
            opts,
            logprobs,
            out: Vec::new(),
            text: String::new(),
            emitted: 0,
            pending: None,
            fresh: Vec::new(),
            sink,
            cacheable,
        })
    }

    /// Handles the logits after the whole prompt and every generated token: samples, checks the
    /// stop rules, emits. Returns `Some(reason)` when finished, `Err` when the client left.
    fn advance(
        &mut self,
        tok: &LoadedTokenizer,
        mut logits: Vec<f32>,
    ) -> std::result::Result<Option<FinishReason>, ()> {
        let info = self.logprobs.map(|k| logprob_info(&logits, k));
        let next = self.sampler.sample(&mut logits, &self.history);
        if self.opts.stop_at_eos && tok.special.stop.contains(&next) {
            // Text held back as a possible start of a stop string is final now.
            let settled = self.text.trim_end_matches('\u{FFFD}').len();
            let rest = self.text[self.emitted.min(settled)..settled].to_string();
            self.emitted = settled;
            self.text.truncate(settled);
            self.emit(rest)?;
            return Ok(Some(FinishReason::Stop));
        }
        self.out.push(next);
        self.history.push(next);
        self.fresh.push(match info {
            Some((lp_of, top)) => TokenInfo {
                id: next,
                logprob: lp_of(next),
                top,
            },
            None => TokenInfo {
                id: next,
                logprob: f32::NAN,
                top: vec![],
            },
        });
        self.text = tok.decode(&self.out).unwrap_or_default();
        // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes.
        let settled = self.text.trim_end_matches('\u{FFFD}').len();
        match self.stops.check(&self.text[..settled]) {
            StopState::Stop { at } => {
                let piece = self.text[self.emitted.min(at)..at].to_string();
                self.emit(piece)?;
                self.text.truncate(at);
                return Ok(Some(FinishReason::Stop));
            }
            StopState::Continue { emit_to } => {
                if emit_to > self.emitted {
                    let piece = self.text[self.emitted..emit_to].to_string();
                    self.emitted = emit_to;
                    self.emit(piece)?;
                }
            }
        }
        if self.out.len() >= self.opts.max_tokens {
            let rest = self.text[self.emitted.min(self.text.len())..].to_string();
            self.emitted = self.text.len();
            self.emit(rest)?;
            return Ok(Some(FinishReason::Length));
        }
        self.pending = Some(next);
        Ok(None)
    }

    fn emit(&mut self, piece: String) -> std::result::Result<(), ()> {
        if piece.is_empty() && self.fresh.is_empty() {
            return Ok(());
        }
        let tokens = std::mem::take(&mut self.fresh);
        if (self.sink)(Event::Text { piece, tokens }) {
            Ok(())
        } else {
            Err(())
        }
    }
}

/// `log softmax(logits)` of any token (a closure) and the `k` most likely tokens.
#[allow(clippy::type_complexity)]
fn logprob_info(logits: &[f32], k: usize) -> (Box<dyn Fn(u32) -> f32>, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
    }
    let mut top: Vec<(u32, f32)> = idx[..k]
        .iter()
        .map(|&i| (i, logits[i as usize] - lse))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    let lp: Vec<f32> = logits.iter().map(|&x| x - lse).collect();
    (
        Box::new(move |i| lp.get(i as usize).copied().unwrap_or(f32::NEG_INFINITY)),
        top,
    )
}

fn run(
    model: &Llama,
    tok: &LoadedTokenizer,
    cfg: &EngineConfig,
    rx: &Receiver<Job>,
    stats: &EngineStats,
) {
    let _alive = Alive(stats);
    let mut active: Vec<Seq> = Vec::new();
    let mut prefixes = Prefixes::default();
    let mut scratch = lmkit_models::native::BatchScratch::default();
    let mut open = true;
    loop {
        // Admit waiting requests while there are free slots.
        while open && active.len() < cfg.max_batch {
            let job = if active.is_empty() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            match Seq::new(model, job, &mut prefixes) {
                Ok(s) => {
                    stats
                        .prompt_tokens
                        .fetch_add(s.prompt.len() as u64, Ordering::Relaxed);
                    stats
                        .prompt_tokens_cached
                        .fetch_add(s.fed as u64, Ordering::Relaxed);
                    active.push(s);
                }
                Err((e, mut sink)) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    sink(Event::Failed(e.to_string()));
                }
            }
        }
        stats.active.store(active.len(), Ordering::Relaxed);
        if active.is_empty() {
            if open {
                continue;
            }
            return;
        }
        step(
            model,
            tok,
            cfg,
            &mut active,
            stats,
            &mut prefixes,
            &mut scratch,
        );
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.active.store(active.len(), Ordering::Relaxed);
        let kv: usize = active.iter().map(|s| s.cache.kv_bytes().0).sum();
        stats.kv_bytes.store(kv as u64, Ordering::Relaxed);
    }
}

/// One batched forward call over every request that has work this step, then sampling.
fn step(
    model: &Llama,
    tok: &LoadedTokenizer,
    cfg: &EngineConfig,
    active: &mut Vec<Seq>,
    stats: &EngineStats,
    prefixes: &mut Prefixes,
    scratch: &mut lmkit_models::native::BatchScratch,
) {
    let t0 = Instant::now();
    // Decoding requests first (one token each), then prompt chunks within the budget.
    let mut budget = cfg.prefill_tokens;
    let mut plan: Vec<(usize, Vec<u32>)> = Vec::new();
    for (i, s) in active.iter().enumerate() {
        if let Some(t) = s.pending {
            plan.push((i, vec![t]));
        }
    }
    for (i, s) in active.iter().enumerate() {
        if s.pending.is_none() && s.fed < s.prompt.len() && budget > 0 {
            let n = (s.prompt.len() - s.fed).min(budget);
            budget -= n;
            plan.push((i, s.prompt[s.fed..s.fed + n].to_vec()));
        }
    }
    if plan.is_empty() {
        return;
    }
    plan.sort_by_key(|p| p.0);
    let ids: Vec<&[u32]> = plan.iter().map(|p| p.1.as_slice()).collect();
    let mut caches: Vec<&mut KvCache> = Vec::with_capacity(plan.len());
    {
        let mut k = 0;
        for (i, s) in active.iter_mut().enumerate() {
            if k < plan.len() && plan[k].0 == i {
                caches.push(&mut s.cache);
                k += 1;
            }
        }
    }
    // A panic in the forward pass fails this step's requests, not the server.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if model.is_native() {
            model.forward_batch_last_with(&ids, &mut caches, Some(&mut *scratch))
        } else {
            one_by_one(model, &ids, &mut caches)
        }
    }));
    drop(caches);
    let result = match result {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => {
            *scratch = Default::default();
            Err(format!(
                "internal error: {}",
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the forward pass panicked".into())
            ))
        }
    };
    let logits = match result {
        Ok(l) => l,
        Err(msg) => {
            // Everything in this step fails; the rest go on.
            for &(i, _) in plan.iter().rev() {
                let mut s = active.remove(i);
                (s.sink)(Event::Failed(msg.clone()));
                stats.failed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    // Finished (`Ok(Some)`), gone (`Ok(None)`: the client left) or failed.
    let mut done: Vec<(usize, std::result::Result<Option<FinishReason>, String>)> = Vec::new();
    for ((i, run), l) in plan.iter().zip(logits) {
        let s = &mut active[*i];
        if s.pending.take().is_none() {
            s.fed += run.len();
            if s.fed < s.prompt.len() {
                continue;
            }
            // The whole prompt is in the cache: keep it for requests that start alike.
            if s.cacheable {
                prefixes.insert(&s.prompt, &s.cache, cfg.prefix_cache);
            }
        }
        if let Err(e) = NonFinite::check(&l, s.prompt.len() + s.out.len() - 1) {
            done.push((*i, Err(e.to_string())));
            continue;
        }
        match s.advance(tok, l) {
            Ok(None) => {}
            Ok(Some(f)) => done.push((*i, Ok(Some(f)))),
            Err(()) => done.push((*i, Ok(None))),
        }
    }
    // Sinks that went away since their last event (a client that disconnected while its
    // request was still reading its prompt).
    for (i, s) in active.iter_mut().enumerate() {
        if done.iter().all(|d| d.0 != i)
            && !s.fed_all()
            && !(s.sink)(Event::Text {
                piece: String::new(),
                tokens: vec![],
            })
        {
            done.push((i, Ok(None)));
        }
    }
    done.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (i, finish) in done {
        let mut s = active.remove(i);
        // Counted before the client hears it is done, so what it reads next is current.
        stats.active.store(active.len(), Ordering::Relaxed);
        stats
            .generated_tokens
            .fetch_add(s.out.len() as u64, Ordering::Relaxed);
        match finish {
            Err(msg) => {
                (s.sink)(Event::Failed(msg));
                stats.failed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(f)) => {
                (s.sink)(Event::Done {
                    finish: f,
                    prompt_tokens: s.prompt.len(),
                    completion_tokens: s.out.len(),
                });
                stats.finished.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tracing::trace!(
        "step: {} sequences, {:.1} ms",
        ids.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
}

impl Seq {
    fn fed_all(&self) -> bool {
        self.fed >= self.prompt.len()
    }
}

/// The reference path's step: each sequence's tokens in their own forward call; the logits
/// of each one's last position.
fn one_by_one(
    model: &Llama,
    ids: &[&[u32]],
    caches: &mut [&mut KvCache],
) -> lmkit_models::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(ids.len());
    for (s, cache) in ids.iter().zip(caches.iter_mut()) {
        let x = lmkit_core::Tensor::new(*s, model.device())?.unsqueeze(0)?;
        let logits = model.forward_last(&x, cache)?;
        out.push(logits.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_core::GgmlDType;
    use lmkit_models::testing::write_tiny_gguf;
    use lmkit_models::{load, LlamaConfig, LoadOptions};
    use std::sync::Mutex;

    fn one_hot(v: usize, id: u32) -> Vec<f32> {
        let mut l = vec![0.0; v];
        l[id as usize] = 10.0;
        l
    }

    #[test]
    fn end_of_turn_flushes_text_held_back_for_a_stop_string() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        write_tiny_gguf(&p, &LlamaConfig::tiny(), 1, GgmlDType::F32).unwrap();
        let m = load(&p, LoadOptions::default()).unwrap();
        let tok = &m.tokenizer;
        let v = m.model.config().vocab_size;
        // A token with visible text, and a stop string it is a proper prefix of.
        let id = (3..v as u32)
            .find(|&i| tok.decode(&[i]).is_ok_and(|s| s.trim().len() >= 2))
            .unwrap();
        let text = tok.decode(&[id]).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let job = Job {
            prompt: vec![id, id],
            opts: GenerateOptions {
                sampling: crate::SamplingParams::greedy(),
                max_tokens: 8,
                stop: vec![format!("{text}QQQ")],
                ..Default::default()
            },
            logprobs: None,
            kv: None,
            sink: Box::new(move |e| {
                ev.lock().unwrap().push(e);
                true
            }),
        };
        let mut prefixes = Prefixes::default();
        let Ok(mut s) = Seq::new(&m.model, job, &mut prefixes) else {
            panic!("a valid job")
        };
        assert_eq!(s.advance(tok, one_hot(v, id)), Ok(None));
        // Held back: it may be the start of the stop string.
        assert!(events.lock().unwrap().is_empty());
        let eos = *tok.special.stop.first().unwrap();
        assert_eq!(
            s.advance(tok, one_hot(v, eos)),
            Ok(Some(FinishReason::Stop))
        );
        let got = events.lock().unwrap();
        match got.as_slice() {
            [Event::Text { piece, tokens }] => {
                assert_eq!(piece, &text);
                assert_eq!(tokens.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    /// An engine on the model file `p`, its thread, and the model's vocabulary size.
    fn engine_on(p: &std::path::Path) -> (EngineHandle, std::thread::JoinHandle<()>, u32) {
        let m = load(p, LoadOptions::default()).unwrap();
        let v = m.model.config().vocab_size as u32;
        let (h, thread) = start(
            Arc::new(m.model),
            Arc::new(m.tokenizer),
            EngineConfig::default(),
        )
        .unwrap();
        (h, thread, v)
    }

    /// Submits one job per prompt; their events arrive tagged with the prompt's index.
    fn submit(
        h: &EngineHandle,
        prompts: Vec<Vec<u32>>,
        max_tokens: usize,
        logprobs: Option<usize>,
    ) -> std::sync::mpsc::Receiver<(usize, Event)> {
        let (tx, rx) = std::sync::mpsc::channel();
        for (k, prompt) in prompts.into_iter().enumerate() {
            let tx = tx.clone();
            h.submit(Job {
                prompt,
                opts: GenerateOptions {
                    max_tokens,
                    ..Default::default()
                },
                logprobs,
                kv: None,
                sink: Box::new(move |e| tx.send((k, e)).is_ok()),
            })
            .unwrap();
        }
        rx
    }

    #[test]
    fn a_bad_request_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        write_tiny_gguf(&p, &LlamaConfig::tiny(), 1, GgmlDType::Q8_0).unwrap();
        let (h, thread, v) = engine_on(&p);
        let rx = submit(
            &h,
            vec![vec![5, 6, 7], vec![5, v + 3], vec![8, 9]],
            6,
            Some(2),
        );
        let mut ends = [None, None, None];
        while ends.iter().any(|e| e.is_none()) {
            let (k, e) = rx.recv().unwrap();
            match e {
                Event::Done { .. } => ends[k] = Some("done".to_string()),
                Event::Failed(msg) => ends[k] = Some(msg),
                Event::Text { tokens, .. } => {
                    assert!(tokens.iter().all(|t| t.logprob <= 0.0 && t.top.len() == 2))
                }
            }
        }
        assert_eq!(ends[0].as_deref(), Some("done"));
        assert!(
            ends[1].as_deref().unwrap().contains("out of range"),
            "{ends:?}"
        );
        assert_eq!(ends[2].as_deref(), Some("done"));
        drop(h);
        thread.join().unwrap();
    }

    /// A model whose logits are NaN: each request fails with the reason (it used to finish
    /// with nothing generated), counted as failed, and the engine goes on.
    #[test]
    fn nan_logits_fail_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nan.gguf");
        let cfg = LlamaConfig::tiny();
        lmkit_models::testing::write_tiny_gguf_with(&p, &cfg, 1, GgmlDType::F32, |name, v| {
            if name == "model.norm.weight" {
                v[2] = f32::NAN;
            }
        })
        .unwrap();
        let (h, thread, _) = engine_on(&p);
        let rx = submit(&h, vec![vec![5, 6, 7]; 2], 4, None);
        let mut failed = 0;
        while failed < 2 {
            match rx.recv().unwrap() {
                (_, Event::Failed(msg)) => {
                    assert!(msg.contains("position 2") && msg.contains("NaN"), "{msg}");
                    failed += 1;
                }
                (k, e) => panic!("request {k}: {e:?}"),
            }
        }
        assert_eq!(h.stats().failed.load(Ordering::Relaxed), 2);
        drop(h);
        thread.join().unwrap();
    }
}
