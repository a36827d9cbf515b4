//! Generation tasks: answers extracted from the output and compared with the target as
//! lm-evaluation-harness does it (`filters/extraction.py` `RegexFilter` + `take_first`,
//! `api/metrics.py` `exact_match_hf_evaluate`), next to the continuous metrics of
//! "Are Emergent Abilities of Large Language Models a Mirage?" (Schaeffer, Miranda, Koyejo;
//! NeurIPS 2023, arXiv 2304.15004).
//!
//! The paper's point: exact match is a discontinuous function of the per-token error. With a
//! target of L tokens each right with probability p, `P(exact match) ≈ p^L`, which looks like a
//! sudden jump as p rises smoothly with scale. Continuous metrics show the smooth rise:
//! - `token_edit_distance`: Levenshtein distance between the tokens of the extracted answer
//!   and those of the target (0 is a perfect answer);
//! - `per_token_acc`: with the target fed to the model (teacher forcing), the fraction of its
//!   tokens that are the model's top choice, `(1/L) Σ_i [argmax p(·|x, y_<i) = y_i]`;
//! - `target_logprob`: `Σ_i log p(y_i | x, y_<i)` of the target;
//! - `brier_score`: per target token `Σ_v (p_v − [v = y_i])²`, averaged over the tokens
//!   (0 is certain and right, 2 certain and wrong).
//!
//! Deviations:
//! - Patterns are Rust `regex` syntax (no look-around or back-references; a task file using
//!   them gets an error naming the pattern). Python's `$` also matches before a final newline;
//!   a pattern ending in `$` is rewritten to keep that meaning.
//! - The paper's continuous metrics are computed on the target as the task renders it,
//!   after the delimiter (e.g. ` 579`), and the edit distance on the first filter's answer.

use regex::Regex;
use serde::Deserialize;

/// The metrics a generation task can report.
pub const METRICS: &[&str] = &[
    "exact_match",
    "token_edit_distance",
    "per_token_acc",
    "target_logprob",
    "brier_score",
];

/// One answer extraction: the `group_select`-th match of `regex` (negative counts from the
/// end), its first non-empty group, stripped; `fallback` when nothing matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub name: String,
    pub regex: String,
    #[serde(default)]
    pub group_select: i64,
    #[serde(default = "invalid")]
    pub fallback: String,
}

fn invalid() -> String {
    "[invalid]".into()
}

/// How exact match normalizes both sides before comparing (`exact_match_hf_evaluate`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactMatch {
    #[serde(default)]
    pub ignore_case: bool,
    #[serde(default)]
    pub ignore_punctuation: bool,
    /// Each is removed (`re.sub(r, "", x)`) from both, in order.
    #[serde(default)]
    pub regexes_to_ignore: Vec<String>,
}

/// Compiles a Python `re` pattern: a final unescaped `$` becomes "end, or before a final
/// newline" (Python's meaning), kept out of the match by a trailing group.
fn compile(pattern: &str) -> Result<(Regex, bool), String> {
    let escaped_end = pattern.ends_with("\\$") && !pattern.ends_with("\\\\$");
    let (p, dollar) = match pattern.strip_suffix('$') {
        Some(head) if !escaped_end => (format!("(?:{head})(\n?)\\z"), true),
        _ => (pattern.to_string(), false),
    };
    Regex::new(&p)
        .map(|r| (r, dollar))
        .map_err(|e| format!("pattern `{pattern}`: {e}"))
}

impl Filter {
    pub fn check(&self) -> Result<(), String> {
        compile(&self.regex).map(|_| ())
    }
}

impl ExactMatch {
    pub fn check(&self) -> Result<(), String> {
        self.regexes_to_ignore
            .iter()
            .try_for_each(|r| compile(r).map(|_| ()))
    }
}

/// A task's compiled filters and exact-match normalization.
pub struct Scorer {
    filters: Vec<(Filter, Regex)>,
    ignore: Vec<(Regex, bool)>,
    opts: ExactMatch,
}

/// `re.findall`: the whole match without groups, group 1 with one, every group with more
/// (unmatched groups as "").
fn findall(re: &Regex, text: &str) -> Vec<Vec<String>> {
    re.captures_iter(text)
        .map(|c| {
            if c.len() == 1 {
                vec![c[0].to_string()]
            } else {
                (1..c.len())
                    .map(|i| c.get(i).map_or(String::new(), |m| m.as_str().to_string()))
                    .collect()
            }
        })
        .collect()
}

/// Python's `string.punctuation`.
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

impl Scorer {
    pub fn new(filters: &[Filter], opts: &ExactMatch) -> Result<Self, String> {
        Ok(Self {
            filters: filters
                .iter()
                .map(|f| compile(&f.regex).map(|(r, _)| (f.clone(), r)))
                .collect::<Result<_, _>>()?,
            ignore: opts
                .regexes_to_ignore
                .iter()
                .map(|r| compile(r))
                .collect::<Result<_, _>>()?,
            opts: opts.clone(),
        })
    }

    /// Each filter's name and its answer; without filters, `("", output)`.
    pub fn extract(&self, output: &str) -> Vec<(String, String)> {
        if self.filters.is_empty() {
            return vec![(String::new(), output.to_string())];
        }
        self.filters
            .iter()
            .map(|(f, re)| {
                let all = findall(re, output);
                let n = all.len() as i64;
                let at = if f.group_select < 0 {
                    n + f.group_select
                } else {
                    f.group_select
                };
                let answer = usize::try_from(at)
                    .ok()
                    .and_then(|i| all.get(i))
                    .and_then(|groups| groups.iter().find(|g| !g.is_empty()))
                    .map_or_else(|| f.fallback.clone(), |g| g.trim().to_string());
                (f.name.clone(), answer)
            })
            .collect()
    }

    /// Whether an extracted answer was the fallback (nothing matched).
    pub fn is_fallback(&self, filter: &str, answer: &str) -> bool {
        self.filters
            .iter()
            .any(|(f, _)| f.name == filter && f.fallback == answer)
    }

    /// `exact_match_hf_evaluate` on one pair.
    pub fn exact_match(&self, prediction: &str, reference: &str) -> bool {
        let norm = |x: &str| {
            let mut s = x.to_string();
            for (re, dollar) in &self.ignore {
                s = if *dollar {
                    // Keep the newline the rewritten `$` matched.
                    let last = re.captures_len() - 1;
                    re.replace_all(&s, format!("${{{last}}}").as_str())
                        .into_owned()
                } else {
                    re.replace_all(&s, "").into_owned()
                };
            }
            if self.opts.ignore_case {
                s = s.to_lowercase();
            }
            if self.opts.ignore_punctuation {
                s.retain(|c| !PUNCTUATION.contains(c));
            }
            s
        };
        norm(prediction) == norm(reference)
    }
}

/// Levenshtein distance between two token sequences.
pub fn edit_distance(a: &[u32], b: &[u32]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, x) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(x != y))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gsm8k() -> Scorer {
        let f = |name: &str, regex: &str, g| Filter {
            name: name.into(),
            regex: regex.into(),
            group_select: g,
            fallback: invalid(),
        };
        Scorer::new(
            &[
                f("strict-match", r"The answer is (\-?[0-9\.\,]+).", 0),
                f("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1),
            ],
            &ExactMatch {
                ignore_case: true,
                ignore_punctuation: false,
                regexes_to_ignore: vec![
                    ",".into(),
                    r"\$".into(),
                    "(?s).*#### ".into(),
                    r"\.$".into(),
                ],
            },
        )
        .unwrap()
    }

    #[test]
    fn filters_follow_the_harness() {
        let s = gsm8k();
        let out = " She has 3 + 4 = 7 apples, $1,200 in all. The answer is 1,200.";
        let got = s.extract(out);
        assert_eq!(got[0], ("strict-match".into(), "1,200".into()));
        // The last match of either group: "1,200." (group 1, two or more characters).
        assert_eq!(got[1], ("flexible-extract".into(), "1,200.".into()));
        assert!(s.exact_match(&got[0].1, "1200"));
        let none = s.extract("no numbers");
        assert_eq!(none[0].1, "[invalid]");
        assert!(s.is_fallback("strict-match", &none[0].1));
        // A single digit only matches the second group.
        assert_eq!(s.extract("x 7 y")[1].1, "7");
        // `(?s).*#### ` strips a full solution down to its number.
        assert!(s.exact_match("72", "Natalia sold 48/2 = 24.\n#### 72"));
        assert!(!s.exact_match("71", "#### 72"));
    }

    #[test]
    fn a_final_dollar_also_matches_before_a_final_newline() {
        let s = Scorer::new(
            &[],
            &ExactMatch {
                regexes_to_ignore: vec![r"\.$".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(s.exact_match("72.", "72"));
        // Python: re.sub(r"\.$", "", "72.\n") == "72\n".
        assert!(s.exact_match("72.\n", "72\n"));
        assert!(!s.exact_match("7.2", "72"));
        assert!(compile(r"a\$").is_ok_and(|(_, d)| !d));
        assert!(Scorer::new(
            &[],
            &ExactMatch {
                regexes_to_ignore: vec!["(?<=x)y".into()],
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance(&[1, 2, 3], &[1, 2, 3]), 0);
        assert_eq!(edit_distance(&[], &[1, 2]), 2);
        assert_eq!(edit_distance(&[1, 3], &[1, 2, 3]), 1);
        assert_eq!(edit_distance(&[5, 2, 3], &[1, 2, 4]), 2);
    }
}
