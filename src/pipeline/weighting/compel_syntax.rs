//! The prompt syntax of the `compel` library (2.x, `compel/prompt_parser.py`), parsed the way its
//! pyparsing grammar does.
//!
//! - `word+`, `word++`, `word-`: each `+` multiplies the word's weight by 1.1, each `-` by 0.9;
//!   `(several words)1.3`, `"quoted words"0.8`, `(words)++` weight a group; `x.attend(1.2)`
//!   is the explicit form. Plain parentheses only group. Weights nest and multiply.
//! - `("a cat", "a dog").blend(0.7, 0.3)`: a weighted average of the prompts' embeddings
//!   (weights normalised to sum 1 unless the last option is `no_normalize`).
//! - `("a cat", "a dog").and(1, 0.5)`: the prompts' embeddings side by side on the sequence
//!   axis, each pulled towards the empty prompt by its weight.
//! - `\(` and `\)` are literal brackets, `\"` a literal quote.
//!
//! Cross-attention control (`.swap()`) and LoRA terms (`withLora(...)`) are refused: this
//! server neither edits attention maps during sampling nor loads LoRAs from the prompt.

use crate::{Error, Result};

/// A weighted text fragment after flattening.
pub type Fragment = (String, f64);

/// One part of a conjunction.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// A prompt: its fragments, adjacent equal weights fused with a space.
    Prompt(Vec<Fragment>),
    /// A blend of prompts with their weights.
    Blend {
        prompts: Vec<Vec<Fragment>>,
        weights: Vec<f64>,
        normalize: bool,
    },
}

/// A parsed prompt: its parts and the weight of each (all 1 unless written with `.and(...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct Conjunction {
    pub parts: Vec<Part>,
    pub weights: Vec<f64>,
}

const PLUS_BASE: f64 = 1.1;
const MINUS_BASE: f64 = 0.9;
/// pyparsing's default whitespace, skipped before each element.
const SKIPPED: &[char] = &[' ', '\t', '\n', '\r'];
/// Python's `string.whitespace`, which `free_word` and `non_syntax_word` stop at.
const WHITESPACE: &[char] = &[' ', '\t', '\n', '\r', '\x0b', '\x0c'];
const SYNTAX: &[char] = &['(', ')', '"', ',', '.', '+', '-', '='];

/// A node of the parse tree before flattening.
#[derive(Debug, Clone)]
enum Node {
    Fragment(String),
    Attention(f64, Vec<Node>),
}

/// A top-level term before flattening.
enum Term {
    Prompt(Vec<Node>),
    Blend {
        prompts: Vec<Vec<Node>>,
        weights: Vec<f64>,
        normalize: bool,
    },
}

/// `compel.Fragment`'s constructor: `\(`, `\)` and `\"` become the plain characters.
fn fragment_text(s: &str) -> String {
    s.replace("\\(", "(")
        .replace("\\)", ")")
        .replace("\\\"", "\"")
}

fn unsupported(what: &str) -> Error {
    Error::invalid(format!(
        "prompt weighting: {what} is not supported by this server (compel syntax)"
    ))
}

fn syntax_error(what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("prompt weighting: {what} (compel syntax)"))
}

struct Parser {
    c: Vec<char>,
}

type Parsed<T> = Option<(T, usize)>;

/// `(target, ...).op(options)`: the targets, the operator and the option strings.
struct OperatorList {
    targets: Vec<Vec<Node>>,
    op: String,
    options: Vec<String>,
}

impl Parser {
    fn at(&self, p: usize) -> Option<char> {
        self.c.get(p).copied()
    }

    fn skip(&self, mut p: usize) -> usize {
        while self.at(p).is_some_and(|c| SKIPPED.contains(&c)) {
            p += 1;
        }
        p
    }

    fn literal(&self, p: usize, lit: &str) -> Option<usize> {
        let p = self.skip(p);
        let n = lit.chars().count();
        (self.c.len() >= p + n && self.c[p..p + n].iter().copied().eq(lit.chars())).then_some(p + n)
    }

    /// `non_syntax_word`: characters other than whitespace and `()",.+-=`, escaped syntax
    /// characters, and `+`/`-` followed by such a character. No whitespace is skipped.
    fn word(&self, start: usize) -> Parsed<String> {
        let mut p = start;
        loop {
            match self.at(p) {
                Some('\\') if self.at(p + 1).is_some_and(|c| SYNTAX.contains(&c)) => p += 2,
                Some('+' | '-')
                    if self
                        .at(p + 1)
                        .is_some_and(|c| !SKIPPED.contains(&c) && !SYNTAX.contains(&c)) =>
                {
                    p += 1
                }
                Some(c) if !WHITESPACE.contains(&c) && !SYNTAX.contains(&c) => p += 1,
                _ => break,
            }
        }
        (p > start).then(|| (self.c[start..p].iter().collect(), p))
    }

    /// pyparsing's `real` (`[+-]?(\d+\.\d*|\.\d+)`), else an integer (`-?\d+`), as a float.
    fn number(&self, p: usize) -> Parsed<f64> {
        let p = self.skip(p);
        let digits = |mut q: usize| {
            while self.at(q).is_some_and(|c| c.is_ascii_digit()) {
                q += 1;
            }
            q
        };
        let text = |a: usize, b: usize| self.c[a..b].iter().collect::<String>();
        let mut q = p;
        if matches!(self.at(q), Some('+' | '-')) {
            q += 1;
        }
        let int_end = digits(q);
        if int_end > q && self.at(int_end) == Some('.') {
            let end = digits(int_end + 1);
            return text(p, end).parse().ok().map(|v| (v, end));
        }
        if int_end == q && self.at(q) == Some('.') {
            let end = digits(q + 1);
            if end > q + 1 {
                return text(p, end).parse().ok().map(|v| (v, end));
            }
        }
        let mut q = p;
        if self.at(q) == Some('-') {
            q += 1;
        }
        let end = digits(q);
        (end > q).then(|| text(p, end).parse().ok().map(|v| (v, end)))?
    }

    /// `Word('+') | Word('-') | number`.
    fn weight_operator(&self, p: usize) -> Parsed<f64> {
        let p = self.skip(p);
        for (sign, base) in [('+', PLUS_BASE), ('-', MINUS_BASE)] {
            let mut q = p;
            while self.at(q) == Some(sign) {
                q += 1;
            }
            if q > p {
                return Some((base.powi((q - p) as i32), q));
            }
        }
        self.number(p)
    }

    /// A quoted string's content (`\"` inside does not end it; no line breaks), unquoted as
    /// pyparsing does (`\t`, `\n`, `\f`, `\r` escapes become the characters, `\"` a quote).
    fn quoted_string(&self, p: usize) -> Parsed<String> {
        let p = self.skip(p);
        if self.at(p) != Some('"') {
            return None;
        }
        let mut q = p + 1;
        let mut escapes = Vec::new();
        let end = loop {
            match self.at(q) {
                Some('\\') if self.at(q + 1) == Some('"') => {
                    escapes.push(q);
                    q += 2;
                }
                Some('"') => break q,
                // No closing quote on this line: as the regex pyparsing matches with backtracks,
                // the last `\"` becomes a backslash followed by the closing quote.
                None | Some('\n' | '\r') => break *escapes.last()? + 1,
                Some(_) => q += 1,
            }
        };
        let raw: String = self.c[p + 1..end].iter().collect();
        let mut out = String::new();
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\\' {
                let mapped = match chars.peek() {
                    Some('t') => Some('\t'),
                    Some('n') => Some('\n'),
                    Some('f') => Some('\x0c'),
                    Some('r') => Some('\r'),
                    _ => None,
                };
                if let Some(m) = mapped {
                    chars.next();
                    out.push(m);
                    continue;
                }
            }
            out.push(c);
        }
        Some((out.replace("\\\"", "\""), end + 1))
    }

    /// `quoted_fragment`: the content re-parsed as fragments (quotes inside re-escaped).
    fn quoted_fragment(&self, p: usize) -> Parsed<Vec<Node>> {
        let (content, end) = self.quoted_string(p)?;
        Some((parse_inner(&content, false)?, end))
    }

    /// `quoted_prompt`: the content re-parsed as a whole prompt.
    fn quoted_prompt(&self, p: usize) -> Parsed<Vec<Node>> {
        let (content, end) = self.quoted_string(p)?;
        Some((parse_inner(&content, true)?, end))
    }

    fn parenthesized(&self, p: usize) -> Parsed<Vec<Node>> {
        let p = self.literal(p, "(")?;
        let (nodes, p) = self.fragments(p);
        let p = self.literal(p, ")")?;
        Some((nodes, p))
    }

    /// `quoted_fragment | parenthesized_fragment | non_syntax_word`.
    fn operator_target(&self, p: usize) -> Parsed<Vec<Node>> {
        if let Some(r) = self.quoted_fragment(p) {
            return Some(r);
        }
        if let Some(r) = self.parenthesized(p) {
            return Some(r);
        }
        let (w, end) = self.word(p)?;
        Some((vec![Node::Fragment(fragment_text(&w))], end))
    }

    fn attention(&self, p: usize) -> Parsed<Node> {
        // target.attend(weight)
        if let Some((target, q)) = self.operator_target(p) {
            if let Some(q) = self.literal(q, ".attend") {
                if let Some(q) = self.literal(q, "(") {
                    if let Some((weight, q)) = self.weight_operator(q) {
                        if let Some(q) = self.literal(q, ")") {
                            return Some((Node::Attention(weight, target), q));
                        }
                    }
                }
            }
        }
        // (group)1.3, "group"++, with no whitespace before the weight
        let grouped = self.quoted_fragment(p).or_else(|| self.parenthesized(p));
        if let Some((target, q)) = grouped {
            if self.at(q).is_some_and(|c| !SKIPPED.contains(&c)) {
                if let Some((weight, q)) = self.weight_operator(q) {
                    return Some((Node::Attention(weight, target), q));
                }
            }
            return None;
        }
        // word++ / word--
        let (w, q) = self.word(p)?;
        if self.at(q).is_some_and(|c| !SKIPPED.contains(&c)) {
            for (sign, base) in [('+', PLUS_BASE), ('-', MINUS_BASE)] {
                let mut r = q;
                while self.at(r) == Some(sign) {
                    r += 1;
                }
                if r > q {
                    let node = Node::Fragment(fragment_text(&w));
                    return Some((Node::Attention(base.powi((r - q) as i32), vec![node]), r));
                }
            }
        }
        None
    }

    /// `fragment_including_commas_or_periods`: what may stand inside parentheses and quotes.
    fn fragments(&self, mut p: usize) -> (Vec<Node>, usize) {
        let mut nodes = Vec::new();
        loop {
            let q = self.skip(p);
            if let Some((node, r)) = self.attention(q) {
                nodes.push(node);
                p = r;
            } else if let Some((inner, r)) = self.parenthesized(q) {
                nodes.extend(inner);
                p = r;
            } else if let Some((inner, r)) = self.quoted_fragment(q) {
                nodes.extend(inner);
                p = r;
            } else if let Some((w, r)) = self.word(q) {
                nodes.push(Node::Fragment(fragment_text(&w)));
                p = r;
            } else if let Some(c @ (',' | '.')) = self.at(q) {
                nodes.push(Node::Fragment(c.to_string()));
                p = q + 1;
            } else {
                return (nodes, p);
            }
        }
    }

    /// The top-level `prompt`: like [`Self::fragments`], but any other run of non-space
    /// characters is a plain word (`free_word`).
    fn prompt(&self, mut p: usize) -> (Vec<Node>, usize) {
        let mut nodes = Vec::new();
        loop {
            let q = self.skip(p);
            if q >= self.c.len() {
                return (nodes, q);
            }
            if let Some((node, r)) = self.attention(q) {
                nodes.push(node);
                p = r;
            } else if let Some((inner, r)) = self.quoted_fragment(q) {
                nodes.extend(inner);
                p = r;
            } else if let Some((inner, r)) = self.parenthesized(q) {
                nodes.extend(inner);
                p = r;
            } else {
                let mut r = q;
                while self.at(r).is_some_and(|c| !WHITESPACE.contains(&c)) {
                    r += 1;
                }
                if r == q {
                    // A vertical tab or form feed: pyparsing's `White` takes it.
                    p = q + 1;
                    continue;
                }
                let w: String = self.c[q..r].iter().collect();
                nodes.push(Node::Fragment(fragment_text(&w)));
                p = r;
            }
        }
    }

    /// `(target, target, ...).op(options)` for `.blend`, `.and` and `.add`.
    fn operator_list(&self, p: usize) -> Parsed<OperatorList> {
        let mut p = self.literal(p, "(")?;
        let mut targets = Vec::new();
        loop {
            let (t, q) = self
                .operator_target(self.skip(p))
                .or_else(|| self.quoted_prompt(p))?;
            targets.push(t);
            p = q;
            match self.literal(p, ",") {
                Some(q) => p = q,
                None => break,
            }
        }
        p = self.literal(p, ")")?;
        let (op, mut p) = [".blend", ".and", ".add"]
            .iter()
            .find_map(|op| self.literal(p, op).map(|q| (op.to_string(), q)))?;
        p = self.literal(p, "(")?;
        let mut options = Vec::new();
        if let Some((o, q)) = self.option(p) {
            options.push(o);
            p = q;
            while let Some(q) = self.literal(p, ",") {
                let (o, q) = self.option(q)?;
                options.push(o);
                p = q;
            }
        }
        p = self.literal(p, ")")?;
        Some((
            OperatorList {
                targets,
                op,
                options,
            },
            p,
        ))
    }

    /// One option: `key=value`, a number, or a keyword; its first token as text.
    fn option(&self, p: usize) -> Parsed<String> {
        let p = self.skip(p);
        let keyword = |q: usize| {
            let mut r = q;
            while self
                .at(r)
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-')
            {
                r += 1;
            }
            (r > q).then(|| (self.c[q..r].iter().collect::<String>(), r))
        };
        if let Some((key, q)) = keyword(p) {
            if let Some(q) = self.literal(q, "=") {
                let q2 = self.skip(q);
                if let Some((_, r)) = self
                    .number(q2)
                    .or_else(|| keyword(q2).map(|(_, r)| (0.0, r)))
                {
                    return Some((key, r));
                }
            }
        }
        if let Some((v, q)) = self.number(p) {
            return Some((format!("{v:?}"), q));
        }
        keyword(p)
    }
}

/// Parses text inside quotes: fragments (`in_prompt` false) or a whole prompt, to its end.
fn parse_inner(content: &str, in_prompt: bool) -> Option<Vec<Node>> {
    if content.trim().is_empty() {
        return Some(vec![Node::Fragment(String::new())]);
    }
    let parser = Parser {
        c: content.replace('"', "\\\"").chars().collect(),
    };
    let (nodes, end) = if in_prompt {
        parser.prompt(0)
    } else {
        parser.fragments(0)
    };
    (parser.skip(end) == parser.c.len()).then_some(nodes)
}

fn parse_weights(options: &[String]) -> Result<Vec<f64>> {
    options
        .iter()
        .map(|o| {
            o.parse::<f64>()
                .map_err(|_| syntax_error(format!("`{o}` is not a weight")))
        })
        .collect()
}

/// Parses a prompt in compel's syntax.
pub fn parse(prompt: &str) -> Result<Conjunction> {
    for (marker, what) in [
        (".swap(", "cross-attention control (`.swap()`)"),
        ("withLora(", "LoRA terms in the prompt (`withLora()`)"),
        ("useLora(", "LoRA terms in the prompt (`useLora()`)"),
    ] {
        if prompt.contains(marker) {
            return Err(unsupported(what));
        }
    }
    // compel puts a space after every comma followed by a non-space.
    let mut spaced = String::with_capacity(prompt.len());
    let mut chars = prompt.chars().peekable();
    while let Some(c) = chars.next() {
        spaced.push(c);
        if c == ',' {
            // `re.sub(r',(\S)', r', \1', ...)`: the character after the comma is consumed
            // with it, so `,,a` becomes `, ,a`.
            if let Some(n) = chars.next_if(|n| !n.is_whitespace()) {
                spaced.push(' ');
                spaced.push(n);
            }
        }
    }
    if spaced.trim().is_empty() {
        return Ok(Conjunction {
            parts: vec![Part::Prompt(vec![(String::new(), 1.0)])],
            weights: vec![1.0],
        });
    }
    let parser = Parser {
        c: spaced.chars().collect(),
    };
    let mut terms = Vec::new();
    let mut weights = Vec::new();
    // `(...).and(...)` as the start of the prompt (anything after it is ignored, as compel does).
    match parser.operator_list(0) {
        Some((
            OperatorList {
                targets,
                op,
                options,
            },
            _,
        )) if op != ".blend" => {
            let w = parse_weights(&options)?;
            if !w.is_empty() && w.len() != targets.len() {
                return Err(syntax_error(format!(
                    "`.and()` has {} prompts and {} weights",
                    targets.len(),
                    w.len()
                )));
            }
            weights = if w.is_empty() {
                vec![1.0; targets.len()]
            } else {
                w
            };
            terms.extend(targets.into_iter().map(Term::Prompt));
        }
        Some((
            OperatorList {
                targets,
                mut options,
                ..
            },
            end,
        )) => {
            if parser.skip(end) != parser.c.len() {
                return Err(syntax_error("text after `.blend(...)`"));
            }
            let normalize = options.last().map(String::as_str) != Some("no_normalize");
            if !normalize {
                options.pop();
            }
            let w = parse_weights(&options)?;
            let w = if w.is_empty() {
                vec![1.0; targets.len()]
            } else {
                w
            };
            if w.len() != targets.len() {
                return Err(syntax_error(format!(
                    "`.blend()` has {} prompts and {} weights",
                    targets.len(),
                    w.len()
                )));
            }
            terms.push(Term::Blend {
                prompts: targets,
                weights: w,
                normalize,
            });
            weights.push(1.0);
        }
        None => {
            let (nodes, _) = parser.prompt(0);
            terms.push(Term::Prompt(nodes));
            weights.push(1.0);
        }
    }
    flatten(terms, weights)
}

fn flatten_nodes(nodes: &[Node], scale: f64, out: &mut Vec<Fragment>) {
    for node in nodes {
        match node {
            Node::Fragment(text) => out.push((fragment_text(text), scale)),
            Node::Attention(weight, children) => flatten_nodes(children, scale * weight, out),
        }
    }
}

/// compel's `fuse_fragments`: adjacent fragments of equal weight joined with a space.
fn fuse(fragments: Vec<Fragment>) -> Vec<Fragment> {
    let mut fused: Vec<Fragment> = Vec::new();
    for (text, weight) in fragments {
        match fused.last_mut() {
            Some(last) if last.1 == weight => {
                last.0 = fragment_text(&format!("{} {}", last.0, text));
            }
            _ => fused.push((text, weight)),
        }
    }
    fused
}

fn flatten_prompt(nodes: &[Node]) -> Vec<Fragment> {
    let mut fragments = Vec::new();
    flatten_nodes(nodes, 1.0, &mut fragments);
    fuse(fragments)
}

fn flatten(terms: Vec<Term>, weights: Vec<f64>) -> Result<Conjunction> {
    let mut parts = Vec::new();
    let mut kept = Vec::new();
    for (term, weight) in terms.into_iter().zip(weights) {
        match term {
            Term::Prompt(nodes) => {
                let fragments = flatten_prompt(&nodes);
                // compel drops a part with nothing in it, and its weight.
                if !fragments.is_empty() {
                    parts.push(Part::Prompt(fragments));
                    kept.push(weight);
                }
            }
            Term::Blend {
                prompts,
                weights,
                normalize,
            } => {
                let prompts: Vec<_> = prompts
                    .iter()
                    .map(|p| flatten_prompt(p))
                    .filter(|f| !f.is_empty())
                    .collect();
                if prompts.len() != weights.len() {
                    return Err(syntax_error(format!(
                        "`.blend()` has {} non-empty prompts and {} weights",
                        prompts.len(),
                        weights.len()
                    )));
                }
                parts.push(Part::Blend {
                    prompts,
                    weights,
                    normalize,
                });
                kept.push(weight);
            }
        }
    }
    if parts.is_empty() {
        parts.push(Part::Prompt(vec![(String::new(), 1.0)]));
        kept.push(1.0);
    }
    Ok(Conjunction {
        parts,
        weights: kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(s: &str) -> Vec<Fragment> {
        let c = parse(s).unwrap();
        assert_eq!(c.parts.len(), 1, "{c:?}");
        match &c.parts[0] {
            Part::Prompt(f) => f.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn frags(list: &[(&str, f64)]) -> Vec<Fragment> {
        list.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    fn close(got: &[Fragment], want: &[(&str, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for ((gt, gw), (wt, ww)) in got.iter().zip(want) {
            assert_eq!(gt, wt, "{got:?}");
            assert!((gw - ww).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    // Expected values are what compel 2.5.1's parser returns for the same strings.
    #[test]
    fn plus_minus_and_groups() {
        close(&prompt("(a b)1.3"), &[("a b", 1.3)]);
        assert_eq!(prompt("(a b)"), frags(&[("a b", 1.0)]));
        close(
            &prompt("a (b c)++ d"),
            &[("a", 1.0), ("b c", 1.21), ("d", 1.0)],
        );
        assert_eq!(prompt("a ( b  c ) d"), frags(&[("a b c d", 1.0)]));
        close(&prompt("a-b c-"), &[("a-b", 1.0), ("c", 0.9)]);
        close(&prompt("a--b"), &[("a", 0.81), ("b", 1.0)]);
        close(&prompt("\"a b\"1.2"), &[("a b", 1.2)]);
        close(&prompt("((a)1.2)1.5"), &[("a", 1.8)]);
        close(&prompt("(a)(b)1.2"), &[("a", 1.0), ("b", 1.2)]);
        close(&prompt("a.attend(1.2)"), &[("a", 1.2)]);
        close(&prompt("cat++, dog"), &[("cat", 1.21), (", dog", 1.0)]);
        close(&prompt("(a, b. c)1.1"), &[("a , b . c", 1.1)]);
        close(&prompt("(a).5"), &[("a", 0.5)]);
        close(&prompt("(a)-0.5"), &[("a", 0.9), ("0.5", 1.0)]);
        close(&prompt("(a)1.2.3"), &[("a", 1.2), (".3", 1.0)]);
        close(&prompt("a++ ++"), &[("a", 1.21), ("++", 1.0)]);
    }

    #[test]
    fn text_that_is_not_syntax_stays_text() {
        assert_eq!(prompt("(a - b)"), frags(&[("(a - b)", 1.0)]));
        assert_eq!(prompt("+a"), frags(&[("+a", 1.0)]));
        assert_eq!(prompt("a(b)"), frags(&[("a(b)", 1.0)]));
        assert_eq!(prompt("-- a"), frags(&[("-- a", 1.0)]));
        assert_eq!(prompt("a ++b"), frags(&[("a ++b", 1.0)]));
        assert_eq!(prompt("a,b"), frags(&[("a, b", 1.0)]));
        assert_eq!(prompt("a,,b"), frags(&[("a, ,b", 1.0)]));
        assert_eq!(prompt("a.and()"), frags(&[("a.and()", 1.0)]));
        assert_eq!(prompt("(a = b)"), frags(&[("(a = b)", 1.0)]));
        assert_eq!(prompt("1girl, solo"), frags(&[("1girl, solo", 1.0)]));
    }

    #[test]
    fn escapes() {
        assert_eq!(prompt("x\\(y\\)"), frags(&[("x(y)", 1.0)]));
        close(&prompt("(x\\(y\\))1.2"), &[("x(y)", 1.2)]);
        close(&prompt("\"a \\\"b\\\" c\"1.3"), &[("a \"b\" c", 1.3)]);
        assert_eq!(prompt("a\\+b c\\-"), frags(&[("a\\+b c\\-", 1.0)]));
        // An unclosed quote after `\"`: the backslash stays and the quote closes.
        assert_eq!(prompt("\"a\\\" b"), frags(&[("a\\ b", 1.0)]));
        assert_eq!(prompt("\"t\\tb\""), frags(&[("t b", 1.0)]));
    }

    #[test]
    fn blend_and_conjunction() {
        let c = parse("(\"a (b)1.5\", \"c--\").blend(0.6, 0.4)").unwrap();
        match &c.parts[..] {
            [Part::Blend {
                prompts,
                weights,
                normalize: true,
            }] => {
                close(&prompts[0], &[("a", 1.0), ("b", 1.5)]);
                close(&prompts[1], &[("c", 0.81)]);
                assert_eq!(weights, &vec![0.6, 0.4]);
            }
            other => panic!("{other:?}"),
        }
        let c = parse("(\"a\", \"b\").blend(1,1,no_normalize)").unwrap();
        assert!(matches!(
            &c.parts[0],
            Part::Blend {
                normalize: false,
                ..
            }
        ));
        let c = parse("(\"a cat\", \"a dog\").and()").unwrap();
        assert_eq!(c.weights, vec![1.0, 1.0]);
        assert_eq!(c.parts[1], Part::Prompt(frags(&[("a dog", 1.0)])));
        let c = parse("(\"\", \"c\").and(1, 0.5)").unwrap();
        assert_eq!(c.weights, vec![1.0, 0.5]);
        assert_eq!(c.parts[0], Part::Prompt(frags(&[("", 1.0)])));
        // Text after `.and()` is ignored, as compel ignores it.
        assert_eq!(
            parse("(\"a\", \"b\").and() trailing").unwrap().parts.len(),
            2
        );
        // `(a b, c)` is no list of targets: the whole prompt is text.
        assert_eq!(
            prompt("(a b, c).blend(1,1)"),
            frags(&[("a b , c .blend(1, 1)", 1.0)])
        );
    }

    #[test]
    fn malformed_operators_are_errors() {
        assert!(parse("(\"a\", \"b\").blend(1)").is_err());
        assert!(parse("(\"a\", \"b\").blend(x=1)").is_err());
        assert!(parse("(\"a\", \"b\").blend() x").is_err());
        assert!(parse("a cat.swap(dog)").is_err());
        assert!(parse("withLora(x, 0.5) a").is_err());
    }

    #[test]
    fn empty_prompts() {
        assert_eq!(prompt(""), frags(&[("", 1.0)]));
        assert_eq!(prompt(" "), frags(&[("", 1.0)]));
        assert_eq!(prompt("\"\""), frags(&[("", 1.0)]));
        assert_eq!(prompt("\"\" x"), frags(&[(" x", 1.0)]));
    }
}
