//! fpipe-stages
