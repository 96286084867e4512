//! Where an error is: the key path serde reports, and the start of a mapping that misses
//! a key (serde notices at its end).

/// The path as an operator writes it: without the `value` that [`Spanned`] wraps values
/// in, and without the `?` serde_path_to_error writes for a key it could not name (a
/// duplicate key, reported at the mapping that holds it).
pub(super) fn key_path(raw: &str) -> String {
    let parts: Vec<&str> = raw.split('.').filter(|p| !p.is_empty() && *p != "value" && *p != "?").collect();
    if parts.is_empty() { "(document)".to_owned() } else { parts.join(".") }
}

/// Where the node at `path` (as [`key_path`] writes it: `services[2].check`, or
/// `(document)`) starts in `text`, as a 1-based line and column: a second, cheap pass over
/// the YAML events, made only to place an error.
pub(super) fn node_start(text: &str, path: &str) -> Option<(u64, u64)> {
    use serde_saphyr::granit_parser::{Event, Parser};
    enum Step<'a> {
        Key(&'a str),
        Index(usize),
    }
    let mut steps = Vec::new();
    if path != "(document)" {
        for part in path.split('.') {
            let (key, indices) = part.split_once('[').unwrap_or((part, ""));
            if !key.is_empty() {
                steps.push(Step::Key(key));
            }
            for index in indices.split('[').filter(|i| !i.is_empty()) {
                steps.push(Step::Index(index.trim_end_matches(']').parse().ok()?));
            }
        }
    }
    let mut events = Parser::new_from_str(text)
        .filter_map(|e| e.ok())
        .filter(|(e, _)| !matches!(e, Event::StreamStart | Event::DocumentStart(..) | Event::Anchor(..)));
    // Skips one node whose first event was just read.
    pub(super) fn skip<'a>(
        first: &Event<'a>,
        events: &mut impl Iterator<Item = (Event<'a>, serde_saphyr::granit_parser::Span)>,
    ) {
        let mut depth = usize::from(matches!(first, Event::MappingStart(..) | Event::SequenceStart(..)));
        while depth > 0 {
            match events.next() {
                Some((Event::MappingStart(..) | Event::SequenceStart(..), _)) => depth += 1,
                Some((Event::MappingEnd | Event::SequenceEnd, _)) => depth -= 1,
                Some(_) => {}
                None => return,
            }
        }
    }
    let (mut node, mut span) = events.next()?;
    for step in steps {
        match (step, node) {
            (Step::Key(want), Event::MappingStart(..)) => loop {
                let (key, _) = events.next()?;
                let Event::Scalar(name, ..) = &key else { return None };
                let found = name == want;
                let (value, value_span) = events.next()?;
                if found {
                    (node, span) = (value, value_span);
                    break;
                }
                skip(&value, &mut events);
            },
            (Step::Index(want), Event::SequenceStart(..)) => {
                for _ in 0..want {
                    let (item, _) = events.next()?;
                    if matches!(item, Event::SequenceEnd) {
                        return None;
                    }
                    skip(&item, &mut events);
                }
                (node, span) = events.next()?;
            }
            _ => return None,
        }
    }
    Some((span.start.line() as u64, span.start.col() as u64 + 1))
}
