//! Conversions between RGB images and the VAE's pixel tensors.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// An RGB image as a `[1, 3, H, W]` tensor in -1..1 (diffusers' `VaeImageProcessor.preprocess`),
/// resized (Lanczos) to `width` x `height` first when its size differs.
pub fn image_to_tensor(
    image: &image::RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    Ok(image_to_unit_tensor(image, width, height, device)?.affine(2.0, -1.0)?)
}

/// An RGB image as a `[1, 3, H, W]` tensor in 0..1 (diffusers' control image processor, which
/// does not normalise), resized (Lanczos) to `width` x `height` first when its size differs.
pub fn image_to_unit_tensor(
    image: &image::RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let resized;
    let image = if image.width() as usize != width || image.height() as usize != height {
        resized = image::imageops::resize(
            image,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        );
        &resized
    } else {
        image
    };
    let data: Vec<f32> = image.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let t = Tensor::from_vec(data, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
    Ok(t)
}

/// The VAE's output `[N, 3, H, W]` (about -1..1) as float images `[N, H, W, 3]` in 0..1,
/// diffusers' `output_type="np"`.
pub fn decoded_to_unit(decoded: &Tensor) -> Result<Tensor> {
    let images = ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    Ok(images.permute((0, 2, 3, 1))?.contiguous()?)
}

/// Float images `[N, H, W, 3]` in 0..1 to 8-bit RGB, rounding as diffusers' `numpy_to_pil`.
pub fn unit_to_rgb(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (n, h, w, c) = images.dims4()?;
    if c != 3 {
        return Err(Error::Image(format!("expected 3 channels, got {c}")));
    }
    let bytes = (images.to_device(&Device::Cpu)?.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?;
    (0..n)
        .map(|i| {
            let data = bytes.get(i)?.flatten_all()?.to_vec1::<u8>()?;
            image::RgbImage::from_raw(w as u32, h as u32, data)
                .ok_or_else(|| Error::Image("decoded buffer has the wrong size".into()))
        })
        .collect()
}

/// 8-bit RGB images of one size to float images `[N, H, W, 3]` in 0..1.
pub fn rgb_to_unit(images: &[image::RgbImage], device: &Device) -> Result<Tensor> {
    let first = images
        .first()
        .ok_or_else(|| Error::Image("no image to convert".into()))?;
    let (w, h) = first.dimensions();
    let mut data = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for image in images {
        if image.dimensions() != (w, h) {
            return Err(Error::Image("images of one batch differ in size".into()));
        }
        data.extend(image.as_raw().iter().map(|&v| v as f32 / 255.0));
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), h as usize, w as usize, 3),
        device,
    )?)
}
