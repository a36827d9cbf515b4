//! The one HF ⇄ GGUF tensor-name table for the Llama family.
//!
//! Models name their weights with HF keys (`model.layers.3.self_attn.q_proj.weight`); a GGUF
//! loader maps them through [`hf_to_gguf`]. Per-layer names use `{i}` for the layer index.

/// `(hf, gguf)` pairs; `{i}` is the layer index.
pub const LLAMA_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    (
        "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.attn_norm.weight",
    ),
    (
        "model.layers.{i}.self_attn.q_proj.weight",
        "blk.{i}.attn_q.weight",
    ),
    (
        "model.layers.{i}.self_attn.k_proj.weight",
        "blk.{i}.attn_k.weight",
    ),
    (
        "model.layers.{i}.self_attn.v_proj.weight",
        "blk.{i}.attn_v.weight",
    ),
    (
        "model.layers.{i}.self_attn.o_proj.weight",
        "blk.{i}.attn_output.weight",
    ),
    (
        "model.layers.{i}.self_attn.q_proj.bias",
        "blk.{i}.attn_q.bias",
    ),
    (
        "model.layers.{i}.self_attn.k_proj.bias",
        "blk.{i}.attn_k.bias",
    ),
    (
        "model.layers.{i}.self_attn.v_proj.bias",
        "blk.{i}.attn_v.bias",
    ),
    (
        "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight",
    ),
    (
        "model.layers.{i}.mlp.gate_proj.weight",
        "blk.{i}.ffn_gate.weight",
    ),
    (
        "model.layers.{i}.mlp.up_proj.weight",
        "blk.{i}.ffn_up.weight",
    ),
    (
        "model.layers.{i}.mlp.down_proj.weight",
        "blk.{i}.ffn_down.weight",
    ),
];

fn split_layer<'a>(name: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let end = rest.find('.')?;
    rest[..end].parse::<usize>().ok()?;
    Some((&rest[..end], &rest[end..]))
}

fn translate(name: &str, from_hf: bool) -> Option<String> {
    for (hf, gg) in LLAMA_NAMES {
        let (src, dst) = if from_hf { (hf, gg) } else { (gg, hf) };
        match src.split_once("{i}") {
            None if name == *src => return Some(dst.to_string()),
            None => {}
            Some((pre, post)) => {
                if let Some((idx, tail)) = split_layer(name, pre) {
                    if tail == post {
                        return Some(dst.replace("{i}", idx));
                    }
                }
            }
        }
    }
    None
}

/// HF key → GGUF tensor name.
pub fn hf_to_gguf(name: &str) -> Option<String> {
    translate(name, true)
}

/// GGUF tensor name → HF key.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    translate(name, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_entry() {
        for (hf, gg) in LLAMA_NAMES {
            let hf = hf.replace("{i}", "17");
            let gg = gg.replace("{i}", "17");
            assert_eq!(hf_to_gguf(&hf).as_deref(), Some(gg.as_str()));
            assert_eq!(gguf_to_hf(&gg).as_deref(), Some(hf.as_str()));
        }
        assert_eq!(hf_to_gguf("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_to_hf("blk.3.unknown"), None);
    }
}
