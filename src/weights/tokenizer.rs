//! CLIP tokenizer files of a diffusers folder.
//!
//! Stable Diffusion repos ship the tokenizer as `vocab.json` + `merges.txt` (the format of the
//! original CLIP BPE, Radford et al. 2021, "Learning Transferable Visual Models From Natural
//! Language Supervision"), and only sometimes a `tokenizers` `tokenizer.json`. When the JSON is
//! missing we write an equivalent one (byte-level BPE with the `</w>` end-of-word suffix, NFC +
//! whitespace-collapse + lowercase normalisation, CLIP's split pattern, bos/eos added around the
//! text) into a cache folder, keyed by a hash of its content.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{read_json, TokenizerFiles};
use crate::{Error, Result};

/// The files of a tokenizer folder that sd-serve reads (the hub fetcher downloads these).
pub(crate) const TOKENIZER_FILE_NAMES: &[&str] = &[
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
];

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// The CLIP text encoders have 77 positions; tokenizer configs without a usable
/// `model_max_length` get this.
pub(crate) const CLIP_MAX_LENGTH: usize = 77;

/// Reads a tokenizer folder. `max_positions` (the text encoder's `max_position_embeddings`) caps
/// `model_max_length`, which some configs leave at transformers' "unlimited" sentinel.
pub(crate) fn load_tokenizer_dir(
    dir: &Path,
    max_positions: Option<usize>,
) -> Result<TokenizerFiles> {
    if !dir.is_dir() {
        return Err(Error::model(format!(
            "missing tokenizer folder {}",
            dir.display()
        )));
    }
    let special_map = read_optional_json(&dir.join("special_tokens_map.json"))?;
    let tok_config = read_optional_json(&dir.join("tokenizer_config.json"))?;
    let token = |name: &str| -> Option<String> {
        [&special_map, &tok_config]
            .into_iter()
            .flatten()
            .find_map(|v| token_string(v.get(name)?))
    };
    let pad_token = token("pad_token").unwrap_or_else(|| DEFAULT_EOS.to_string());
    let bos = token("bos_token").unwrap_or_else(|| DEFAULT_BOS.to_string());
    let eos = token("eos_token").unwrap_or_else(|| DEFAULT_EOS.to_string());
    let unk = token("unk_token").unwrap_or_else(|| DEFAULT_EOS.to_string());

    let configured = tok_config
        .as_ref()
        .and_then(|c| c.get("model_max_length"))
        .and_then(Value::as_f64)
        // transformers writes 1e30 for "no limit"; anything that large is not a real length.
        .filter(|n| (1.0..1e9).contains(n))
        .map(|n| n as usize);
    let model_max_length = match (configured, max_positions) {
        (Some(n), Some(p)) => n.min(p),
        (Some(n), None) => n,
        (None, Some(p)) => p,
        (None, None) => CLIP_MAX_LENGTH,
    };

    let json_path = dir.join("tokenizer.json");
    let tokenizer_json = if json_path.is_file() {
        json_path
    } else {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        if !vocab.is_file() || !merges.is_file() {
            return Err(Error::model(format!(
                "missing tokenizer file in {}: neither tokenizer.json nor vocab.json + merges.txt",
                dir.display()
            )));
        }
        let specials = Specials {
            bos: &bos,
            eos: &eos,
            unk: &unk,
            pad: &pad_token,
        };
        synthesize_tokenizer_json(&vocab, &merges, &specials)?
    };
    Ok(TokenizerFiles {
        tokenizer_json,
        pad_token,
        model_max_length,
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special token is written either as a plain string or as `{"content": "...", ...}`.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

struct Specials<'a> {
    bos: &'a str,
    eos: &'a str,
    unk: &'a str,
    pad: &'a str,
}

/// Writes a `tokenizer.json` equivalent to transformers' CLIP tokenizer over `vocab.json` and
/// `merges.txt`, and returns its path.
fn synthesize_tokenizer_json(vocab: &Path, merges: &Path, sp: &Specials) -> Result<PathBuf> {
    let vocab_map = read_json(vocab)?;
    let Some(vocab_obj) = vocab_map.as_object() else {
        return Err(Error::model(format!(
            "{} is not a token -> id map",
            vocab.display()
        )));
    };
    let id_of = |tok: &str| -> Result<u64> {
        vocab_obj.get(tok).and_then(Value::as_u64).ok_or_else(|| {
            Error::model(format!(
                "special token `{tok}` is not in {}",
                vocab.display()
            ))
        })
    };
    let merges_text = std::fs::read_to_string(merges)
        .map_err(|e| Error::model(format!("cannot read {}: {e}", merges.display())))?;
    let merge_pairs: Vec<Value> = merges_text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok(json!([a, b])),
                _ => Err(Error::model(format!(
                    "malformed merge line `{l}` in {}",
                    merges.display()
                ))),
            }
        })
        .collect::<Result<_>>()?;

    let (bos_id, eos_id) = (id_of(sp.bos)?, id_of(sp.eos)?);
    let mut added = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for tok in [sp.pad, sp.bos, sp.eos, sp.unk] {
        // Specials are matched whole in the input, as transformers does for its added tokens.
        if seen.insert(tok) {
            added.push((id_of(tok)?, tok));
        }
    }
    added.sort();
    let added_tokens: Vec<Value> = added
        .iter()
        .map(|(id, tok)| {
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let split_pattern = format!(
        "{}|{}|'s|'t|'re|'ve|'m|'ll|'d|[\\p{{L}}]+|[\\p{{N}}]|[^\\s\\p{{L}}\\p{{N}}]+",
        regex_escape(sp.bos),
        regex_escape(sp.eos)
    );
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split_pattern}, "behavior": "Removed",
             "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [sp.eos, eos_id],
                           "cls": [sp.bos, bos_id], "trim_offsets": false,
                           "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": sp.unk,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_map, "merges": merge_pairs}
    });
    let text = serde_json::to_string(&doc).expect("a JSON value serialises; this is a bug");
    let dir = cache_dir().join("tokenizers");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::model(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(format!("clip-{:016x}.json", fnv1a(text.as_bytes())));
    if !path.is_file() {
        // Write then rename, so a concurrent reader never sees half a file.
        let tmp = dir.join(format!(
            ".clip-{:016x}.{}.tmp",
            fnv1a(text.as_bytes()),
            std::process::id()
        ));
        std::fs::write(&tmp, &text)
            .map_err(|e| Error::model(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::model(format!("cannot write {}: {e}", path.display())))?;
    }
    tracing::debug!(
        "tokenizer {} written to {}",
        vocab.display(),
        path.display()
    );
    Ok(path)
}

/// sd-serve's own cache folder: `$SD_SERVE_CACHE`, else `$XDG_CACHE_HOME/sd-serve`, else
/// `~/.cache/sd-serve`, else the system temp folder.
pub(crate) fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SD_SERVE_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("sd-serve");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("sd-serve");
    }
    std::env::temp_dir().join("sd-serve")
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// FNV-1a: a stable content hash for cache file names (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_token_as_string_or_object() {
        assert_eq!(token_string(&json!("!")).as_deref(), Some("!"));
        assert_eq!(
            token_string(&json!({"content": "!", "lstrip": false})).as_deref(),
            Some("!")
        );
        assert_eq!(token_string(&json!(3)), None);
    }

    #[test]
    fn regex_escape_special_tokens() {
        assert_eq!(regex_escape("<|endoftext|>"), "<\\|endoftext\\|>");
    }
}
