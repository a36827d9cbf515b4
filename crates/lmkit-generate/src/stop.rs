//! Stop strings over streamed text: emit what is safe, hold back what may start a stop string.

/// Tracks generated text against stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
}

/// What to do with the text so far.
#[derive(Debug, Clone, PartialEq)]
pub enum StopState {
    /// Safe to emit up to this byte offset.
    Continue { emit_to: usize },
    /// A stop string starts at this byte offset: emit up to it and finish.
    Stop { at: usize },
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Checks the full generated text.
    pub fn check(&self, text: &str) -> StopState {
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            return StopState::Stop { at };
        }
        // Hold back the longest suffix of `text` that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if text.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        StopState::Continue {
            emit_to: text.len() - hold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_partial_and_stops_on_full_match() {
        let m = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(m.check("Hello"), StopState::Continue { emit_to: 5 });
        assert_eq!(m.check("Hello\nUs"), StopState::Continue { emit_to: 5 });
        assert_eq!(m.check("Hello\nUser: hi"), StopState::Stop { at: 5 });
        let none = StopMatcher::new(vec![]);
        assert_eq!(none.check("abc"), StopState::Continue { emit_to: 3 });
    }
}
