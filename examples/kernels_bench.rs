//! Times the CPU kernels of `sd_serve::models::cpu` against candle's own on the shapes of an
//! SD1.5 UNet at 512x512 (first level, classifier-free guidance batch of 2), in GFLOP/s, then
//! the layers of the VAE decoder at each of its four resolutions (512x512 image).
//!
//!     cargo run --release --example kernels_bench
//!     RAYON_NUM_THREADS=1 cargo run --release --example kernels_bench
//!     SD_SERVE_CPU_KERNELS=0 cargo run --release --example kernels_bench  # attention: candle

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 320, 64, 64), &dev)?;
    let w = (Tensor::randn(0f32, 1.0, (320, 320, 3, 3), &dev)? * 0.02)?;
    let b = Tensor::zeros(320, candle_core::DType::F32, &dev)?;
    let flops = 2.0 * 2.0 * 320.0 * 320.0 * 9.0 * 64.0 * 64.0;
    for _ in 0..2 {
        let t = Instant::now();
        let _ = x.conv2d(&w, 1, 1, 1, 1)?;
        let s = t.elapsed().as_secs_f64();
        println!("candle conv {:.3}s {:.1} GFLOP/s", s, flops / s / 1e9);
        let t = Instant::now();
        let _ = conv(&x, &w, &b)?;
        let s = t.elapsed().as_secs_f64();
        println!("ours conv {:.3}s {:.1} GFLOP/s", s, flops / s / 1e9);
    }
    let a = Tensor::randn(0f32, 1.0, (8192, 320), &dev)?;
    let m = Tensor::randn(0f32, 1.0, (320, 2880), &dev)?;
    let t = Instant::now();
    let _ = a.matmul(&m)?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "matmul 8192x320x2880 {:.3}s {:.1} GFLOP/s",
        s,
        2.0 * 8192.0 * 320.0 * 2880.0 / s / 1e9
    );
    let q = Tensor::randn(0f32, 1.0, (2, 4096, 8, 40), &dev)?;
    let flops = 2.0 * 2.0 * 2.0 * 8.0 * 4096.0 * 4096.0 * 40.0;
    for _ in 0..2 {
        let t = Instant::now();
        let _ = sd_serve::models::layers::scaled_dot_product_attention(
            &q,
            &q,
            &q,
            0.15,
            sd_serve::models::layers::AttentionPrecision::Softmax,
            None,
        )?;
        let s = t.elapsed().as_secs_f64();
        println!("attention {:.3}s {:.1} GFLOP/s", s, flops / s / 1e9);
    }
    unet_levels(&dev)?;
    vae_levels(&dev)
}

/// The UNet's 3x3 convolution and token projection (to_q) at each level of a 512x512 step with
/// guidance (batch 2).
fn unet_levels(dev: &Device) -> anyhow::Result<()> {
    for (c, h) in [(320usize, 64usize), (640, 32), (1280, 16), (1280, 8)] {
        let x = Tensor::randn(0f32, 1.0, (2, c, h, h), dev)?;
        let w = (Tensor::randn(0f32, 1.0, (c, c, 3, 3), dev)? * 0.02)?;
        let b = Tensor::zeros(c, candle_core::DType::F32, dev)?;
        let flops = 2.0 * (2 * c * c * 9 * h * h) as f64;
        let s = best_of_two(|| {
            conv(&x, &w, &b)?;
            Ok(())
        })?;
        println!(
            "unet conv {c}x{h}^2 {:.1} ms {:.1} GFLOP/s",
            s * 1e3,
            flops / s / 1e9
        );
        let tokens = Tensor::randn(0f32, 1.0, (2, h * h, c), dev)?;
        let lw = (Tensor::randn(0f32, 1.0, (c, c), dev)? * 0.02)?;
        let lin = candle_nn::Linear::new(lw.clone(), None);
        let flops = 2.0 * (2 * h * h * c * c) as f64;
        let s = best_of_two(|| {
            candle_nn::Module::forward(&lin, &tokens)?;
            Ok(())
        })?;
        println!(
            "  candle linear {:.1} ms {:.1} GFLOP/s",
            s * 1e3,
            flops / s / 1e9
        );
        let s = best_of_two(|| {
            sd_serve::models::cpu::linear(&tokens, &lw, None)?;
            Ok(())
        })?;
        println!(
            "  ours linear {:.1} ms {:.1} GFLOP/s",
            s * 1e3,
            flops / s / 1e9
        );
    }
    Ok(())
}

/// sd-serve's kernel for a 3x3 stride-1 convolution with padding 1.
fn conv(x: &Tensor, w: &Tensor, b: &Tensor) -> anyhow::Result<Tensor> {
    sd_serve::models::cpu::conv2d(x, w, b, 1, 1)?
        .ok_or_else(|| anyhow::anyhow!("the CPU kernels are off (SD_SERVE_CPU_KERNELS=0)"))
}

/// Best of two runs of `f`, in seconds.
fn best_of_two(mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The decoder's 3x3 convolution, GroupNorm + SiLU, nearest 2x upsampling and residual add at
/// each level (channels, side) of a 512x512 decode.
fn vae_levels(dev: &Device) -> anyhow::Result<()> {
    for (c, h) in [(512usize, 64usize), (512, 128), (256, 256), (128, 512)] {
        let x = Tensor::randn(0f32, 1.0, (1, c, h, h), dev)?;
        let w = (Tensor::randn(0f32, 1.0, (c, c, 3, 3), dev)? * 0.02)?;
        let b = Tensor::zeros(c, candle_core::DType::F32, dev)?;
        let flops = 2.0 * (c * c * 9 * h * h) as f64;
        let s = best_of_two(|| {
            conv(&x, &w, &b)?;
            Ok(())
        })?;
        println!("vae conv {c}x{h}^2 {s:.3}s {:.1} GFLOP/s", flops / s / 1e9);
        let gw = Tensor::ones(c, candle_core::DType::F32, dev)?;
        let s = best_of_two(|| {
            sd_serve::models::cpu::group_norm(&x, 32, 1e-6, &gw, &b, true)?;
            Ok(())
        })?;
        println!("  gn+silu {:.1} ms", s * 1e3);
        let s = best_of_two(|| {
            x.upsample_nearest2d(2 * h, 2 * h)?;
            Ok(())
        })?;
        println!("  upsample {:.1} ms", s * 1e3);
        let s = best_of_two(|| {
            (&x + &x)?;
            Ok(())
        })?;
        println!("  add {:.1} ms", s * 1e3);
    }
    Ok(())
}
