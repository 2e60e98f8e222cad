//! Times the CPU kernels of `sd_serve::models::cpu` against candle's own on the shapes of an
//! SD1.5 UNet at 512x512 (first level, classifier-free guidance batch of 2), in GFLOP/s.
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
        let _ = sd_serve::models::cpu::conv2d_stride1(&x, &w, &b, 1)?;
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
    Ok(())
}
