//! Generated arithmetic items with exact answers: k-digit addition and multiplication, the
//! task family of "Are Emergent Abilities of Large Language Models a Mirage?" (arXiv
//! 2304.15004, after GPT-3's arithmetic tasks). Each item is `{a, b, op, answer}` with both
//! operands drawn uniformly from the k-digit numbers (0–9 for k = 1), from a fixed seed per
//! (operation, k), so every run scores the same items; the few-shot pool comes from another
//! seed, so an item is never its own example.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Add,
    Mul,
}

impl Op {
    pub fn word(self) -> &'static str {
        match self {
            Op::Add => "plus",
            Op::Mul => "times",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Mul => "mul",
        }
    }
}

/// A task's item generator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generator {
    pub op: Op,
    pub digits: u32,
    #[serde(default = "count")]
    pub count: usize,
}

fn count() -> usize {
    1000
}

/// Most digits an operand may have (the product of two must fit in a u64).
pub const MAX_DIGITS: u32 = 9;

impl Generator {
    /// The items (`pool = false`) or the few-shot pool (`pool = true`).
    pub fn rows(&self, pool: bool) -> Result<Vec<Value>> {
        if !(1..=MAX_DIGITS).contains(&self.digits) {
            return Err(Error::Data(format!(
                "arithmetic: `digits` is {}, must be 1..={MAX_DIGITS}",
                self.digits
            )));
        }
        let seed =
            (u64::from(self.digits) << 8) | u64::from(self.op == Op::Mul) | (u64::from(pool) << 1);
        let mut rng = lmkit_rand::SplitMix64::new(seed);
        let (lo, hi) = operand_range(self.digits);
        let mut draw = || lo + rng.next_u64() % (hi - lo + 1);
        Ok((0..self.count)
            .map(|_| {
                let (a, b) = (draw(), draw());
                item(self.op, a, b)
            })
            .collect())
    }
}

/// The k-digit numbers: `[10^(k−1), 10^k − 1]`, and 0–9 for k = 1.
pub fn operand_range(digits: u32) -> (u64, u64) {
    let hi = 10u64.pow(digits) - 1;
    let lo = if digits == 1 {
        0
    } else {
        10u64.pow(digits - 1)
    };
    (lo, hi)
}

/// One item.
pub fn item(op: Op, a: u64, b: u64) -> Value {
    let answer = match op {
        Op::Add => a + b,
        Op::Mul => a * b,
    };
    json!({"a": a, "b": b, "op": op.word(), "answer": answer.to_string()})
}

/// The text of one solved item, as the built-in tasks prompt it (training text for the
/// emergence study).
pub fn solved(op: Op, a: u64, b: u64) -> String {
    let answer = match op {
        Op::Add => a + b,
        Op::Mul => a * b,
    };
    format!(
        "Question: What is {a} {} {b}?\nAnswer: {answer}\n",
        op.word()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_fixed_exact_and_in_range() {
        let g = Generator {
            op: Op::Mul,
            digits: 3,
            count: 50,
        };
        let rows = g.rows(false).unwrap();
        assert_eq!(rows, g.rows(false).unwrap());
        assert_ne!(rows, g.rows(true).unwrap());
        for r in &rows {
            let (a, b) = (r["a"].as_u64().unwrap(), r["b"].as_u64().unwrap());
            assert!((100..=999).contains(&a) && (100..=999).contains(&b));
            assert_eq!(r["answer"], (a * b).to_string());
        }
        assert_eq!(operand_range(1), (0, 9));
        let bad = Generator { digits: 0, ..g };
        assert!(bad.rows(false).unwrap_err().to_string().contains("digits"));
        assert_eq!(
            solved(Op::Add, 12, 30),
            "Question: What is 12 plus 30?\nAnswer: 42\n"
        );
    }
}
