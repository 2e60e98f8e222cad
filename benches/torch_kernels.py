"""The shapes of `examples/kernels_bench.rs` in torch, for a ratio measured on the same machine:
the UNet's 3x3 convolution and token projection at each level of a 512x512 step with guidance
(batch 2), then the VAE decoder's 3x3 convolution, GroupNorm + SiLU, nearest 2x upsampling and
residual add at each level of a 512x512 decode. Best of two runs each, f32.

    python benches/torch_kernels.py --threads 2
    cargo run --release --example kernels_bench     # same shapes, sd-serve's kernels
"""

import argparse
import time

import torch


def best_of_two(f):
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with torch.no_grad():
        for c, h in [(320, 64), (640, 32), (1280, 16), (1280, 8)]:
            x = torch.randn(2, c, h, h)
            conv = torch.nn.Conv2d(c, c, 3, padding=1)
            s = best_of_two(lambda: conv(x))
            print(f"unet conv {c}x{h}^2 {s * 1e3:.1f} ms {2 * 2 * c * c * 9 * h * h / s / 1e9:.1f} GFLOP/s")
            tokens = torch.randn(2, h * h, c)
            linear = torch.nn.Linear(c, c, bias=False)
            s = best_of_two(lambda: linear(tokens))
            print(f"  linear {s * 1e3:.1f} ms {2 * 2 * h * h * c * c / s / 1e9:.1f} GFLOP/s")
        for c, h in [(512, 64), (512, 128), (256, 256), (128, 512)]:
            x = torch.randn(1, c, h, h)
            conv = torch.nn.Conv2d(c, c, 3, padding=1)
            s = best_of_two(lambda: conv(x))
            print(f"vae conv {c}x{h}^2 {s:.3f}s {2 * c * c * 9 * h * h / s / 1e9:.1f} GFLOP/s")
            norm = torch.nn.GroupNorm(32, c, eps=1e-6)
            s = best_of_two(lambda: torch.nn.functional.silu(norm(x)))
            print(f"  gn+silu {s * 1e3:.1f} ms")
            s = best_of_two(lambda: torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
            print(f"  upsample {s * 1e3:.1f} ms")
            s = best_of_two(lambda: x + x)
            print(f"  add {s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
