//! Layer 1: what every other layer may use and that knows nothing of faces: the one seeded
//! random generator, device names, thread pools, and a small PNG canvas for report charts.

pub mod device;
pub mod png;
pub mod rng;
pub mod threads;
