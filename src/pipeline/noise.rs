//! Seeded noise that matches PyTorch's CPU generator, so that a seed gives the same image here as
//! in diffusers with `torch.Generator("cpu").manual_seed(seed)`.
//!
//! The engine is the 32-bit Mersenne Twister (Matsumoto & Nishimura, 1998). Uniforms and normals
//! are drawn the way torch's CPU kernels draw them for float32 tensors; see `SEEDS.md` in the
//! project docs for the rules (24-bit uniforms, Box-Muller over blocks of 16, the tail block).

use candle_core::{DType, Device, Tensor};

use crate::Result;

const MT_N: usize = 624;
const MT_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The 32-bit Mersenne Twister, seeded by the classic `init_genrand`.
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; MT_N]>,
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; MT_N]);
        state[0] = seed;
        for k in 1..MT_N {
            let prev = state[k - 1];
            state[k] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(k as u32);
        }
        Self { state, index: MT_N }
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        for k in 0..MT_N {
            let y = (s[k] & UPPER_MASK) | (s[(k + 1) % MT_N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            s[k] = s[(k + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// Equivalent of `torch.Generator("cpu").manual_seed(seed)` for `torch.rand` / `torch.randn` in
/// float32. The state carries on from one call to the next, as torch's does.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// torch's scalar normal sampler makes normals in pairs and keeps the second for the next
    /// element it is asked for (used for tensors of fewer than 16 elements only).
    cached_normal: Option<f64>,
}

impl TorchGenerator {
    /// torch keeps only the low 32 bits of the seed for its Mersenne Twister.
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed as u32),
            cached_normal: None,
        }
    }

    /// One float32 uniform in [0, 1): the low 24 bits of one draw.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// One float64 uniform in [0, 1) from two draws (the first is the high word), 53 bits.
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        let bits = ((hi << 32) | lo) & ((1u64 << 53) - 1);
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `torch.rand(n)`: one 24-bit uniform per element.
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.randn(n)` in float32.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            // torch's vectorised path needs at least one block of 16; smaller tensors go through
            // its scalar sampler, which works in float64 and caches every second normal.
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut out = self.rand(n);
        for block in out.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            // The last, partial block is redrawn whole from fresh uniforms, overwriting the last
            // 16 elements (some of which the full-block pass already set).
            let tail = &mut out[n - 16..];
            for x in tail.iter_mut() {
                *x = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        out
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(z) = self.cached_normal.take() {
            return z;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }
}

/// Box-Muller over one block of 16 uniforms: element j and j+8 become a pair of normals.
fn box_muller_16(block: &mut [f32]) {
    // torch works in float32 here: 1 - u is exact for 24-bit uniforms, theta is rounded to f32.
    const TWO_PI: f32 = 2.0 * std::f32::consts::PI;
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let theta = TWO_PI * block[j + 8];
        let radius = (-2.0 * (u1 as f64).ln()).sqrt();
        let theta = theta as f64;
        block[j] = (radius * theta.cos()) as f32;
        block[j + 8] = (radius * theta.sin()) as f32;
    }
}

/// One generator per image of a batch: image i of a request uses seed + i, so an image depends on
/// its own seed only, not on the batch it was generated in.
#[derive(Clone)]
pub struct BatchNoise {
    generators: Vec<TorchGenerator>,
}

impl BatchNoise {
    pub fn from_seeds(seeds: &[u64]) -> Self {
        Self {
            generators: seeds.iter().map(|&s| TorchGenerator::new(s)).collect(),
        }
    }

    /// Generators for `count` images starting at `seed` (image i uses seed + i, wrapping).
    pub fn consecutive(seed: u64, count: usize) -> Self {
        let seeds: Vec<u64> = (0..count as u64).map(|i| seed.wrapping_add(i)).collect();
        Self::from_seeds(&seeds)
    }

    pub fn len(&self) -> usize {
        self.generators.len()
    }

    pub fn is_empty(&self) -> bool {
        self.generators.is_empty()
    }

    /// The generator of image `index`, to draw from it directly.
    pub fn generator_mut(&mut self, index: usize) -> Option<&mut TorchGenerator> {
        self.generators.get_mut(index)
    }

    /// A tensor `[B, ...item_shape]` whose item b is drawn from generator b (as diffusers'
    /// `randn_tensor` does with a list of generators), in f32 then cast to `dtype`.
    pub fn randn(&mut self, item_shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
        let item_len: usize = item_shape.iter().product();
        let mut data = Vec::with_capacity(item_len * self.generators.len());
        for generator in &mut self.generators {
            data.extend(generator.randn(item_len));
        }
        let mut shape = Vec::with_capacity(item_shape.len() + 1);
        shape.push(self.generators.len());
        shape.extend_from_slice(item_shape);
        let noise = Tensor::from_vec(data, shape, &Device::Cpu)?;
        Ok(noise.to_dtype(dtype)?.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mersenne_twister_reference_output() {
        // First outputs of MT19937 for init_genrand(5489), the reference implementation's default.
        let mut mt = Mt19937::new(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
        assert_eq!(mt.next_u32(), 581_869_302);
        assert_eq!(mt.next_u32(), 3_890_346_734);
    }

    #[test]
    fn seeds_use_low_32_bits() {
        let a = TorchGenerator::new(7).randn(40);
        let b = TorchGenerator::new(7 + (1u64 << 32)).randn(40);
        assert_eq!(a, b);
    }
}
