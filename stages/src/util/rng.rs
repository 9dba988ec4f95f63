//! The one random generator of the face stages: SplitMix64, seeded explicitly everywhere, so
//! the same seed gives the same weights, batches and synthetic faces on every machine and
//! with every version of every dependency (candle's CPU generator cannot be seeded).

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a well-spread 64-bit hash of `z`.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Small deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    /// Generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    /// Generator from several keys (for example seed, split, identity, image), each mixed in
    /// turn, so nearby key tuples give unrelated streams.
    pub fn from_keys(keys: &[u64]) -> Self {
        let mut s = 0x853C_49E6_748F_EA9B_u64;
        for &k in keys {
            s = mix(s ^ k.wrapping_add(GOLDEN));
        }
        SplitMix(s)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }
    /// Uniform in [0, 1), 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, 1), 24 bits: exact in f32.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// Uniform integer in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
    /// Fisher-Yates shuffle of `v`.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Independent random stream for (seed, purpose, index): training draws each image's flip,
/// each batch's mix and each epoch's order from its own stream, so resuming from a checkpoint
/// replays exactly what an uninterrupted run would have drawn.
pub fn stream(seed: u64, purpose: u64, index: u64) -> SplitMix {
    let mut m = SplitMix::new(seed ^ purpose.wrapping_mul(GOLDEN));
    let a = m.next_u64();
    SplitMix::new(a ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of seed 0 are SplitMix64's published reference values.
    #[test]
    fn matches_the_reference_sequence() {
        let mut r = SplitMix::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        SplitMix::new(7).shuffle(&mut a);
        SplitMix::new(7).shuffle(&mut b);
        assert_eq!(a, b);
        assert_ne!(a, (0..50).collect::<Vec<_>>());
        a.sort_unstable();
        assert_eq!(a, (0..50).collect::<Vec<_>>());
    }
}
