//! Layer 1: what every other layer may use and that knows nothing of faces: the one seeded
//! random generator, device names, thread pools, and the line charts stages write into their reports (`chart`).

pub mod chart;
pub mod device;
pub mod rng;
pub mod threads;
