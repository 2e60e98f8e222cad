//! The AUTOMATIC1111 web UI's prompt syntax and long-prompt handling (`sdEmbeds` on Runware).
//!
//! Syntax (A1111 `modules/prompt_parser.py`, `parse_prompt_attention`): `(text)` multiplies the
//! attention of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies it by 1.3;
//! brackets nest and multiply; `\(`, `\)`, `\[`, `\]` and `\\` are literal characters; an
//! unclosed bracket applies to the rest of the prompt, and a closing bracket without its opening
//! one is plain text. `BREAK` (a whole word, in capitals) starts a new 75-token chunk.
//!
//! Encoding (A1111 `modules/sd_hijack_clip.py`): the prompt's tokens are cut into chunks of 75;
//! when a chunk fills up and a comma appeared within its last 20 tokens, the tokens after that
//! comma move to the next chunk. Each chunk is encoded on its own as start + 75 tokens + end
//! (padded), its hidden states multiplied by the tokens' weights and rescaled so that their mean
//! is the unweighted one ("Original" emphasis). The chunks are concatenated on the sequence axis.

use candle_core::Tensor;

use crate::pipeline::prompt::ClipTokenizer;
use crate::{Error, Result};

/// How much `(...)` multiplies and `[...]` divides the attention.
const BRACKET_MULTIPLIER: f64 = 1.1;
/// A1111's `comma_padding_backtrack` default: how far back a comma may move the chunk boundary.
const COMMA_BACKTRACK: usize = 20;
/// The weight A1111 marks a `BREAK` with (a real weight cannot be exactly -1 after the parse,
/// except inside brackets, where A1111 then treats the word as text).
const BREAK_WEIGHT: f64 = -1.0;

/// One piece of a parsed prompt: text and its attention multiplier. `("BREAK", -1.0)` marks a
/// chunk break.
pub type Piece = (String, f64);

#[derive(Debug, PartialEq)]
enum Lexeme<'a> {
    /// An escaped character or a lone backslash (which stands for nothing).
    Literal(&'a str),
    OpenRound,
    OpenSquare,
    /// `:weight)`: the weight's text.
    WeightClose(&'a str),
    CloseRound,
    CloseSquare,
    /// Plain text, or a lone `:`, or a `:weight)` with no round bracket open.
    Text(&'a str),
}

/// A1111's `re_attention` alternatives, in their order, matched at `rest`'s start.
fn next_lexeme(rest: &str) -> (Lexeme<'_>, usize) {
    let mut chars = rest.chars();
    let first = chars
        .next()
        .expect("next_lexeme is called on a non-empty string; this is a bug");
    match first {
        '\\' => match chars.next() {
            Some(c @ ('(' | ')' | '[' | ']' | '\\')) => (
                Lexeme::Literal(&rest[1..1 + c.len_utf8()]),
                1 + c.len_utf8(),
            ),
            _ => (Lexeme::Literal(""), 1),
        },
        '(' => (Lexeme::OpenRound, 1),
        '[' => (Lexeme::OpenSquare, 1),
        ':' => match weight_close(rest) {
            Some((weight, len)) => (Lexeme::WeightClose(weight), len),
            None => (Lexeme::Text(&rest[..1]), 1),
        },
        ')' => (Lexeme::CloseRound, 1),
        ']' => (Lexeme::CloseSquare, 1),
        _ => {
            let len = rest
                .find(['\\', '(', ')', '[', ']', ':'])
                .unwrap_or(rest.len());
            (Lexeme::Text(&rest[..len]), len)
        }
    }
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: the weight's text and the match length.
fn weight_close(s: &str) -> Option<(&str, usize)> {
    let mut i = 1;
    let skip_ws = |mut i: usize| {
        while let Some(c) = s[i..].chars().next().filter(|c| c.is_whitespace()) {
            i += c.len_utf8();
        }
        i
    };
    i = skip_ws(i);
    let start = i;
    if s[i..].starts_with(['+', '-']) {
        i += 1;
    }
    let digits_start = i;
    while s[i..].starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
        i += 1;
    }
    if i == digits_start {
        return None;
    }
    let end = i;
    i = skip_ws(i);
    s[i..].starts_with(')').then_some((&s[start..end], i + 1))
}

/// Splits on `\s*\bBREAK\b\s*` as Python's `re.split` does.
fn split_break(text: &str) -> Vec<&str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut parts = Vec::new();
    let mut last_end = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let after = at + "BREAK".len();
        let boundary_before = !text[..at].chars().next_back().is_some_and(is_word);
        let boundary_after = !text[after..].chars().next().is_some_and(is_word);
        if boundary_before && boundary_after {
            // The match starts where the whitespace before BREAK starts (not before the last
            // match's end) and takes the whitespace after it.
            let mut start = at;
            while let Some(c) = text[last_end..start].chars().next_back() {
                if !c.is_whitespace() {
                    break;
                }
                start -= c.len_utf8();
            }
            let mut end = after;
            while let Some(c) = text[end..].chars().next().filter(|c| c.is_whitespace()) {
                end += c.len_utf8();
            }
            parts.push(&text[last_end..start]);
            last_end = end;
            search = end;
        } else {
            search = at + 1;
        }
    }
    parts.push(&text[last_end..]);
    parts
}

/// A1111's `parse_prompt_attention`: the prompt as text pieces with their multipliers, runs of
/// equal multipliers merged. A weight that is not a number (`(a:1.2.3)`) is an error, where
/// A1111 fails the generation.
pub fn parse(text: &str) -> Result<Vec<Piece>> {
    let mut res: Vec<Piece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Piece>, from: usize, by: f64| {
        for piece in &mut res[from..] {
            piece.1 *= by;
        }
    };
    let mut rest = text;
    while !rest.is_empty() {
        let (lexeme, len) = next_lexeme(rest);
        rest = &rest[len..];
        match lexeme {
            Lexeme::Literal(s) => res.push((s.to_string(), 1.0)),
            Lexeme::OpenRound => round.push(res.len()),
            Lexeme::OpenSquare => square.push(res.len()),
            Lexeme::WeightClose(w) if !round.is_empty() => {
                let weight: f64 = w.parse().map_err(|_| {
                    Error::invalid(format!(
                        "prompt weight `{w}` is not a number (write `(text:1.2)`)"
                    ))
                })?;
                let from = round.pop().expect("checked non-empty");
                multiply(&mut res, from, weight);
            }
            Lexeme::CloseRound if !round.is_empty() => {
                let from = round.pop().expect("checked non-empty");
                multiply(&mut res, from, BRACKET_MULTIPLIER);
            }
            Lexeme::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("checked non-empty");
                multiply(&mut res, from, 1.0 / BRACKET_MULTIPLIER);
            }
            Lexeme::WeightClose(_) | Lexeme::CloseRound | Lexeme::CloseSquare | Lexeme::Text(_) => {
                let matched = &text[text.len() - rest.len() - len..text.len() - rest.len()];
                for (i, part) in split_break(matched).into_iter().enumerate() {
                    if i > 0 {
                        res.push(("BREAK".to_string(), BREAK_WEIGHT));
                    }
                    res.push((part.to_string(), 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, BRACKET_MULTIPLIER);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / BRACKET_MULTIPLIER);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 {
            let next = res.remove(i + 1);
            res[i].0.push_str(&next.0);
        } else {
            i += 1;
        }
    }
    Ok(res)
}

/// One 77-token chunk: start, 75 prompt or end tokens, end; the multiplier of each position.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub multipliers: Vec<f32>,
}

/// A1111's `tokenize_line`: the parsed prompt as chunks of `max_len - 2` tokens, each closed
/// with start/end tokens. Positions after the end token hold the tokenizer's pad token (A1111
/// pads SD 1.x with the end token and OpenCLIP encoders with id 0, as the tokenizers do).
pub fn chunks(tokenizer: &ClipTokenizer, pieces: &[Piece]) -> Result<Vec<Chunk>> {
    let chunk_len = tokenizer.max_len() - 2;
    let comma = tokenizer.token_id(",</w>");
    let mut chunks = Vec::new();
    let mut tokens: Vec<u32> = Vec::new();
    let mut mults: Vec<f64> = Vec::new();
    let mut last_comma: Option<usize> = None;

    let close = |tokens: &mut Vec<u32>, mults: &mut Vec<f64>, chunks: &mut Vec<Chunk>| {
        chunks.push(close_chunk(tokenizer, tokens, mults));
        tokens.clear();
        mults.clear();
    };

    for (text, weight) in pieces {
        if text == "BREAK" && *weight == BREAK_WEIGHT {
            close(&mut tokens, &mut mults, &mut chunks);
            last_comma = None;
            continue;
        }
        for token in tokenizer.tokens(text)? {
            if Some(token) == comma {
                last_comma = Some(tokens.len());
            } else if let Some(at) = last_comma
                .filter(|&at| tokens.len() == chunk_len && tokens.len() - at <= COMMA_BACKTRACK)
            {
                // The chunk is full and a comma is near: the words after it start the next one.
                let moved_tokens = tokens.split_off(at + 1);
                let moved_mults = mults.split_off(at + 1);
                close(&mut tokens, &mut mults, &mut chunks);
                last_comma = None;
                tokens = moved_tokens;
                mults = moved_mults;
            }
            if tokens.len() == chunk_len {
                close(&mut tokens, &mut mults, &mut chunks);
                last_comma = None;
            }
            tokens.push(token);
            mults.push(*weight);
        }
    }
    if !tokens.is_empty() || chunks.is_empty() {
        close(&mut tokens, &mut mults, &mut chunks);
    }
    Ok(chunks)
}

fn close_chunk(tokenizer: &ClipTokenizer, tokens: &[u32], mults: &[f64]) -> Chunk {
    let len = tokenizer.max_len();
    let mut ids = Vec::with_capacity(len);
    ids.push(tokenizer.bos_id());
    ids.extend_from_slice(tokens);
    ids.push(tokenizer.eos_id());
    ids.resize(len, tokenizer.pad_id());
    let mut multipliers = Vec::with_capacity(len);
    multipliers.push(1.0);
    multipliers.extend(mults.iter().map(|&m| m as f32));
    multipliers.resize(len, 1.0);
    Chunk { ids, multipliers }
}

/// A1111's "Original" emphasis on one chunk's hidden states `[1, S, D]`: multiply each position
/// by its weight, then rescale so the mean over the whole chunk is the unweighted mean.
pub fn emphasize(z: &Tensor, multipliers: &[f32]) -> Result<Tensor> {
    let original_mean = z.mean_all()?;
    let w = Tensor::from_slice(multipliers, (1, multipliers.len(), 1), z.device())?
        .to_dtype(z.dtype())?;
    let weighted = z.broadcast_mul(&w)?;
    let new_mean = weighted.mean_all()?;
    let ratio = (original_mean / new_mean)?;
    Ok(weighted.broadcast_mul(&ratio)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Vec<Piece> {
        parse(text).unwrap()
    }

    fn pieces(list: &[(&str, f64)]) -> Vec<Piece> {
        list.iter().map(|(t, w)| (t.to_string(), *w)).collect()
    }

    fn assert_close(got: &[Piece], want: &[(&str, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for ((gt, gw), (wt, ww)) in got.iter().zip(want) {
            assert_eq!(gt, wt, "{got:?} vs {want:?}");
            assert!((gw - ww).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    // The examples of A1111's own docstring.
    #[test]
    fn a1111_docstring_examples() {
        assert_eq!(p("normal text"), pieces(&[("normal text", 1.0)]));
        assert_close(
            &p("an (important) word"),
            &[("an ", 1.0), ("important", 1.1), (" word", 1.0)],
        );
        assert_close(&p("(unbalanced"), &[("unbalanced", 1.1)]);
        assert_eq!(p("\\(literal\\]"), pieces(&[("(literal]", 1.0)]));
        assert_close(&p("(unnecessary)(parens)"), &[("unnecessaryparens", 1.1)]);
        assert_close(
            &p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            &[
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1 * 1.1 * 1.1 * 1.1),
                (".", 1.1),
            ],
        );
    }

    #[test]
    fn weights_nest_and_multiply() {
        assert_close(&p("((a:1.5):2)"), &[("a", 3.0)]);
        assert_close(&p("[[a]]"), &[("a", 1.0 / 1.1 / 1.1)]);
        assert_close(&p("(a:-0.5)"), &[("a", -0.5)]);
        assert_close(&p("( a : 1.2 )"), &[(" a ", 1.2)]);
        assert_close(&p("(a:+.5)"), &[("a", 0.5)]);
    }

    #[test]
    fn unmatched_brackets_are_text() {
        assert_eq!(p("a) b] c"), pieces(&[("a) b] c", 1.0)]));
        assert_eq!(p("a:1.2) b"), pieces(&[("a:1.2) b", 1.0)]));
        assert_eq!(p("time: noon"), pieces(&[("time: noon", 1.0)]));
        assert_close(&p("[a"), &[("a", 1.0 / 1.1)]);
        // A weight closes only a round bracket: `[a:1.2)` is text inside an open square one.
        assert_close(&p("[a:1.2)"), &[("a:1.2)", 1.0 / 1.1)]);
    }

    #[test]
    fn escapes() {
        assert_eq!(p("\\\\"), pieces(&[("\\", 1.0)]));
        // A backslash before another character stands for nothing.
        assert_eq!(p("a\\b"), pieces(&[("ab", 1.0)]));
        assert_eq!(p("\\(a:1.2\\)"), pieces(&[("(a:1.2)", 1.0)]));
        assert_close(&p("(\\(x\\))"), &[("(x)", 1.1)]);
    }

    #[test]
    fn break_splits_whole_words_only() {
        assert_eq!(
            p("a BREAK b"),
            pieces(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert_eq!(
            p("aBREAK b BREAKfast"),
            pieces(&[("aBREAK b BREAKfast", 1.0)])
        );
        assert_eq!(
            p("BREAK BREAK"),
            pieces(&[
                ("", 1.0),
                ("BREAK", -1.0),
                ("", 1.0),
                ("BREAK", -1.0),
                ("", 1.0)
            ])
        );
        // Inside brackets the marker's weight is no longer -1: A1111 then reads it as text.
        let inside = p("(BREAK)");
        assert_eq!(inside[1].0, "BREAK");
        assert!((inside[1].1 + 1.1).abs() < 1e-12);
    }

    #[test]
    fn bad_weight_is_an_error() {
        assert!(parse("(a:1.2.3)").is_err());
        assert!(parse("(a:.)").is_err());
        // Without an open round bracket the same text is plain text.
        assert!(parse("a:1.2.3)").is_ok());
    }

    #[test]
    fn empty_prompt_is_one_empty_piece() {
        assert_eq!(p(""), pieces(&[("", 1.0)]));
        assert_eq!(p("()"), pieces(&[("", 1.0)]));
    }
}
