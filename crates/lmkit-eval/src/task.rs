//! Benchmark tasks as data: a small TOML file per task says where the items come from, how an
//! item becomes a prompt, its answer choices and its gold answer, as lm-evaluation-harness's
//! task YAMLs do (templates and expressions are Jinja, rendered by minijinja), so a task's
//! prompts are the harness's prompts. The built-in tasks are in `tasks/*.toml`.
//!
//! Fields:
//! - `name`; `dataset`: a folder of the evaluation data (`<dataset>/<config>/<split>`) or a
//!   file (`.jsonl`, `.parquet`, `.arrow`) relative to the data root; `fewshot_dataset` likewise;
//! - `kind`: `multiple_choice` (one context, a continuation per choice), `multiple_input`
//!   (a context per choice, one continuation: Winogrande's partial scoring) or `loglikelihood`
//!   (one context and one continuation, LAMBADA: `acc` is greedy agreement, `perplexity` is
//!   `exp(−mean log-likelihood)`); `item_field`: the row's field holding the item; `unique`: a
//!   row field whose repeated values are dropped (request dumps list an item once per request);
//! - `preprocess`: a built-in item transform (`hellaswag`, `winogrande`), as the harness's
//!   `process_docs`;
//! - `text`: the prompt template; `choices`: an expression giving the list of choices (for
//!   `multiple_input`, the contexts); `target`: an expression giving the gold choice's index
//!   (or its text); `continuation` (`multiple_input` only): the shared continuation;
//! - `description` (a template put before everything), `target_delimiter` (" "),
//!   `fewshot_delimiter` ("\n\n"), `num_fewshot` (0), `fewshot_sampler` (`first_n`).
//!
//! Expressions may use the filter `index_of(x)`: a list's first index of `x`.

use minijinja::{Environment, Value};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    MultipleChoice,
    MultipleInput,
    /// One context, one continuation: its log-likelihood (perplexity) and whether greedy
    /// decoding would produce it (acc), as LAMBADA.
    Loglikelihood,
    /// Greedy generation until a stop string, answers extracted by `filters` and compared with
    /// the target by exact match; next to it the continuous metrics of the target (see
    /// [`crate::generation`]).
    GenerateUntil,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    FirstN,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    #[serde(default)]
    pub dataset: String,
    #[serde(default)]
    pub fewshot_dataset: Option<String>,
    pub kind: Kind,
    #[serde(default)]
    pub preprocess: Option<String>,
    /// Each row's item is this field of the row (request dumps keep the item under `doc`).
    #[serde(default)]
    pub item_field: Option<String>,
    /// Keep only the first row of each value of this row field (a request dump lists an item
    /// once per request, and its unconditional requests as extra rows).
    #[serde(default)]
    pub unique: Option<String>,
    pub text: String,
    #[serde(default)]
    pub choices: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub continuation: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default = "space")]
    pub target_delimiter: String,
    #[serde(default = "blank_line")]
    pub fewshot_delimiter: String,
    #[serde(default)]
    pub num_fewshot: usize,
    #[serde(default = "first_n")]
    pub fewshot_sampler: Sampler,
    /// Metrics reported (`acc`, `acc_norm`; see [`TaskSpec::parse`] for each kind's).
    pub metrics: Vec<String>,
    /// Few-shot examples written in the task itself (used before `fewshot_dataset`).
    #[serde(default)]
    pub fewshot_samples: Vec<Json>,
    /// Items made by a generator instead of read from `dataset`.
    #[serde(default)]
    pub generator: Option<crate::arithmetic::Generator>,
    /// `generate_until`: stop strings (the tokenizer's end-of-text also stops).
    #[serde(default)]
    pub until: Vec<String>,
    /// `generate_until`: most new tokens.
    #[serde(default = "max_gen_toks")]
    pub max_gen_toks: usize,
    /// `generate_until`: answer extractions, each reported as `exact_match,<name>`; none means
    /// the whole output is the answer (`exact_match`).
    #[serde(default)]
    pub filters: Vec<crate::generation::Filter>,
    /// `generate_until`: how exact match compares the answer with the target.
    #[serde(default)]
    pub exact_match: crate::generation::ExactMatch,
}

impl TaskSpec {
    /// The task's items among a dataset's rows, in order (see `unique`); a row without the
    /// `unique` field is an error naming it.
    pub fn select_rows(&self, rows: Vec<Json>) -> Result<Vec<Json>> {
        let Some(field) = &self.unique else {
            return Ok(rows);
        };
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(rows.len());
        for (i, r) in rows.into_iter().enumerate() {
            let key = r.get(field).ok_or_else(|| Error::Task {
                task: self.name.clone(),
                why: format!("row {i} has no field `{field}` (the task's `unique`)"),
            })?;
            if seen.insert(key.to_string()) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

fn max_gen_toks() -> usize {
    256
}

fn space() -> String {
    " ".into()
}
fn blank_line() -> String {
    "\n\n".into()
}
fn first_n() -> Sampler {
    Sampler::FirstN
}

/// The built-in tasks: (name, TOML).
pub const BUILTIN: &[(&str, &str)] = &[
    ("hellaswag", include_str!("../tasks/hellaswag.toml")),
    ("arc_easy", include_str!("../tasks/arc_easy.toml")),
    ("arc_challenge", include_str!("../tasks/arc_challenge.toml")),
    ("piqa", include_str!("../tasks/piqa.toml")),
    ("boolq", include_str!("../tasks/boolq.toml")),
    ("winogrande", include_str!("../tasks/winogrande.toml")),
    ("openbookqa", include_str!("../tasks/openbookqa.toml")),
    (
        "lambada_openai",
        include_str!("../tasks/lambada_openai.toml"),
    ),
    ("gsm8k_cot", include_str!("../tasks/gsm8k_cot.toml")),
];

/// The arithmetic task `arithmetic_<op>_<digits>`.
fn arithmetic(op: crate::arithmetic::Op, digits: u32) -> Result<TaskSpec> {
    let text = include_str!("../tasks/arithmetic.toml")
        .replace("{op_word}", op.word())
        .replace("{op}", op.name())
        .replace("{digits}", &digits.to_string());
    TaskSpec::parse(&text, &format!("arithmetic_{}_{digits}", op.name()))
}

/// The digit counts the `arithmetic` groups run.
pub const ARITHMETIC_DIGITS: std::ops::RangeInclusive<u32> = 1..=6;

/// MMLU's 57 subjects by the harness's category groups.
pub const MMLU: &[(&str, &[&str])] = &[
    (
        "mmlu_stem",
        &[
            "abstract_algebra",
            "anatomy",
            "astronomy",
            "college_biology",
            "college_chemistry",
            "college_computer_science",
            "college_mathematics",
            "college_physics",
            "computer_security",
            "conceptual_physics",
            "electrical_engineering",
            "elementary_mathematics",
            "high_school_biology",
            "high_school_chemistry",
            "high_school_computer_science",
            "high_school_mathematics",
            "high_school_physics",
            "high_school_statistics",
            "machine_learning",
        ],
    ),
    (
        "mmlu_other",
        &[
            "business_ethics",
            "clinical_knowledge",
            "college_medicine",
            "global_facts",
            "human_aging",
            "management",
            "marketing",
            "medical_genetics",
            "miscellaneous",
            "nutrition",
            "professional_accounting",
            "professional_medicine",
            "virology",
        ],
    ),
    (
        "mmlu_social_sciences",
        &[
            "econometrics",
            "high_school_geography",
            "high_school_government_and_politics",
            "high_school_macroeconomics",
            "high_school_microeconomics",
            "high_school_psychology",
            "human_sexuality",
            "professional_psychology",
            "public_relations",
            "security_studies",
            "sociology",
            "us_foreign_policy",
        ],
    ),
    (
        "mmlu_humanities",
        &[
            "formal_logic",
            "high_school_european_history",
            "high_school_us_history",
            "high_school_world_history",
            "international_law",
            "jurisprudence",
            "logical_fallacies",
            "moral_disputes",
            "moral_scenarios",
            "philosophy",
            "prehistory",
            "professional_law",
            "world_religions",
        ],
    ),
];

/// The tasks a name stands for: a built-in task, `mmlu_<subject>`, or a group (`mmlu`,
/// `mmlu_stem`, …) as its subtasks.
pub fn expand(name: &str) -> Result<Vec<TaskSpec>> {
    let subject = |s: &str| -> Result<TaskSpec> {
        let text = include_str!("../tasks/mmlu.toml")
            .replace("{subject_words}", &s.replace('_', " "))
            .replace("{subject}", s);
        TaskSpec::parse(&text, &format!("mmlu_{s}"))
    };
    if name == "mmlu" {
        return MMLU
            .iter()
            .flat_map(|(_, s)| s.iter())
            .map(|s| subject(s))
            .collect();
    }
    if let Some((_, subjects)) = MMLU.iter().find(|(g, _)| *g == name) {
        return subjects.iter().map(|s| subject(s)).collect();
    }
    if let Some(s) = name.strip_prefix("mmlu_") {
        if MMLU.iter().any(|(_, subs)| subs.contains(&s)) {
            return Ok(vec![subject(s)?]);
        }
    }
    use crate::arithmetic::{Op, MAX_DIGITS};
    let ops: &[Op] = match name {
        "arithmetic" => &[Op::Add, Op::Mul],
        "arithmetic_add" => &[Op::Add],
        "arithmetic_mul" => &[Op::Mul],
        _ => &[],
    };
    if !ops.is_empty() {
        return ops
            .iter()
            .flat_map(|&op| ARITHMETIC_DIGITS.map(move |k| arithmetic(op, k)))
            .collect();
    }
    for op in [Op::Add, Op::Mul] {
        let k = name
            .strip_prefix("arithmetic_")
            .and_then(|r| r.strip_prefix(op.name()))
            .and_then(|r| r.strip_prefix('_'))
            .and_then(|d| d.parse::<u32>().ok());
        if let Some(k) = k {
            if !(1..=MAX_DIGITS).contains(&k) {
                return Err(Error::Task {
                    task: name.into(),
                    why: format!("digits must be 1..={MAX_DIGITS}"),
                });
            }
            return Ok(vec![arithmetic(op, k)?]);
        }
    }
    Ok(vec![TaskSpec::builtin(name)?])
}

/// How many subtasks a group has (0 for a name that is not a group).
pub fn group_size(group: &str) -> usize {
    if group == "mmlu" {
        return MMLU.iter().map(|(_, s)| s.len()).sum();
    }
    MMLU.iter()
        .find(|(g, _)| *g == group)
        .map_or(0, |(_, s)| s.len())
}

/// The groups a subtask belongs to (`mmlu_anatomy` → `mmlu_stem`, `mmlu`).
pub fn groups_of(task: &str) -> Vec<&'static str> {
    let Some(s) = task.strip_prefix("mmlu_") else {
        return Vec::new();
    };
    match MMLU.iter().find(|(_, subs)| subs.contains(&s)) {
        Some((g, _)) => vec![*g, "mmlu"],
        None => Vec::new(),
    }
}

impl TaskSpec {
    /// Parses a task file's text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let t: TaskSpec = toml::from_str(text).map_err(|e| Error::Task {
            task: origin.into(),
            why: e.to_string(),
        })?;
        let bad = |why: &str| Error::Task {
            task: origin.into(),
            why: why.into(),
        };
        if t.dataset.is_empty() && t.generator.is_none() {
            return Err(bad("missing field `dataset` (or a `generator`)"));
        }
        match t.kind {
            Kind::MultipleInput | Kind::Loglikelihood if t.continuation.is_none() => {
                return Err(bad(
                    "`multiple_input` and `loglikelihood` need `continuation`",
                ));
            }
            Kind::MultipleChoice | Kind::MultipleInput
                if t.choices.is_empty() || t.target.is_empty() =>
            {
                return Err(bad("multiple-choice tasks need `choices` and `target`"));
            }
            Kind::GenerateUntil if t.target.is_empty() => {
                return Err(bad("`generate_until` needs `target`"));
            }
            Kind::GenerateUntil if t.max_gen_toks == 0 => {
                return Err(bad("`max_gen_toks` must be at least 1"));
            }
            _ => {}
        }
        let known: &[&str] = match t.kind {
            Kind::Loglikelihood => &["acc", "perplexity"],
            Kind::GenerateUntil => crate::generation::METRICS,
            _ => &["acc", "acc_norm", "brier_score"],
        };
        if let Some(m) = t.metrics.iter().find(|m| !known.contains(&m.as_str())) {
            return Err(bad(&format!(
                "unknown metric `{m}` for this kind (known: {})",
                known.join(", ")
            )));
        }
        for f in &t.filters {
            f.check().map_err(|why| bad(&why))?;
        }
        t.exact_match.check().map_err(|why| bad(&why))?;
        if let Some(p) = &t.preprocess {
            if !["hellaswag", "winogrande"].contains(&p.as_str()) {
                return Err(Error::Task {
                    task: origin.into(),
                    why: format!("unknown preprocess `{p}` (known: hellaswag, winogrande)"),
                });
            }
        }
        Ok(t)
    }

    /// A built-in task by name.
    pub fn builtin(name: &str) -> Result<Self> {
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => Self::parse(text, n),
            None => Err(Error::Task {
                task: name.into(),
                why: format!(
                    "no such task (built in: {}, mmlu (and its groups and subjects), \
                     arithmetic (arithmetic_add_<k>, arithmetic_mul_<k>); or give a task .toml file)",
                    BUILTIN
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }
}

/// One item made ready: its prompt, its choices and the gold index.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Item {
    /// The context (multiple choice) or the contexts, one per choice (multiple input).
    pub contexts: Vec<String>,
    /// The continuations: one per choice (multiple choice) or the one shared.
    pub continuations: Vec<String>,
    /// The choices as the metric sees them (acc_norm divides by their length in characters).
    pub choices: Vec<String>,
    pub gold: usize,
    /// `generate_until`: the gold answer's text (the continuation without the delimiter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A JSON item as a template value.
fn to_value(j: &Json) -> Value {
    match j {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::from(a.iter().map(to_value).collect::<Vec<_>>()),
        Json::Object(o) => Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), to_value(v)))),
    }
}

fn index_of(list: Value, x: Value) -> std::result::Result<Value, minijinja::Error> {
    let it = list.try_iter()?;
    for (i, v) in it.enumerate() {
        if v == x {
            return Ok(Value::from(i));
        }
    }
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        format!("{x} is not in the list"),
    ))
}

/// Renders and evaluates a task's templates.
pub struct Renderer {
    env: Environment<'static>,
}

impl Default for Renderer {
    fn default() -> Self {
        Self::new()
    }
}

impl Renderer {
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        env.add_filter("index_of", index_of);
        Self { env }
    }

    fn render(&self, t: &TaskSpec, template: &str, doc: &Json) -> Result<String> {
        self.env
            .render_str(template, to_value(doc))
            .map_err(|e| Error::Task {
                task: t.name.clone(),
                why: format!("template `{template}`: {e}"),
            })
    }

    fn eval(&self, t: &TaskSpec, expr: &str, doc: &Json) -> Result<Value> {
        let bad = |e: minijinja::Error| Error::Task {
            task: t.name.clone(),
            why: format!("expression `{expr}`: {e}"),
        };
        self.env
            .compile_expression(expr)
            .map_err(bad)?
            .eval(to_value(doc))
            .map_err(bad)
    }

    fn strings(&self, t: &TaskSpec, expr: &str, doc: &Json) -> Result<Vec<String>> {
        let v = self.eval(t, expr, doc)?;
        let it = v.try_iter().map_err(|e| Error::Task {
            task: t.name.clone(),
            why: format!("`{expr}` is not a list: {e}"),
        })?;
        Ok(it
            .map(|x| match x.as_str() {
                Some(s) => s.to_string(),
                None => x.to_string(),
            })
            .collect())
    }

    /// The gold index: an integer, a digit string, or a choice's text.
    fn gold(&self, t: &TaskSpec, doc: &Json, choices: &[String]) -> Result<usize> {
        let v = self.eval(t, &t.target, doc)?;
        let bad = |why: String| Error::Task {
            task: t.name.clone(),
            why,
        };
        let idx = if let Some(i) = v.as_i64() {
            usize::try_from(i).ok()
        } else if let Some(s) = v.as_str() {
            s.trim()
                .parse::<usize>()
                .ok()
                .or_else(|| choices.iter().position(|c| c == s))
        } else if v.kind() == minijinja::value::ValueKind::Bool {
            Some(usize::from(v.is_true()))
        } else {
            None
        };
        match idx {
            Some(i) if i < choices.len() => Ok(i),
            _ => Err(bad(format!(
                "the gold answer `{v}` is not one of the {} choices",
                choices.len()
            ))),
        }
    }

    /// A few-shot example's text: the prompt, the delimiter and its gold answer. A row from a
    /// request dump keeps its item under `item_field`; the task's own samples do not.
    fn shot(&self, t: &TaskSpec, doc: &Json) -> Result<String> {
        let doc = match &t.item_field {
            Some(f) => doc.get(f).unwrap_or(doc),
            None => doc,
        };
        let doc = preprocess(t, doc)?;
        let cont = || self.render(t, t.continuation.as_deref().unwrap_or(""), &doc);
        Ok(match t.kind {
            Kind::MultipleChoice => {
                let choices = self.strings(t, &t.choices, &doc)?;
                let gold = self.gold(t, &doc, &choices)?;
                format!(
                    "{}{}{}",
                    self.render(t, &t.text, &doc)?,
                    t.target_delimiter,
                    choices[gold]
                )
            }
            Kind::MultipleInput => {
                let choices = self.strings(t, &t.choices, &doc)?;
                let gold = self.gold(t, &doc, &choices)?;
                format!("{}{}{}", choices[gold], t.target_delimiter, cont()?)
            }
            // The harness's `loglikelihood` requests carry no delimiter.
            Kind::Loglikelihood => format!("{}{}", self.render(t, &t.text, &doc)?, cont()?),
            Kind::GenerateUntil => format!(
                "{}{}{}",
                self.render(t, &t.text, &doc)?,
                t.target_delimiter,
                self.render(t, &t.target, &doc)?
            ),
        })
    }

    /// Builds an item from a raw dataset row and its few-shot examples.
    pub fn item(&self, t: &TaskSpec, raw: &Json, shots: &[Json]) -> Result<Item> {
        let raw = match &t.item_field {
            Some(f) => raw.get(f).ok_or_else(|| Error::Task {
                task: t.name.clone(),
                why: format!("a row has no field `{f}`"),
            })?,
            None => raw,
        };
        let doc = preprocess(t, raw)?;
        let mut prefix = self.render(t, &t.description, &doc)?;
        for s in shots {
            prefix.push_str(&self.shot(t, s)?);
            prefix.push_str(&t.fewshot_delimiter);
        }
        let cont = || self.render(t, t.continuation.as_deref().unwrap_or(""), &doc);
        match t.kind {
            Kind::Loglikelihood => {
                return Ok(Item {
                    contexts: vec![format!("{prefix}{}", self.render(t, &t.text, &doc)?)],
                    continuations: vec![cont()?],
                    choices: Vec::new(),
                    gold: 0,
                    target: None,
                })
            }
            Kind::GenerateUntil => {
                let target = self.render(t, &t.target, &doc)?;
                return Ok(Item {
                    contexts: vec![format!("{prefix}{}", self.render(t, &t.text, &doc)?)],
                    continuations: vec![format!("{}{target}", t.target_delimiter)],
                    choices: Vec::new(),
                    gold: 0,
                    target: Some(target),
                });
            }
            Kind::MultipleChoice | Kind::MultipleInput => {}
        }
        let choices = self.strings(t, &t.choices, &doc)?;
        if choices.is_empty() {
            return Err(Error::Task {
                task: t.name.clone(),
                why: "an item has no choices".into(),
            });
        }
        let gold = self.gold(t, &doc, &choices)?;
        Ok(if t.kind == Kind::MultipleChoice {
            Item {
                contexts: vec![format!("{prefix}{}", self.render(t, &t.text, &doc)?)],
                continuations: choices
                    .iter()
                    .map(|c| format!("{}{c}", t.target_delimiter))
                    .collect(),
                choices,
                gold,
                target: None,
            }
        } else {
            let cont = cont()?;
            Item {
                contexts: choices.iter().map(|c| format!("{prefix}{c}")).collect(),
                continuations: vec![format!("{}{cont}", t.target_delimiter)],
                choices,
                gold,
                target: None,
            }
        })
    }
}

/// HellaSwag's `preprocess` (lm-evaluation-harness `tasks/hellaswag/utils.py`), literally:
/// strip, ` [title]` → `. `, bracketed spans removed, one pass of double spaces to one.
pub fn hellaswag_clean(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    // `re.sub("\\[.*?\\]", "", text)`: each `[` up to the nearest `]` after it.
    while let Some(a) = rest.find('[') {
        match rest[a + 1..].find(']') {
            Some(b) => {
                out.push_str(&rest[..a]);
                rest = &rest[a + 1 + b + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.capitalize`: the first character upper-cased, the rest lower-cased.
fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f
            .to_uppercase()
            .chain(c.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

fn field<'a>(t: &TaskSpec, doc: &'a Json, k: &str) -> Result<&'a str> {
    doc[k].as_str().ok_or_else(|| Error::Task {
        task: t.name.clone(),
        why: format!("an item has no string field `{k}`"),
    })
}

/// The built-in item transforms.
fn preprocess(t: &TaskSpec, doc: &Json) -> Result<Json> {
    let mut d = doc.clone();
    match t.preprocess.as_deref() {
        None => {}
        Some("hellaswag") => {
            let ctx = format!(
                "{} {}",
                field(t, doc, "ctx_a")?,
                capitalize(field(t, doc, "ctx_b")?)
            );
            let endings = doc["endings"].as_array().ok_or_else(|| Error::Task {
                task: t.name.clone(),
                why: "an item has no list `endings`".into(),
            })?;
            d["query"] = Json::from(hellaswag_clean(&format!(
                "{}: {ctx}",
                field(t, doc, "activity_label")?
            )));
            d["choices"] = Json::from(
                endings
                    .iter()
                    .map(|e| hellaswag_clean(e.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>(),
            );
            d["gold"] =
                Json::from(field(t, doc, "label")?.trim().parse::<u64>().map_err(|_| {
                    Error::Task {
                        task: t.name.clone(),
                        why: "`label` is not a number".into(),
                    }
                })?);
        }
        Some("winogrande") => {
            let s = field(t, doc, "sentence")?;
            let idx = s.find('_').ok_or_else(|| Error::Task {
                task: t.name.clone(),
                why: format!("sentence without `_`: {s}"),
            })?;
            let (o1, o2) = (field(t, doc, "option1")?, field(t, doc, "option2")?);
            d["contexts"] = Json::from(vec![
                format!("{}{o1}", &s[..idx]),
                format!("{}{o2}", &s[..idx]),
            ]);
            d["suffix"] = Json::from(s[idx + 1..].trim());
            d["gold"] = Json::from(match field(t, doc, "answer")? {
                "1" => 0,
                "2" => 1,
                a => {
                    return Err(Error::Task {
                        task: t.name.clone(),
                        why: format!("`answer` is `{a}`, not 1 or 2"),
                    })
                }
            });
        }
        Some(p) => {
            return Err(Error::Task {
                task: t.name.clone(),
                why: format!("unknown preprocess `{p}`"),
            })
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellaswag_cleaning_matches_the_harness() {
        assert_eq!(
            hellaswag_clean("Roof shingle removal: A man is sitting on a roof. He"),
            "Roof shingle removal: A man is sitting on a roof. He"
        );
        assert_eq!(
            hellaswag_clean("[header] How to x [title] Do y."),
            " How to x. Do y."
        );
        // strip() runs before the bracket removal: a leading space can remain.
        assert_eq!(hellaswag_clean("[step] Many people  do"), " Many people do");
        assert_eq!(capitalize("tHE man"), "The man");
    }

    #[test]
    fn builtin_tasks_parse_and_render() {
        let r = Renderer::new();
        for (name, _) in BUILTIN {
            TaskSpec::builtin(name).unwrap();
        }
        // ARC and OpenBookQA: rows of a request dump, each item listed once per request.
        let arc = TaskSpec::builtin("arc_easy").unwrap();
        let row = |id: &str, q: &str| {
            serde_json::json!({"native_id": id, "doc_id": 0, "doc": {"query": q,
                "choices": ["ice", "steam"], "gold": 1}})
        };
        let q = "Question: Which is a gas?\nAnswer:";
        let rows = vec![row("a", q), row("a", q), row("b", q), row("a", q)];
        let rows = arc.select_rows(rows).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["native_id"], "b");
        let it = r.item(&arc, &rows[0], &[]).unwrap();
        assert_eq!(it.contexts, [q]);
        assert_eq!(it.continuations, [" ice", " steam"]);
        assert_eq!(it.gold, 1);
        let e = arc
            .select_rows(vec![serde_json::json!({"doc": {}})])
            .unwrap_err();
        assert!(e.to_string().contains("native_id"), "{e}");
        let ob = TaskSpec::builtin("openbookqa").unwrap();
        let it = r.item(&ob, &rows[0], &[]).unwrap();
        assert_eq!(it.contexts, ["Which is a gas?"]);
        let wg = TaskSpec::builtin("winogrande").unwrap();
        let doc = serde_json::json!({"sentence": "Sarah was a better lawyer than Maria so _ always got the easier cases.",
            "option1": "Sarah", "option2": "Maria", "answer": "2"});
        let it = r.item(&wg, &doc, &[]).unwrap();
        assert_eq!(
            it.contexts[1],
            "Sarah was a better lawyer than Maria so Maria"
        );
        assert_eq!(it.continuations, [" always got the easier cases."]);
        assert_eq!(it.gold, 1);
        let mm = expand("mmlu").unwrap();
        assert_eq!(mm.len(), 57);
        assert_eq!(expand("mmlu_stem").unwrap().len(), 19);
        assert_eq!(groups_of("mmlu_anatomy"), ["mmlu_stem", "mmlu"]);
        let anatomy = &expand("mmlu_anatomy").unwrap()[0];
        let q = serde_json::json!({"question": " What is it? ", "choices": ["a", "b", "c", "d"], "answer": 2});
        let it = r.item(anatomy, &q, std::slice::from_ref(&q)).unwrap();
        assert_eq!(
            it.contexts[0],
            "The following are multiple choice questions (with answers) about anatomy.\n\n\
             What is it?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n\
             What is it?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
        );
        assert_eq!(it.continuations, [" A", " B", " C", " D"]);
        let bq = TaskSpec::builtin("boolq").unwrap();
        let doc = serde_json::json!({"passage": "P.", "question": "is it", "answer": true});
        let it = r.item(&bq, &doc, &[]).unwrap();
        assert_eq!(it.contexts, ["P.\nQuestion: is it?\nAnswer:"]);
        assert_eq!(it.gold, 1);
        // GSM8K CoT: the task's own examples, the target cut from the full solution.
        let gs = TaskSpec::builtin("gsm8k_cot").unwrap();
        assert_eq!(gs.fewshot_samples.len(), 8);
        let doc = serde_json::json!({"doc": {"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}});
        let it = r.item(&gs, &doc, &gs.fewshot_samples[..2]).unwrap();
        assert!(it.contexts[0].starts_with("Q: There are 15 trees in the grove."));
        assert!(it.contexts[0].contains("The answer is 6.\n\nQ: If there are 3 cars"));
        assert!(it.contexts[0].ends_with("The answer is 5.\n\nQ: How many?\nA:"));
        assert_eq!(it.target.as_deref(), Some("4"));
        assert_eq!(it.continuations, [" 4"]);
        let ar = &expand("arithmetic_mul_3").unwrap()[0];
        let rows = ar.generator.as_ref().unwrap().rows(false).unwrap();
        let it = r.item(ar, &rows[0], &[]).unwrap();
        let (a, b) = (
            rows[0]["a"].as_u64().unwrap(),
            rows[0]["b"].as_u64().unwrap(),
        );
        assert_eq!(
            it.contexts[0],
            format!("Question: What is {a} times {b}?\nAnswer:")
        );
        assert_eq!(it.target, Some((a * b).to_string()));
        assert_eq!(expand("arithmetic").unwrap().len(), 12);
        assert!(expand("arithmetic_add_10").is_err());
        // A missing field is named.
        let e = r
            .item(&arc, &serde_json::json!({"doc": {"query": "q"}}), &[])
            .unwrap_err();
        assert!(e.to_string().contains("arc_easy"), "{e}");
        assert!(TaskSpec::builtin("nope")
            .unwrap_err()
            .to_string()
            .contains("hellaswag"));
        let e = TaskSpec::parse("name = \"x\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("missing field"), "{e}");
    }
}
