//! The one way client images come in and generated images go out.
//!
//! Every image a client sends (a multipart upload, bare base64, a `data:` URI or a URL) becomes a
//! [`DynamicImage`] here, under one set of [`MediaLimits`]: the byte cap is checked before
//! decoding (and while a download streams), the dimensions are read from the header and checked
//! before any pixel is decoded, so a small file claiming a huge canvas is refused cheaply.
//!
//! URL fetches accept http and https only, resolve the host once, refuse loopback, private,
//! link-local, CGNAT, multicast and unspecified addresses (also in their IPv4-mapped forms) unless
//! [`MediaLimits::allow_private_urls`] is set, then connect to exactly the checked addresses, so a
//! second DNS answer cannot redirect the request. Redirects are followed by hand, each hop checked
//! the same way. [`send`] POSTs or PUTs to webhooks and upload endpoints under the same checks.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

pub use crate::store::ImageFormat;
pub use reqwest::Url;

/// Limits on client images. `Default` gives 20 MiB, 4096x4096, no private URLs, 30 s.
#[derive(Debug, Clone)]
pub struct MediaLimits {
    /// Largest encoded image, in bytes (after base64 decoding; also caps downloads).
    pub max_bytes: usize,
    /// Largest `width * height`.
    pub max_pixels: u64,
    /// Largest width or height.
    pub max_side: u32,
    /// Allow URLs whose host resolves to a loopback/private/link-local address (for deployments
    /// that fetch from their own network, and tests).
    pub allow_private_urls: bool,
    /// Whole-fetch time limit: DNS, connect, headers and body.
    pub fetch_timeout: Duration,
}

impl Default for MediaLimits {
    fn default() -> Self {
        MediaLimits {
            max_bytes: 20 * 1024 * 1024,
            max_pixels: 4096 * 4096,
            max_side: 4096,
            allow_private_urls: false,
            fetch_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a client image was not accepted; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// `given` is the declared or received size; for a download cut off mid-stream it is the
    /// number of bytes seen when the cap was crossed.
    #[error("image data is {given} bytes or more; the limit is {limit} bytes")]
    TooLarge { limit: usize, given: usize },
    #[error(
        "image is {width}x{height}; the limit is {max_side} pixels on a side and {max_pixels} pixels in all"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        max_side: u32,
        max_pixels: u64,
    },
    #[error("not a readable PNG, JPEG or WebP image: {0}")]
    NotAnImage(String),
    #[error("invalid base64 image data: {0}")]
    BadBase64(String),
    #[error("URL refused: {reason}")]
    UrlRefused { reason: String },
    #[error("fetching the image URL failed: {0}")]
    Fetch(String),
    #[error("encoding the image failed: {0}")]
    Encode(String),
}

pub type Result<T> = std::result::Result<T, MediaError>;

/// A client image as it arrived, before decoding.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// Raw file bytes (a multipart upload).
    Bytes(Vec<u8>),
    /// Base64 without a prefix.
    Base64(String),
    /// `data:image/png;base64,...`
    DataUri(String),
    /// `http://` or `https://`.
    Url(String),
}

impl ImageInput {
    /// Sorts a string field the way the dialects accept images in JSON: a `data:` URI, a URL
    /// (anything with `://`, which base64 never contains; schemes other than http(s) are refused
    /// when fetched), otherwise base64.
    pub fn from_client_string(s: impl Into<String>) -> Self {
        let s = s.into();
        let head = s.trim_start();
        if head
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("data:"))
        {
            ImageInput::DataUri(s)
        } else if head.contains("://") {
            ImageInput::Url(s)
        } else {
            ImageInput::Base64(s)
        }
    }
}

/// Turns any client image into a decoded image. Fetching is async; decoding runs on the blocking
/// pool so a large image does not stall the runtime.
pub async fn load_image(input: ImageInput, limits: &MediaLimits) -> Result<DynamicImage> {
    let owned = limits.clone();
    match input {
        ImageInput::Url(url) => {
            let bytes = fetch_bytes(&url, limits).await?;
            run_blocking(move || decode_bytes(&bytes, &owned)).await
        }
        ImageInput::Bytes(bytes) => run_blocking(move || decode_bytes(&bytes, &owned)).await,
        ImageInput::Base64(s) => run_blocking(move || decode_base64(&s, &owned)).await,
        ImageInput::DataUri(s) => run_blocking(move || decode_data_uri(&s, &owned)).await,
    }
}

/// [`load_image`] as 8-bit RGB, the pipeline's input format (alpha is dropped).
pub async fn load_rgb(input: ImageInput, limits: &MediaLimits) -> Result<RgbImage> {
    Ok(load_image(input, limits).await?.to_rgb8())
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MediaError::NotAnImage(format!("decoder stopped: {e}")))?
}

/// Decodes an encoded PNG, JPEG or WebP, refusing it by size before reading it and by its header
/// dimensions before decoding pixels. EXIF orientation is applied.
pub fn decode_bytes(bytes: &[u8], limits: &MediaLimits) -> Result<DynamicImage> {
    if bytes.len() > limits.max_bytes {
        return Err(MediaError::TooLarge {
            limit: limits.max_bytes,
            given: bytes.len(),
        });
    }
    if bytes.is_empty() {
        return Err(MediaError::NotAnImage("the image data is empty".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .expect("reading from memory cannot fail, this is a bug");
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        Some(other) => {
            return Err(MediaError::NotAnImage(format!(
                "{other:?} images are not accepted"
            )))
        }
        None => {
            return Err(MediaError::NotAnImage(
                "the data is not in a recognised image format".into(),
            ))
        }
    }
    // Our own dimension check below gives the better message; this bounds what the decoder may
    // allocate even so (16-bit RGBA is the widest layout).
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(decoder_limits);

    let mut decoder = reader.into_decoder().map_err(not_an_image)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    let orientation = decoder.orientation().map_err(not_an_image)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(not_an_image)?;
    image.apply_orientation(orientation);
    Ok(image)
}

fn check_dimensions(width: u32, height: u32, limits: &MediaLimits) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(MediaError::NotAnImage(format!(
            "the image is {width}x{height}"
        )));
    }
    if width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(MediaError::TooManyPixels {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

fn not_an_image(e: image::ImageError) -> MediaError {
    MediaError::NotAnImage(e.to_string())
}

/// Decodes base64 (standard or URL-safe alphabet, padding optional, whitespace ignored), then the
/// image. The decoded size is estimated and checked before decoding.
pub fn decode_base64(s: &str, limits: &MediaLimits) -> Result<DynamicImage> {
    let bytes = base64_bytes(s, limits.max_bytes)?;
    decode_bytes(&bytes, limits)
}

/// Decodes `data:<media type>[;params];base64,<data>` with an `image/*` (or empty) media type.
pub fn decode_data_uri(s: &str, limits: &MediaLimits) -> Result<DynamicImage> {
    let s = s.trim();
    let rest = s
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("data:"))
        .map(|_| &s[5..])
        .ok_or_else(|| MediaError::BadBase64("a data URI starts with `data:`".into()))?;
    let (header, data) = rest
        .split_once(',')
        .ok_or_else(|| MediaError::BadBase64("the data URI has no `,` before its data".into()))?;
    let mut parts = header.split(';');
    let media_type = parts.next().unwrap_or("").trim();
    if !media_type.is_empty() && !media_type.to_ascii_lowercase().starts_with("image/") {
        return Err(MediaError::NotAnImage(format!(
            "the data URI's media type is `{media_type}`, not an image type"
        )));
    }
    if !parts.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(MediaError::BadBase64(
            "the data URI must be base64-encoded (`;base64,`)".into(),
        ));
    }
    decode_base64(data, limits)
}

fn base64_bytes(s: &str, max_bytes: usize) -> Result<Vec<u8>> {
    // Refuse by the length of the text before allocating the decoded bytes.
    let estimated = s.bytes().filter(|b| !b.is_ascii_whitespace()).count() / 4 * 3;
    if estimated > max_bytes.saturating_add(3) {
        return Err(MediaError::TooLarge {
            limit: max_bytes,
            given: estimated,
        });
    }
    let compact: String;
    let text = if s.bytes().any(|b| b.is_ascii_whitespace()) {
        compact = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        compact.as_str()
    } else {
        s
    };
    if text.is_empty() {
        return Err(MediaError::BadBase64("the string is empty".into()));
    }
    let config = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let alphabet = if text.contains(['-', '_']) {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    let bytes = base64::engine::GeneralPurpose::new(alphabet, config)
        .decode(text)
        .map_err(|e| MediaError::BadBase64(e.to_string()))?;
    if bytes.len() > max_bytes {
        return Err(MediaError::TooLarge {
            limit: max_bytes,
            given: bytes.len(),
        });
    }
    Ok(bytes)
}

/// Encodes a generated image. `quality` (1..=100, default 90) applies to JPEG; PNG and WebP are
/// written lossless (the pure-Rust WebP encoder has no lossy mode) and ignore it. JPEG drops alpha.
pub fn encode_image(
    image: &DynamicImage,
    format: ImageFormat,
    quality: Option<u8>,
) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    let encoded = match format {
        ImageFormat::Png => to_rgb_or_rgba(image).write_to(&mut out, image::ImageFormat::Png),
        ImageFormat::Webp => to_rgb_or_rgba(image).write_to(&mut out, image::ImageFormat::WebP),
        ImageFormat::Jpeg => {
            let quality = quality.unwrap_or(90).clamp(1, 100);
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
            DynamicImage::ImageRgb8(image.to_rgb8()).write_with_encoder(encoder)
        }
    };
    encoded.map_err(|e| MediaError::Encode(e.to_string()))?;
    Ok(out.into_inner())
}

/// PNG and WebP encoders take 8-bit RGB or RGBA only.
fn to_rgb_or_rgba(image: &DynamicImage) -> DynamicImage {
    match image {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => image.clone(),
        other if other.color().has_alpha() => DynamicImage::ImageRgba8(other.to_rgba8()),
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    }
}

// ---------------------------------------------------------------------------------------------
// URLs

/// Most redirects followed, each one checked like the first URL.
pub const MAX_REDIRECTS: usize = 5;

/// A URL that passed [`check_url`], with the addresses it may be fetched from.
#[derive(Debug, Clone)]
pub struct CheckedUrl {
    pub url: Url,
    /// The resolved and accepted addresses; the fetch connects to these and no others.
    pub addrs: Vec<SocketAddr>,
}

/// Why an address may not be fetched from, or `None` for a public unicast address. IPv4-mapped,
/// IPv4-compatible, NAT64 and 6to4 IPv6 forms are judged by the IPv4 address they carry.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("an unspecified (0.0.0.0/8) address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() {
        Some("a private-network address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if a == 100 && (b & 0xc0) == 64 {
        Some("a carrier-grade NAT (100.64.0.0/10) address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() || a >= 240 {
        Some("a reserved address")
    } else if (a == 192 && b == 0 && c == 0) || (a == 198 && (b & 0xfe) == 18) {
        Some("a special-purpose address")
    } else {
        None
    }
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    // ::a.b.c.d (deprecated IPv4-compatible) and 64:ff9b::a.b.c.d (NAT64) reach the IPv4 address.
    if seg[..6] == [0; 6] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        );
        return non_public_v4(v4);
    }
    // 6to4 (2002::/16) embeds the IPv4 address of its relay endpoint.
    if seg[0] == 0x2002 {
        let v4 = Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        );
        return non_public_v4(v4);
    }
    if (seg[0] & 0xfe00) == 0xfc00 {
        Some("a unique-local (fc00::/7) address")
    } else if (seg[0] & 0xffc0) == 0xfe80 {
        Some("a link-local address")
    } else if (seg[0] & 0xffc0) == 0xfec0 {
        Some("a site-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

fn refused(reason: impl Into<String>) -> MediaError {
    MediaError::UrlRefused {
        reason: reason.into(),
    }
}

/// Parses and checks a URL a client gave (for an image, a webhook or an upload endpoint):
/// http/https only, a host that resolves within the fetch timeout, and, unless
/// `allow_private_urls`, only public addresses (one non-public address refuses the URL).
pub async fn check_url(url: &str, limits: &MediaLimits) -> Result<CheckedUrl> {
    let url = Url::parse(url.trim()).map_err(|e| refused(format!("not a valid URL: {e}")))?;
    check_parsed_url(url, limits).await
}

async fn check_parsed_url(url: Url, limits: &MediaLimits) -> Result<CheckedUrl> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refused(format!(
            "scheme `{}` is not allowed; use http or https",
            url.scheme()
        )));
    }
    let port = url
        .port_or_known_default()
        .expect("http and https have default ports, this is a bug");
    let ips: Vec<IpAddr> = match url.host() {
        None => return Err(refused("the URL has no host")),
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(domain)) => {
            let name = domain.trim_end_matches('.').to_ascii_lowercase();
            if !limits.allow_private_urls && (name == "localhost" || name.ends_with(".localhost")) {
                return Err(refused(format!("host `{domain}` is a loopback name")));
            }
            let lookup = tokio::net::lookup_host((name.as_str(), port));
            let found = tokio::time::timeout(limits.fetch_timeout, lookup)
                .await
                .map_err(|_| MediaError::Fetch(format!("resolving `{domain}` timed out")))?
                .map_err(|e| MediaError::Fetch(format!("cannot resolve `{domain}`: {e}")))?;
            let mut ips: Vec<IpAddr> = found.map(|a| a.ip()).collect();
            ips.dedup();
            if ips.is_empty() {
                return Err(MediaError::Fetch(format!("`{domain}` has no address")));
            }
            ips
        }
    };
    if !limits.allow_private_urls {
        for ip in &ips {
            if let Some(why) = non_public_reason(*ip) {
                return Err(refused(format!(
                    "host `{}` resolves to {ip}, {why}",
                    url.host_str().unwrap_or_default()
                )));
            }
        }
    }
    let addrs = ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    Ok(CheckedUrl { url, addrs })
}

/// Downloads a client URL under `limits`: checked and pinned addresses, no proxy, redirects
/// followed by hand (at most [`MAX_REDIRECTS`], each re-checked), a time limit over the whole
/// fetch and a byte cap enforced from `Content-Length` and while the body streams.
pub async fn fetch_bytes(url: &str, limits: &MediaLimits) -> Result<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + limits.fetch_timeout;
    tokio::time::timeout_at(deadline, fetch_following_redirects(url, limits))
        .await
        .map_err(|_| {
            MediaError::Fetch(format!(
                "no complete answer within {} s",
                limits.fetch_timeout.as_secs_f32()
            ))
        })?
}

async fn fetch_following_redirects(url: &str, limits: &MediaLimits) -> Result<Vec<u8>> {
    let mut checked = check_url(url, limits).await?;
    for _ in 0..=MAX_REDIRECTS {
        let mut response = pinned_get(&checked, limits).await?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    MediaError::Fetch(format!("HTTP {status} without a usable Location"))
                })?;
            let next = checked
                .url
                .join(location)
                .map_err(|e| refused(format!("redirect to an invalid URL: {e}")))?;
            checked = check_parsed_url(next, limits).await?;
            continue;
        }
        if !status.is_success() {
            return Err(MediaError::Fetch(format!(
                "the server answered HTTP {status}"
            )));
        }
        if let Some(len) = response.content_length() {
            if len > limits.max_bytes as u64 {
                return Err(MediaError::TooLarge {
                    limit: limits.max_bytes,
                    given: usize::try_from(len).unwrap_or(usize::MAX),
                });
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| MediaError::Fetch(format!("reading the body: {e}")))?
        {
            if body.len() + chunk.len() > limits.max_bytes {
                return Err(MediaError::TooLarge {
                    limit: limits.max_bytes,
                    given: body.len() + chunk.len(),
                });
            }
            body.extend_from_slice(&chunk);
        }
        return Ok(body);
    }
    Err(MediaError::Fetch(format!(
        "more than {MAX_REDIRECTS} redirects"
    )))
}

/// Sends `body` to a client URL (a webhook POST, an upload-endpoint PUT) under `limits`: the
/// URL is checked like an image URL and the connection pinned to the checked addresses;
/// redirects are not followed (a body is never re-sent elsewhere); the whole exchange has the
/// fetch time limit. Returns the HTTP status, failing on anything but 2xx.
pub async fn send(
    method: reqwest::Method,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
    limits: &MediaLimits,
) -> Result<u16> {
    let deadline = tokio::time::Instant::now() + limits.fetch_timeout;
    let exchange = async {
        let checked = check_url(url, limits).await?;
        let client = pinned_client(&checked, limits)?;
        let response = client
            .request(method, checked.url.clone())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| MediaError::Fetch(describe_reqwest_error(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(MediaError::Fetch(format!(
                "the server answered HTTP {status}"
            )));
        }
        Ok(status.as_u16())
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| {
            MediaError::Fetch(format!(
                "no answer within {} s",
                limits.fetch_timeout.as_secs_f32()
            ))
        })?
}

/// A client that can only connect to the checked addresses and follows no redirect.
fn pinned_client(checked: &CheckedUrl, limits: &MediaLimits) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(limits.fetch_timeout)
        .user_agent(concat!("sd-serve/", env!("CARGO_PKG_VERSION")));
    if let Some(url::Host::Domain(domain)) = checked.url.host() {
        builder = builder.resolve_to_addrs(domain, &checked.addrs);
    }
    builder
        .build()
        .map_err(|e| MediaError::Fetch(format!("HTTP client: {e}")))
}

/// One GET that can only connect to the checked addresses.
async fn pinned_get(checked: &CheckedUrl, limits: &MediaLimits) -> Result<reqwest::Response> {
    pinned_client(checked, limits)?
        .get(checked.url.clone())
        .send()
        .await
        .map_err(|e| MediaError::Fetch(describe_reqwest_error(&e)))
}

fn describe_reqwest_error(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
