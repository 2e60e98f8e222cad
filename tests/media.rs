//! Client images: every input form decodes, limits refuse before decoding, URLs to private or
//! loopback addresses are refused unless allowed, downloads are capped and bounded in time.
//! Network tests talk only to a server on 127.0.0.1 started here.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use image::{DynamicImage, GenericImageView, Rgb, RgbImage, Rgba, RgbaImage};
use sd_serve::api::media::{
    check_url, decode_base64, decode_bytes, decode_data_uri, encode_image, fetch_bytes, load_image,
    load_rgb, non_public_reason, ImageFormat, ImageInput, MediaError, MediaLimits,
};

fn test_image() -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(24, 16, |x, y| {
        Rgb([(x * 10) as u8, (y * 15) as u8, 128])
    }))
}

fn png_bytes() -> Vec<u8> {
    encode_image(&test_image(), ImageFormat::Png, None).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn encoded_formats_decode_back() {
    let original = test_image();
    for format in ImageFormat::ALL {
        let bytes = encode_image(&original, format, Some(95)).unwrap();
        assert_eq!(
            image::guess_format(&bytes).unwrap(),
            format.to_image_format(),
            "{format}"
        );
        let decoded = decode_bytes(&bytes, &MediaLimits::default()).unwrap();
        assert_eq!(decoded.dimensions(), (24, 16), "{format}");
        if format != ImageFormat::Jpeg {
            assert_eq!(
                decoded.to_rgb8(),
                original.to_rgb8(),
                "{format} is lossless"
            );
        }
    }
    // JPEG drops alpha; PNG keeps it.
    let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(4, 4, Rgba([1, 2, 3, 100])));
    let jpeg = encode_image(&rgba, ImageFormat::Jpeg, None).unwrap();
    assert!(!decode_bytes(&jpeg, &MediaLimits::default())
        .unwrap()
        .color()
        .has_alpha());
    let png = encode_image(&rgba, ImageFormat::Png, None).unwrap();
    assert_eq!(
        decode_bytes(&png, &MediaLimits::default())
            .unwrap()
            .to_rgba8(),
        rgba.to_rgba8()
    );
    // Lower JPEG quality gives a smaller file.
    let noisy = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 64, |x, y| {
        Rgb([
            ((x * 31) ^ (y * 17)) as u8,
            (x * y) as u8,
            (x + y * 7) as u8,
        ])
    }));
    let q20 = encode_image(&noisy, ImageFormat::Jpeg, Some(20)).unwrap();
    let q95 = encode_image(&noisy, ImageFormat::Jpeg, Some(95)).unwrap();
    assert!(q20.len() < q95.len(), "{} vs {}", q20.len(), q95.len());
}

#[test]
fn base64_and_data_uri_decode() {
    let limits = MediaLimits::default();
    let png = png_bytes();
    let plain = b64(&png);
    assert_eq!(
        decode_base64(&plain, &limits).unwrap().dimensions(),
        (24, 16)
    );

    // Line-wrapped, unpadded and URL-safe forms are accepted too.
    let wrapped: String = plain
        .as_bytes()
        .chunks(60)
        .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
        .collect();
    assert!(decode_base64(&wrapped, &limits).is_ok());
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&png);
    assert!(decode_base64(&url_safe, &limits).is_ok());

    let uri = format!("data:image/png;base64,{plain}");
    assert_eq!(
        decode_data_uri(&uri, &limits).unwrap().dimensions(),
        (24, 16)
    );
    // The declared type need not match the bytes: the content decides.
    let jpeg = encode_image(&test_image(), ImageFormat::Jpeg, None).unwrap();
    let uri = format!("DATA:image/webp;BASE64,{}", b64(&jpeg));
    assert!(decode_data_uri(&uri, &limits).is_ok());

    assert!(matches!(
        decode_data_uri(&format!("data:text/plain;base64,{plain}"), &limits),
        Err(MediaError::NotAnImage(_))
    ));
    assert!(matches!(
        decode_data_uri("data:image/png,rawbytes", &limits),
        Err(MediaError::BadBase64(_))
    ));
    assert!(matches!(
        decode_base64("this is *not* base64!", &limits),
        Err(MediaError::BadBase64(_))
    ));
    assert!(matches!(
        decode_base64("", &limits),
        Err(MediaError::BadBase64(_))
    ));
}

#[test]
fn client_strings_are_sorted_by_form() {
    assert!(matches!(
        ImageInput::from_client_string("data:image/png;base64,AAAA"),
        ImageInput::DataUri(_)
    ));
    assert!(matches!(
        ImageInput::from_client_string("https://example.com/a.png"),
        ImageInput::Url(_)
    ));
    assert!(matches!(
        ImageInput::from_client_string("file:///etc/passwd"),
        ImageInput::Url(_)
    ));
    assert!(matches!(
        ImageInput::from_client_string("iVBORw0KGgo="),
        ImageInput::Base64(_)
    ));
}

#[tokio::test]
async fn load_image_takes_every_inline_form() {
    let limits = MediaLimits::default();
    let png = png_bytes();
    for input in [
        ImageInput::Bytes(png.clone()),
        ImageInput::Base64(b64(&png)),
        ImageInput::DataUri(format!("data:image/png;base64,{}", b64(&png))),
    ] {
        let rgb = load_rgb(input, &limits).await.unwrap();
        assert_eq!(rgb.dimensions(), (24, 16));
        assert_eq!(rgb, test_image().to_rgb8());
    }
}

#[test]
fn corrupted_bytes_are_not_an_image() {
    let limits = MediaLimits::default();
    let png = png_bytes();
    for bad in [
        b"hello, world".to_vec(),
        Vec::new(),
        png[..png.len() / 2].to_vec(),
        {
            let mut p = png.clone();
            for b in &mut p[40..] {
                *b ^= 0x5a;
            }
            p
        },
    ] {
        let err = decode_bytes(&bad, &limits).unwrap_err();
        assert!(matches!(err, MediaError::NotAnImage(_)), "{err:?}");
        assert!(err.to_string().starts_with("not a readable"), "{err}");
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A valid PNG header declaring `width`x`height` 8-bit RGB, followed by a few bytes of "data".
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    // A zlib stream of a few zero bytes: nowhere near the declared size.
    png_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01],
    );
    png_chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn decompression_bomb_is_refused_before_decoding() {
    let limits = MediaLimits::default();
    let bomb = png_claiming(100_000, 100_000);
    assert!(bomb.len() < 100);
    let started = Instant::now();
    let err = decode_bytes(&bomb, &limits).unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooManyPixels {
                width: 100_000,
                height: 100_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("100000x100000"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // Within max_side but over max_pixels.
    let small = MediaLimits {
        max_pixels: 300,
        max_side: 4096,
        ..MediaLimits::default()
    };
    let err = decode_bytes(&png_bytes(), &small).unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooManyPixels {
                width: 24,
                height: 16,
                ..
            }
        ),
        "{err:?}"
    );
    // One side over max_side.
    assert!(matches!(
        decode_bytes(&png_claiming(5000, 2), &limits),
        Err(MediaError::TooManyPixels { width: 5000, .. })
    ));
}

#[test]
fn byte_cap_applies_before_decoding() {
    let png = png_bytes();
    let limits = MediaLimits {
        max_bytes: png.len() - 1,
        ..MediaLimits::default()
    };
    let err = decode_bytes(&png, &limits).unwrap_err();
    assert!(
        matches!(err, MediaError::TooLarge { limit, given } if limit == png.len() - 1 && given == png.len()),
        "{err:?}"
    );
    // Base64 is refused by its length before it is decoded.
    let limits = MediaLimits {
        max_bytes: 1000,
        ..MediaLimits::default()
    };
    let long = "A".repeat(1_000_000);
    assert!(matches!(
        decode_base64(&long, &limits),
        Err(MediaError::TooLarge { limit: 1000, .. })
    ));
    assert!(matches!(
        decode_data_uri(&format!("data:image/png;base64,{long}"), &limits),
        Err(MediaError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn private_and_loopback_urls_are_refused() {
    let limits = MediaLimits::default();
    for url in [
        "http://127.0.0.1/a.png",
        "http://127.1.2.3:8080/a.png",
        "http://localhost/a.png",
        "http://LOCALHOST./a.png",
        "http://api.localhost/a.png",
        "http://10.0.0.1/a.png",
        "http://172.16.5.4/a.png",
        "http://192.168.1.1/a.png",
        "http://[::1]/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://[::ffff:10.0.0.1]/a.png",
        "http://[::ffff:169.254.169.254]/a.png",
        "http://[::]/a.png",
        "http://[fc00::1]/a.png",
        "http://[fd12:3456::1]/a.png",
        "http://[fe80::1]/a.png",
        "http://100.64.0.1/a.png",
        "http://224.0.0.1/a.png",
        "http://[ff02::1]/a.png",
        "http://[64:ff9b::7f00:1]/a.png",
        "http://[2002:7f00:1::]/a.png",
        "http://2130706433/a.png",
        "http://0x7f.1/a.png",
    ] {
        let err = check_url(url, &limits).await.unwrap_err();
        assert!(
            matches!(err, MediaError::UrlRefused { .. }),
            "{url}: {err:?}"
        );
    }
    for url in [
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "gopher://example.com/",
        "not a url",
        "http://",
    ] {
        let err = check_url(url, &limits).await.unwrap_err();
        assert!(
            matches!(err, MediaError::UrlRefused { .. }),
            "{url}: {err:?}"
        );
    }
    // Refused before any connection is tried.
    let err = fetch_bytes("http://127.0.0.1:9/a.png", &limits)
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::UrlRefused { .. }), "{err:?}");

    // Public addresses pass the address check (no network needed for literals).
    for ip in [
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "172.32.0.1",
        "100.128.0.1",
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(non_public_reason(ip), None, "{ip}");
    }
    let checked = check_url("https://93.184.215.14/x.png", &limits)
        .await
        .unwrap();
    assert_eq!(checked.addrs[0].port(), 443);
}

/// A one-thread HTTP/1.1 server on 127.0.0.1 answering a few fixed paths.
struct TestServer {
    port: u16,
}

impl TestServer {
    fn start(png: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let png = png.clone();
                std::thread::spawn(move || serve(stream, port, &png));
            }
        });
        TestServer { port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn serve(mut stream: TcpStream, port: u16, png: &[u8]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let head = |status: &str, extra: &str| {
        format!("HTTP/1.1 {status}\r\nConnection: close\r\n{extra}\r\n")
    };
    let _ = match path.as_str() {
        "/img.png" => stream
            .write_all(
                head(
                    "200 OK",
                    &format!(
                        "Content-Type: image/png\r\nContent-Length: {}\r\n",
                        png.len()
                    ),
                )
                .as_bytes(),
            )
            .and_then(|_| stream.write_all(png)),
        "/redirect" => stream.write_all(
            head(
                "302 Found",
                &format!("Location: http://127.0.0.1:{port}/img.png\r\nContent-Length: 0\r\n"),
            )
            .as_bytes(),
        ),
        "/redirect-file" => stream.write_all(
            head(
                "302 Found",
                "Location: file:///etc/passwd\r\nContent-Length: 0\r\n",
            )
            .as_bytes(),
        ),
        "/loop" => stream
            .write_all(head("302 Found", "Location: /loop\r\nContent-Length: 0\r\n").as_bytes()),
        "/big-declared" => {
            stream.write_all(head("200 OK", "Content-Length: 1000000000\r\n").as_bytes())
        }
        "/big-streamed" => {
            // No Content-Length: the body runs until the connection closes; send 1 MiB at most.
            let mut r = stream.write_all(head("200 OK", "").as_bytes());
            for _ in 0..64 {
                r = r.and_then(|_| stream.write_all(&[7u8; 16 * 1024]));
                if r.is_err() {
                    break;
                }
            }
            r
        }
        "/slow" => {
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        }
        _ => stream.write_all(head("404 Not Found", "Content-Length: 0\r\n").as_bytes()),
    };
}

fn loopback_allowed() -> MediaLimits {
    MediaLimits {
        allow_private_urls: true,
        fetch_timeout: Duration::from_secs(5),
        ..MediaLimits::default()
    }
}

#[tokio::test]
async fn loopback_fetch_only_when_private_urls_allowed() {
    let png = png_bytes();
    let server = TestServer::start(png.clone());
    let url = server.url("/img.png");

    let err = load_image(ImageInput::Url(url.clone()), &MediaLimits::default())
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::UrlRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("loopback"), "{err}");

    let limits = loopback_allowed();
    assert_eq!(fetch_bytes(&url, &limits).await.unwrap(), png);
    let image = load_image(ImageInput::from_client_string(url), &limits)
        .await
        .unwrap();
    assert_eq!(image.to_rgb8(), test_image().to_rgb8());

    // A host name is resolved once and the request goes to the checked addresses.
    let by_name = format!("http://localhost:{}/img.png", server.port);
    let checked = check_url(&by_name, &limits).await.unwrap();
    assert!(checked.addrs.iter().all(|a| a.ip().is_loopback()));
    assert_eq!(fetch_bytes(&by_name, &limits).await.unwrap(), png);

    // Redirects are followed, and each hop is checked again.
    assert_eq!(
        fetch_bytes(&server.url("/redirect"), &limits)
            .await
            .unwrap(),
        png
    );
    let err = fetch_bytes(&server.url("/redirect-file"), &limits)
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::UrlRefused { .. }), "{err:?}");
    let err = fetch_bytes(&server.url("/loop"), &limits)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MediaError::Fetch(m) if m.contains("redirects")),
        "{err:?}"
    );
    let err = fetch_bytes(&server.url("/missing"), &limits)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MediaError::Fetch(m) if m.contains("404")),
        "{err:?}"
    );
}

#[tokio::test]
async fn download_over_the_cap_is_cut_off() {
    let server = TestServer::start(png_bytes());
    let limits = MediaLimits {
        max_bytes: 100_000,
        ..loopback_allowed()
    };
    let err = fetch_bytes(&server.url("/big-declared"), &limits)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::TooLarge {
                limit: 100_000,
                given: 1_000_000_000
            }
        ),
        "{err:?}"
    );
    let err = fetch_bytes(&server.url("/big-streamed"), &limits)
        .await
        .unwrap_err();
    match err {
        MediaError::TooLarge { limit, given } => {
            assert_eq!(limit, 100_000);
            // Cut off at the first chunk that crosses the cap, long before the 1 MiB body ends.
            assert!(given > 100_000 && given < 1024 * 1024, "{given}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn slow_server_times_out() {
    let server = TestServer::start(png_bytes());
    let limits = MediaLimits {
        fetch_timeout: Duration::from_millis(300),
        ..loopback_allowed()
    };
    let started = Instant::now();
    let err = fetch_bytes(&server.url("/slow"), &limits)
        .await
        .unwrap_err();
    assert!(matches!(err, MediaError::Fetch(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
