//! Textual inversion embeddings: learned input vectors for the text encoders (Gal et al. 2022,
//! "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion").
//!
//! An embedding is `n` vectors as wide as a text encoder's token embeddings; a prompt that writes
//! its token gets those `n` vectors where a word's embedding would be. The layouts read:
//!
//! * A1111 `.pt` (a `torch.save` zip): a dict with the vectors `[n, D]` under
//!   `string_to_param["*"]` and the token under `name`;
//! * A1111 `.safetensors`: the vectors under `emb_params` (some converters write
//!   `string_to_param.*`);
//! * diffusers `learned_embeds.safetensors` (or `.bin`): one tensor `[D]` or `[n, D]` whose key is
//!   the token;
//! * SDXL: `clip_l` `[n, 768]` for the first text encoder and `clip_g` `[n, 1280]` for the second,
//!   in one file.
//!
//! `.pt` / `.bin` files are read with candle's pickle reader, which turns the pickle opcodes into
//! plain data (dicts, strings, tensor references) without importing or calling anything, so
//! reading one cannot run code the way `torch.load` can.

use std::collections::HashMap;
use std::path::Path;

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The most vectors one embedding may have: a prompt holds 75 tokens.
pub const MAX_VECTORS: usize = 75;

/// The layout an embedding file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingFormat {
    /// A1111 `.pt`: `string_to_param["*"]` and `name`.
    A1111Pickle,
    /// A1111 `.safetensors`: `emb_params` (or `string_to_param.*`).
    A1111Safetensors,
    /// diffusers: `{token: tensor}`.
    Diffusers,
    /// SDXL: `clip_l` and `clip_g`.
    SdxlPair,
}

/// The vectors of one embedding file, f32, on the device it was loaded for.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    pub format: EmbeddingFormat,
    /// The token the file itself names (A1111 `name`, diffusers key), if any.
    pub file_token: Option<String>,
    /// `[n, D]` for the (first) text encoder.
    pub vectors: Tensor,
    /// SDXL: `[n, D2]` for the second text encoder (`clip_g`).
    pub vectors_2: Option<Tensor>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::model(format!("embedding {}: {msg}", path.display()))
}

impl TextualInversion {
    /// Reads an embedding file (`.safetensors`, or a `torch.save` zip: `.pt`, `.pth`, `.bin`).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        match ext.as_str() {
            "safetensors" => {
                let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
                let tensors = candle_core::safetensors::load_buffer(&bytes, device)
                    .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
                Self::from_tensors(tensors, None).map_err(|e| bad(path, e))
            }
            "pt" | "pth" | "bin" => Self::load_pickle(path, device),
            other => Err(bad(
                path,
                format!(
                    "unknown file type `.{other}`: expected .safetensors or a torch.save file \
                     (.pt, .pth, .bin)"
                ),
            )),
        }
    }

    fn load_pickle(path: &Path, device: &Device) -> Result<Self> {
        let not_zip = |e: &dyn std::fmt::Display| {
            bad(
                path,
                format!(
                    "cannot read it as a torch.save zip archive ({e}); files written by torch \
                     before 1.6 must be saved again or converted to safetensors"
                ),
            )
        };
        let top = read_pickle_dict(path).map_err(|e| not_zip(&e))?;
        let has = |key: &str| top.iter().any(|(k, _)| *k == key);
        if has("string_to_param") {
            let name = top.iter().find_map(|(k, v)| match (k.as_str(), v) {
                ("name", Object::Unicode(name)) => Some(name.clone()),
                _ => None,
            });
            let pth = PthTensors::new(path, Some("string_to_param")).map_err(|e| not_zip(&e))?;
            let vectors = pth
                .get("*")
                .map_err(|e| bad(path, e))?
                .ok_or_else(|| bad(path, "`string_to_param` holds no `*` tensor"))?;
            let vectors = vectors.to_device(device)?;
            let mut out = Self::from_tensors(HashMap::from([("emb_params".into(), vectors)]), None)
                .map_err(|e| bad(path, e))?;
            out.format = EmbeddingFormat::A1111Pickle;
            out.file_token = name;
            return Ok(out);
        }
        let pth = PthTensors::new(path, None).map_err(|e| not_zip(&e))?;
        let mut tensors = HashMap::new();
        for name in pth.tensor_infos().keys() {
            if let Some(t) = pth.get(name).map_err(|e| bad(path, e))? {
                tensors.insert(name.clone(), t.to_device(device)?);
            }
        }
        let keys: Vec<String> = top.iter().map(|(k, _)| k.clone()).collect();
        Self::from_tensors(tensors, Some(&keys)).map_err(|e| bad(path, e))
    }

    /// Recognises the layout from the tensor names. `keys`: every top-level key of a pickled
    /// dict (tensors or not), for the error message.
    pub fn from_tensors(
        mut tensors: HashMap<String, Tensor>,
        keys: Option<&[String]>,
    ) -> std::result::Result<Self, String> {
        let (format, file_token, vectors, vectors_2) =
            match (tensors.remove("clip_l"), tensors.remove("clip_g")) {
                (Some(l), Some(g)) => (EmbeddingFormat::SdxlPair, None, l, Some(g)),
                (Some(_), None) | (None, Some(_)) => {
                    return Err(
                        "an SDXL embedding needs both `clip_l` and `clip_g` vectors; the file \
                         has only one of them"
                            .into(),
                    )
                }
                (None, None) => {
                    let a1111 = ["emb_params", "string_to_param.*"]
                        .into_iter()
                        .find_map(|k| tensors.remove(k));
                    if let Some(v) = a1111 {
                        (EmbeddingFormat::A1111Safetensors, None, v, None)
                    } else if tensors.len() == 1 {
                        let (token, v) = tensors.drain().next().expect("one tensor; this is a bug");
                        (EmbeddingFormat::Diffusers, Some(token), v, None)
                    } else {
                        let mut names: Vec<String> = match keys {
                            Some(k) => k.to_vec(),
                            None => tensors.keys().cloned().collect(),
                        };
                        names.sort();
                        return Err(format!(
                            "not a textual inversion embedding: expected `emb_params`, \
                             `string_to_param`, `clip_l` + `clip_g`, or a single {{token: \
                             tensor}}; found {}",
                            if names.is_empty() {
                                "nothing".to_string()
                            } else {
                                names.join(", ")
                            }
                        ));
                    }
                }
            };
        Ok(Self {
            format,
            file_token,
            vectors: as_rows(vectors, "the vectors")?,
            vectors_2: vectors_2
                .map(|v| as_rows(v, "the `clip_g` vectors"))
                .transpose()?,
        })
    }

    /// How many vectors (prompt tokens) the embedding takes.
    pub fn len(&self) -> usize {
        self.vectors.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the vectors against the widths of the model's text encoders (`widths[1]`: SDXL's
    /// second encoder), naming `id` in the error.
    pub fn check_widths(&self, id: &str, widths: &[usize]) -> Result<()> {
        let width = |t: &Tensor| t.dims()[1];
        match (widths, &self.vectors_2) {
            ([w], None) if width(&self.vectors) == *w => Ok(()),
            ([w], None) => Err(Error::invalid(format!(
                "embedding `{id}` has {}-wide vectors, but this model's text encoder takes \
                 {w}-wide ones: it was made for another model family",
                width(&self.vectors)
            ))),
            ([_], Some(_)) => Err(Error::invalid(format!(
                "embedding `{id}` is an SDXL embedding (`clip_l` + `clip_g`), but this model has \
                 one text encoder"
            ))),
            ([_, _], None) => Err(Error::invalid(format!(
                "embedding `{id}` has vectors for one text encoder; an SDXL model needs `clip_l` \
                 and `clip_g` vectors for its two"
            ))),
            ([w1, w2], Some(v2)) => {
                if width(&self.vectors) != *w1 || width(v2) != *w2 {
                    return Err(Error::invalid(format!(
                        "embedding `{id}` has {}-wide `clip_l` and {}-wide `clip_g` vectors, but \
                         this model's text encoders take {w1} and {w2}",
                        width(&self.vectors),
                        width(v2)
                    )));
                }
                if v2.dims()[0] != self.len() {
                    return Err(Error::invalid(format!(
                        "embedding `{id}` has {} `clip_l` but {} `clip_g` vectors; both encoders \
                         need one vector per token",
                        self.len(),
                        v2.dims()[0]
                    )));
                }
                Ok(())
            }
            _ => Err(Error::model(format!(
                "a model with {} text encoders cannot take embeddings",
                widths.len()
            ))),
        }
    }

    /// Bytes held by the vectors.
    pub fn size_in_bytes(&self) -> usize {
        std::iter::once(&self.vectors)
            .chain(&self.vectors_2)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// `[D]` or `[n, D]` floats to `[n, D]` f32, 1 <= n <= [`MAX_VECTORS`].
fn as_rows(t: Tensor, what: &str) -> std::result::Result<Tensor, String> {
    let t = match t.rank() {
        1 => t.unsqueeze(0).map_err(|e| e.to_string())?,
        2 => t,
        _ => {
            return Err(format!(
                "{what} must be [n, D] or [D]; found {:?}",
                t.dims()
            ))
        }
    };
    let (n, d) = (t.dims()[0], t.dims()[1]);
    if n == 0 || n > MAX_VECTORS || d == 0 {
        return Err(format!(
            "{what} must be 1 to {MAX_VECTORS} vectors of a positive width; found {:?}",
            t.dims()
        ));
    }
    if !t.dtype().is_float() {
        return Err(format!("{what} must be floats; found {:?}", t.dtype()));
    }
    t.to_dtype(DType::F32).map_err(|e| e.to_string())
}

/// The top-level dict of a `torch.save` archive's `data.pkl`, keys as strings (entries with other
/// keys are skipped).
fn read_pickle_dict(path: &Path) -> Result<Vec<(String, Object)>> {
    let file = std::fs::File::open(path)?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::model(e.to_string()))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| Error::model("the archive has no data.pkl"))?;
    let reader = zip
        .by_name(&name)
        .map_err(|e| Error::model(e.to_string()))?;
    let mut stack = Stack::empty();
    stack.read_loop(&mut std::io::BufReader::new(reader))?;
    match stack.finalize()? {
        Object::Dict(entries) => Ok(entries
            .into_iter()
            .filter_map(|(k, v)| match k {
                Object::Unicode(k) => Some((k, v)),
                _ => None,
            })
            .collect()),
        other => Err(Error::model(format!(
            "data.pkl holds {}, not a dict",
            match other {
                Object::List(_) => "a list",
                Object::Tuple(_) => "a tuple",
                Object::Reduce { .. } | Object::Build { .. } => "an object",
                _ => "a value",
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dims: &[usize]) -> Tensor {
        Tensor::ones(dims, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn layouts_are_recognised_from_names() {
        let one = |k: &str, dims: &[usize]| HashMap::from([(k.to_string(), t(dims))]);
        let e = TextualInversion::from_tensors(one("emb_params", &[2, 8]), None).unwrap();
        assert_eq!((e.format, e.len()), (EmbeddingFormat::A1111Safetensors, 2));
        let e = TextualInversion::from_tensors(one("<cat>", &[8]), None).unwrap();
        assert_eq!(e.format, EmbeddingFormat::Diffusers);
        assert_eq!((e.file_token.as_deref(), e.len()), (Some("<cat>"), 1));
        let pair = HashMap::from([
            ("clip_l".into(), t(&[2, 8])),
            ("clip_g".into(), t(&[2, 12])),
        ]);
        let e = TextualInversion::from_tensors(pair, None).unwrap();
        assert_eq!(e.format, EmbeddingFormat::SdxlPair);
        assert!(e.check_widths("x", &[8, 12]).is_ok());
        let err = e.check_widths("x", &[8]).unwrap_err().to_string();
        assert!(err.contains("one text encoder"), "{err}");
        let err = TextualInversion::from_tensors(one("clip_l", &[2, 8]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("both `clip_l` and `clip_g`"), "{err}");
        let two = HashMap::from([("a".into(), t(&[8])), ("b".into(), t(&[8]))]);
        let err = TextualInversion::from_tensors(two, None).unwrap_err();
        assert!(err.contains("found a, b"), "{err}");
        let err = TextualInversion::from_tensors(one("emb_params", &[76, 8]), None).unwrap_err();
        assert!(err.contains("1 to 75 vectors"), "{err}");
    }

    #[test]
    fn widths_are_checked() {
        let e = TextualInversion::from_tensors(
            HashMap::from([("emb_params".into(), t(&[1, 8]))]),
            None,
        )
        .unwrap();
        assert!(e.check_widths("x", &[8]).is_ok());
        let err = e.check_widths("x", &[12]).unwrap_err().to_string();
        assert!(err.contains("8-wide") && err.contains("12-wide"), "{err}");
        let err = e.check_widths("x", &[8, 12]).unwrap_err().to_string();
        assert!(err.contains("`clip_l` and `clip_g`"), "{err}");
    }
}
