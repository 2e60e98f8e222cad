//! OpenCV's 8-bit resize as the preprocessors use it, against `cv2.resize` (manifest
//! `cv_resize`): linear, Lanczos and area interpolation at sizes that take each code path
//! (fractional and whole-pixel reductions, enlargements, area enlargement on one axis).

mod common;

use image::RgbImage;
use sd_serve::preprocess::resize::{resize_rgb, Interpolation};

use common::{fixtures, load_goldens, manifest};

#[test]
fn resize_matches_opencv_bit_for_bit() {
    let manifest = manifest();
    let spec = &manifest["cv_resize"];
    let golden = load_goldens(spec["file"].as_str().unwrap());
    let full = image::open(fixtures().join(spec["image"].as_str().unwrap()))
        .unwrap()
        .to_rgb8();
    let crop_size = spec["crop"].as_array().unwrap();
    let (ch, cw) = (
        crop_size[0].as_u64().unwrap() as u32,
        crop_size[1].as_u64().unwrap() as u32,
    );
    let crop = image::imageops::crop_imm(&full, 0, 0, cw, ch).to_image();
    let cases = spec["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let key = case["key"].as_str().unwrap();
        let source: &RgbImage = match case["source"].as_str().unwrap() {
            "crop" => &crop,
            _ => &full,
        };
        let mode = match case["mode"].as_str().unwrap() {
            "linear" => Interpolation::Linear,
            "area" => Interpolation::Area,
            "lanczos4" => Interpolation::Lanczos4,
            other => panic!("mode {other}"),
        };
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let ours = resize_rgb(source, w, h, mode);
        let expected = &golden[key];
        assert_eq!(expected.dims(), &[h as usize, w as usize, 3], "{key}");
        let expected: Vec<u8> = expected.flatten_all().unwrap().to_vec1().unwrap();
        let differing = ours
            .as_raw()
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        // Same fixed-point coefficients and rounding as OpenCV: every byte equal.
        assert_eq!(differing, 0, "{key}: {differing} bytes differ");
    }
}
