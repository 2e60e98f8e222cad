//! CLIP prompt tokenization against transformers' `CLIPTokenizer` goldens
//! (`tests/fixtures/goldens/tokenizer.json`): every golden prompt under both pad conventions,
//! from each model's `tokenizer.json` and from the bare `vocab.json` + `merges.txt` that diffusers
//! repositories ship (written here from the same vocabulary, as the fixtures keep only the JSON).

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::DType;
use sd_serve::pipeline::prompt::ClipTokenizer;
use serde_json::Value;

use common::{fixtures, read_json, scratch, tokenizer_settings, Scratch};

fn golden() -> Value {
    read_json(&fixtures().join("goldens/tokenizer.json"))
}

fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Writes the shared tokenizer's vocabulary as `vocab.json` + `merges.txt`, as published SD
/// repositories lay it out, in a fresh folder; returns (folder, vocab, merges).
fn vocab_and_merges() -> (Scratch, PathBuf, PathBuf) {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let json = read_json(&fixtures().join("clip-tokenizer/tokenizer.json"));
    let model = &json["model"];
    // One folder per call: the tests run in parallel threads of one process.
    let dir = scratch(&format!(
        "clip-vocab-{}",
        CALLS.fetch_add(1, Ordering::SeqCst)
    ));
    let vocab = dir.join("vocab.json");
    std::fs::write(&vocab, serde_json::to_string(&model["vocab"]).unwrap()).unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for merge in model["merges"].as_array().unwrap() {
        // Either "a b" or ["a", "b"], depending on the tokenizers version that wrote the file.
        let line = match merge {
            Value::String(pair) => pair.clone(),
            Value::Array(pair) => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
            other => panic!("unexpected merge entry {other}"),
        };
        merges.push_str(&line);
        merges.push('\n');
    }
    let merges_path = dir.join("merges.txt");
    std::fs::write(&merges_path, merges).unwrap();
    (dir, vocab, merges_path)
}

/// A pad convention, a tokenizer folder using it, and the tokenizers built for that folder
/// (labelled by the files they were built from).
type FolderTokenizers = (String, String, Vec<(&'static str, ClipTokenizer)>);

/// Every (convention, folder) pair with the tokenizers built from it.
fn tokenizers_by_convention() -> Vec<FolderTokenizers> {
    let gold = golden();
    let (vocab_dir, vocab, merges) = vocab_and_merges();
    let mut all = Vec::new();
    for (convention, folders) in gold["folders"].as_object().unwrap() {
        for folder in folders.as_array().unwrap() {
            let folder = folder.as_str().unwrap();
            let dir = fixtures().join(folder);
            let (pad, max_len) = tokenizer_settings(&dir);
            let from_json = ClipTokenizer::new(&dir.join("tokenizer.json"), &pad, max_len).unwrap();
            let from_vocab =
                ClipTokenizer::from_vocab_merges(&vocab, &merges, &pad, max_len).unwrap();
            all.push((
                convention.clone(),
                folder.to_string(),
                vec![("tokenizer.json", from_json), ("vocab+merges", from_vocab)],
            ));
        }
    }
    // The tokenizers have read their files.
    drop(vocab_dir);
    assert_eq!(all.len(), 4, "two folders per pad convention");
    all
}

#[test]
fn padded_ids_match_transformers_for_every_prompt_and_pad_convention() {
    let gold = golden();
    let max_length = gold["max_length"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for (convention, folder, tokenizers) in tokenizers_by_convention() {
        let expected = &gold["padded"][&convention];
        for (source, tokenizer) in &tokenizers {
            assert_eq!(tokenizer.max_len(), max_length);
            assert_eq!(
                tokenizer.pad_id() as u64,
                expected["pad_id"].as_u64().unwrap(),
                "{folder} ({source})"
            );
            for (name, text) in gold["prompts"].as_object().unwrap() {
                let ids = tokenizer.encode_ids(text.as_str().unwrap()).unwrap();
                assert_eq!(
                    ids,
                    ids_of(&expected["ids"][name]),
                    "{convention} {folder} ({source}) prompt `{name}`"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked,
        4 * 2 * golden()["prompts"].as_object().unwrap().len()
    );
}

#[test]
fn token_count_matches_unpadded_length() {
    let gold = golden();
    for (_, folder, tokenizers) in tokenizers_by_convention() {
        if !folder.contains("sd15") {
            // The unpadded goldens use the `<|endoftext|>`-padded tokenizer (with pad `!`, a
            // literal `!` becomes its own token, which changes counts only for `punctuation`).
            continue;
        }
        for (source, tokenizer) in &tokenizers {
            for (name, ids) in gold["unpadded"].as_object().unwrap() {
                let text = gold["prompts"][name].as_str().unwrap();
                let expected = ids_of(ids).len() - 2;
                assert_eq!(
                    tokenizer.token_count(text).unwrap(),
                    expected,
                    "{folder} ({source}) prompt `{name}`"
                );
            }
        }
    }
    // The long prompt is really over the limit, so truncation is exercised above.
    assert!(ids_of(&gold["unpadded"]["long"]).len() > 77);
}

#[test]
fn encode_prompts_batches_rows_of_max_len_u32() {
    let gold = golden();
    let dir = fixtures().join("tiny-sd2/tokenizer");
    let (pad, max_len) = tokenizer_settings(&dir);
    let tokenizer = ClipTokenizer::new(&dir.join("tokenizer.json"), &pad, max_len).unwrap();
    let names = ["plain", "long", "empty"];
    let prompts: Vec<&str> = names
        .iter()
        .map(|n| gold["prompts"][n].as_str().unwrap())
        .collect();
    let ids = tokenizer.encode_prompts(&prompts).unwrap();
    assert_eq!(ids.dims(), &[3, 77]);
    assert_eq!(ids.dtype(), DType::U32);
    let rows = ids.to_vec2::<u32>().unwrap();
    for (row, name) in rows.iter().zip(names) {
        assert_eq!(
            row,
            &ids_of(&gold["padded"]["pad_bang"]["ids"][name]),
            "{name}"
        );
    }
    // Truncation keeps the end token as the last id.
    assert_eq!(rows[1][76], tokenizer.eos_id());
}

#[test]
fn bad_tokenizer_settings_are_refused() {
    let dir = fixtures().join("tiny-sd15/tokenizer");
    let json = dir.join("tokenizer.json");
    // A pad token outside the vocabulary would index past the encoder's embedding table.
    assert!(ClipTokenizer::new(&json, "<|pad|>", 77).is_err());
    assert!(ClipTokenizer::new(&dir.join("missing.json"), "!", 77).is_err());
    // No room for the start and end tokens.
    assert!(ClipTokenizer::new(&json, "!", 1).is_err());
}
