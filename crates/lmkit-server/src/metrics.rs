//! Prometheus metrics (`GET /metrics`, text format 0.0.4): requests by endpoint and status,
//! latency and time-to-first-token histograms, and the engine's counters and gauges.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lmkit_generate::engine::EngineStats;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0,
];

/// A histogram of seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, secs: f64) {
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `(endpoint, status)` → requests answered.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub latency: Histogram,
    pub first_token: Histogram,
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut m = match self.requests.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        *m.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// The exposition text.
    pub fn render(&self, engine: &EngineStats, max_batch: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP lmkit_requests_total Requests answered, by endpoint and HTTP status.\n# TYPE lmkit_requests_total counter"
        );
        {
            let m = match self.requests.lock() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            for ((e, s), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "lmkit_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
                );
            }
        }
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters = [
            (
                "lmkit_prompt_tokens_total",
                "Prompt tokens read.",
                ld(&engine.prompt_tokens),
            ),
            (
                "lmkit_prompt_tokens_cached_total",
                "Prompt tokens taken from the prefix cache.",
                ld(&engine.prompt_tokens_cached),
            ),
            (
                "lmkit_generated_tokens_total",
                "Tokens generated.",
                ld(&engine.generated_tokens),
            ),
            (
                "lmkit_engine_steps_total",
                "Batched forward steps.",
                ld(&engine.steps),
            ),
            (
                "lmkit_sequences_finished_total",
                "Sequences that finished.",
                ld(&engine.finished),
            ),
            (
                "lmkit_sequences_cancelled_total",
                "Sequences cancelled (client gone).",
                ld(&engine.cancelled),
            ),
            (
                "lmkit_sequences_failed_total",
                "Sequences that failed.",
                ld(&engine.failed),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let gauges = [
            (
                "lmkit_queue_depth",
                "Requests waiting for a slot.",
                engine.queued.load(Ordering::Relaxed) as u64,
            ),
            (
                "lmkit_active_sequences",
                "Sequences in the running batch.",
                engine.active.load(Ordering::Relaxed) as u64,
            ),
            ("lmkit_max_batch", "Slots.", max_batch as u64),
            (
                "lmkit_kv_cache_bytes",
                "Bytes of keys and values held by the running batch.",
                ld(&engine.kv_bytes),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.latency.write(
            &mut out,
            "lmkit_request_duration_seconds",
            "Time from request to the last byte of the answer.",
        );
        self.first_token.write(
            &mut out,
            "lmkit_time_to_first_token_seconds",
            "Time from request to the first generated token.",
        );
        out
    }
}
