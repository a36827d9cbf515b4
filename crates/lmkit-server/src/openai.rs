//! OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`), parsed strictly: an
//! unknown field, a wrong type or an out-of-range value is a 400 naming the field, as OpenAI's
//! own API answers.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// `stop`: one string or up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's content: a string or a list of parts (`{"type": "text", "text": ...}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// lmkit: the KV-cache policy of this request (`full`, `window`, `h2o`), its budget (`0.2`,
    /// `20%`, `256`) and H2O's recent share.
    pub kv: Option<String>,
    pub kv_budget: Option<String>,
    pub kv_recent: Option<f64>,
    /// llama.cpp / vLLM extension: keep generating past the end-of-turn token (benchmarks).
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Top log-probabilities per token (0–5).
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub common: Common,
}

/// `/v1/completions` `prompt`: a string (a list of exactly one string is accepted too).
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "`prompt` to be a string or a list of one string (token-id prompts are not supported)"
)]
pub enum Prompt {
    Text(String),
    Batch(Vec<String>),
}

/// Fields `#[serde(flatten)]` cannot reject by itself: every key of the body must be one of
/// these (OpenAI answers "Unrecognized request argument supplied").
const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "kv",
    "kv_budget",
    "kv_recent",
    "ignore_eos",
];

/// Parses a JSON body into `T`, with OpenAI-style errors for bad JSON, unknown fields and wrong
/// types.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8], own: &[&str]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(None, format!("the body is not valid JSON: {e}"))
            .with_code("invalid_json")
    })?;
    let Value::Object(map) = &v else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    if let Some(k) = map
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            Some(k),
            format!("Unrecognized request argument supplied: {k}"),
        )
        .with_code("unknown_parameter"));
    }
    if let Some((field, want, got)) = wrong_kind(map) {
        return Err(ApiError::invalid(
            Some(field),
            format!("`{field}` must be {want}, got {got}"),
        ));
    }
    serde_json::from_value(v).map_err(|e| {
        let msg = e.to_string();
        // serde names the field in backticks for missing fields; otherwise no param.
        let param = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("missing field"))
            .map(str::to_string);
        ApiError::invalid(param.as_deref(), format!("invalid request: {msg}"))
    })
}

pub const CHAT_FIELDS: &[&str] = &["messages", "logprobs", "top_logprobs"];
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo"];

impl Stop {
    pub fn list(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

impl Content {
    /// The text of the message (text parts joined).
    pub fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            format!(
                                "content part type `{}` is not supported (text only)",
                                p.kind
                            ),
                        ));
                    }
                    out.push_str(p.text.as_deref().unwrap_or(""));
                }
                Ok(out)
            }
        }
    }
}

/// The JSON kind each field takes (`logprobs` is a boolean for chat, an integer for text
/// completions: checked by serde).
const KINDS: &[(&str, &str)] = &[
    ("model", "a string"),
    ("user", "a string"),
    ("kv", "a string"),
    ("kv_budget", "a string"),
    ("max_tokens", "an integer"),
    ("max_completion_tokens", "an integer"),
    ("seed", "an integer"),
    ("n", "an integer"),
    ("top_logprobs", "an integer"),
    ("temperature", "a number"),
    ("top_p", "a number"),
    ("frequency_penalty", "a number"),
    ("presence_penalty", "a number"),
    ("kv_recent", "a number"),
    ("stream", "a boolean"),
    ("ignore_eos", "a boolean"),
    ("echo", "a boolean"),
    ("messages", "an array"),
    ("stream_options", "an object"),
];

/// The first field whose JSON kind is wrong: `(field, expected, found)`.
fn wrong_kind(map: &serde_json::Map<String, Value>) -> Option<(&str, &'static str, &'static str)> {
    let found = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    for (k, v) in map {
        let Some(&(_, want)) = KINDS.iter().find(|(n, _)| n == k) else {
            continue;
        };
        let ok = match want {
            _ if v.is_null() => true,
            "a string" => v.is_string(),
            "an integer" => v.is_u64(),
            "a number" => v.is_number(),
            "a boolean" => v.is_boolean(),
            "an array" => v.is_array(),
            _ => v.is_object(),
        };
        if !ok {
            let got = if want == "an integer" && v.is_number() {
                "a negative or fractional number"
            } else {
                found(v)
            };
            return Some((k.as_str(), want, got));
        }
    }
    None
}
