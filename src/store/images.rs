//! Image files: generated ids, atomic writes, lookup by id.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::{params, OptionalExtension};
use uuid::Uuid;

use super::{from_millis, to_millis, Result, Store, StoreError};

/// Prefix of files being written; a name with it is never a finished image.
const TEMP_PREFIX: &str = ".tmp-";

/// The encodings an image is stored and served in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub const ALL: [ImageFormat; 3] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp];

    /// Parses a format name as dialects send it: `png`, `jpg`/`jpeg`, `webp` (any case).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "png" => Some(ImageFormat::Png),
            "jpg" | "jpeg" => Some(ImageFormat::Jpeg),
            "webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }

    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The HTTP `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// The `image` crate's name for this format.
    pub fn to_image_format(self) -> image::ImageFormat {
        match self {
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
            ImageFormat::Webp => image::ImageFormat::WebP,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The id of a stored image: a random (v4) UUID, shown in its hyphenated lower-case form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageId(Uuid);

impl ImageId {
    /// A fresh random id.
    pub fn new() -> Self {
        ImageId(Uuid::new_v4())
    }

    /// Accepts only the hyphenated UUID form (`8-4-4-4-12` hex digits, any case); anything else
    /// (paths, dots, braces, URNs, the empty string) is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        let well_formed = b.len() == 36
            && b.iter().enumerate().all(|(i, &c)| match i {
                8 | 13 | 18 | 23 => c == b'-',
                _ => c.is_ascii_hexdigit(),
            });
        if !well_formed {
            return None;
        }
        Uuid::try_parse(s).ok().map(ImageId)
    }

    /// Parses a file name as served in URLs, `<uuid>.<ext>`, into the id and the format its
    /// extension names. Callers compare the format with the stored one.
    pub fn parse_file_name(name: &str) -> Option<(Self, ImageFormat)> {
        let (id, ext) = name.split_once('.')?;
        Some((ImageId::parse(id)?, ImageFormat::parse(ext)?))
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// `<uuid>.<ext>`, built from the parsed id only.
    pub fn file_name(&self, format: ImageFormat) -> String {
        format!("{}.{}", self.0.hyphenated(), format.extension())
    }
}

impl Default for ImageId {
    fn default() -> Self {
        ImageId::new()
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

/// A stored image as [`Store::image`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub content_type: &'static str,
    pub expires_at: Option<SystemTime>,
}

impl Store {
    /// Stores an encoded image under a new id: writes a temp file, fsyncs it, renames it into
    /// place, fsyncs the directory, then records it. When this returns, the image survives a crash.
    pub fn put_image(
        &self,
        bytes: &[u8],
        format: ImageFormat,
        expires_at: Option<SystemTime>,
    ) -> Result<ImageId> {
        let id = ImageId::new();
        let final_path = self.images_dir.join(id.file_name(format));
        let temp_path = self
            .images_dir
            .join(format!("{TEMP_PREFIX}{}", id.file_name(format)));
        write_durably(&temp_path, &final_path, bytes)?;

        let now = to_millis(SystemTime::now());
        let recorded = self.db().execute(
            "INSERT INTO images (id, format, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                id.to_string(),
                format.as_str(),
                now,
                expires_at.map(to_millis)
            ],
        );
        if let Err(e) = recorded {
            let _ = fs::remove_file(&final_path);
            return Err(e.into());
        }
        Ok(id)
    }

    /// Finds a stored, unexpired image by the id a client sent. Anything that is not a
    /// hyphenated UUID is simply not found; the path is built from the parsed id, never from `id`.
    pub fn image(&self, id: &str) -> Result<Option<StoredImage>> {
        let Some(id) = ImageId::parse(id) else {
            return Ok(None);
        };
        self.image_by_id(id)
    }

    /// As [`Store::image`], for an id already parsed.
    pub fn image_by_id(&self, id: ImageId) -> Result<Option<StoredImage>> {
        let row: Option<(String, Option<i64>)> = self
            .db()
            .query_row(
                "SELECT format, expires_at FROM images WHERE id = ?1",
                [id.to_string()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((format, expires_at)) = row else {
            return Ok(None);
        };
        let format = ImageFormat::parse(&format)
            .ok_or_else(|| StoreError::Corrupt(format!("image {id} has format `{format}`")))?;
        let expires_at = expires_at.map(from_millis);
        if expires_at.is_some_and(|t| t <= SystemTime::now()) {
            return Ok(None);
        }
        Ok(Some(StoredImage {
            path: self.images_dir.join(id.file_name(format)),
            format,
            content_type: format.content_type(),
            expires_at,
        }))
    }
}

fn write_durably(temp_path: &Path, final_path: &Path, bytes: &[u8]) -> Result<()> {
    let written = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(temp_path)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(temp_path, final_path)?;
        sync_dir(
            final_path
                .parent()
                .expect("an image path has a parent, this is a bug"),
        )
    })();
    if written.is_err() {
        let _ = fs::remove_file(temp_path);
    }
    Ok(written?)
}

/// Makes a rename in `dir` durable (a no-op where directories cannot be opened, as on Windows).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    if cfg!(unix) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub(super) fn remove_stale_temp_files(images_dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(images_dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
