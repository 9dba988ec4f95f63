//! Device names as pipelines write them: `cpu`, `cuda`, `cuda:N`.
//!
//! A CUDA device is opened once per GPU per process (one cuBLAS handle, kernels loaded once)
//! and shared by every stage that uses that GPU. Each is opened with its own explicit stream
//! (`Device::new_cuda_with_stream`), not candle's default: the default is CUDA's per-thread
//! stream, so the stream an operation lands on depends on the calling thread, and a stage
//! that loads weights on its own thread, trains on a rayon worker and saves on its own thread
//! again would read weights the worker's stream had not finished writing. With one explicit
//! stream per GPU every thread's work is queued in one order, and a read-back waits for it.

use candle_core::Device;

/// A device that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `cuda` or `cuda:N`.
    #[error("device `{0}`: use cpu, cuda or cuda:N")]
    Name(String),
    /// A CUDA device asked of a build without CUDA.
    #[error("device `{0}`: this fpipe was built without CUDA; rebuild it with `cargo build --release --features cuda`, or use --device cpu")]
    NotBuilt(String),
    /// A CUDA build on a machine whose driver or GPU cannot be opened.
    #[error("device `{name}`: no usable CUDA driver or GPU on this machine ({reason}); use --device cpu, or check `nvidia-smi`")]
    Unavailable { name: String, reason: String },
}

/// A parsed device name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceName {
    Cpu,
    /// A CUDA ordinal, as the process sees it (after `CUDA_VISIBLE_DEVICES`).
    Cuda(usize),
}

impl DeviceName {
    /// Parses `cpu` (or empty), `cuda` (ordinal 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<DeviceName, DeviceError> {
        if s == "cpu" || s.is_empty() {
            return Ok(DeviceName::Cpu);
        }
        match s.strip_prefix("cuda") {
            Some("") => Ok(DeviceName::Cuda(0)),
            Some(rest) => rest
                .strip_prefix(':')
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceName::Cuda)
                .ok_or_else(|| DeviceError::Name(s.to_string())),
            None => Err(DeviceError::Name(s.to_string())),
        }
    }

    /// The device a stage uses: `--device` (`name`), moved to the stage's first assigned GPU
    /// slot when it is a CUDA device and the scheduler gave the stage GPUs (slot `i` is CUDA
    /// ordinal `i` in this process, see `fpipe_engine::gpu`).
    pub fn for_slots(self, gpu_slots: &[usize]) -> DeviceName {
        match (self, gpu_slots.first()) {
            (DeviceName::Cuda(_), Some(&slot)) => DeviceName::Cuda(slot),
            (d, _) => d,
        }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` and opens the device (see the module note on streams).
pub fn parse_device(s: &str) -> Result<Device, DeviceError> {
    open(DeviceName::parse(s)?, s)
}

/// Checks that `s` names a device this build and machine can open, before anything runs.
/// Call it from the main thread before stages start: it silences the panic message of a
/// missing driver library for the moment it runs (the error says it instead).
pub fn check_device(s: &str) -> Result<(), DeviceError> {
    #[cfg(feature = "cuda")]
    let hook = std::panic::take_hook();
    #[cfg(feature = "cuda")]
    std::panic::set_hook(Box::new(|_| {}));
    let opened = parse_device(s).map(|_| ());
    #[cfg(feature = "cuda")]
    std::panic::set_hook(hook);
    opened
}

/// Opens `name` (shown as `shown` in errors).
pub fn open(name: DeviceName, shown: &str) -> Result<Device, DeviceError> {
    match name {
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda(ordinal) => open_cuda(ordinal, shown),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize, shown: &str) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt(shown.to_string()))
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, shown: &str) -> Result<Device, DeviceError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static OPEN: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(d) = open.get(&ordinal) {
        return Ok(d.clone());
    }
    let unavailable = |reason: String| DeviceError::Unavailable {
        name: shown.to_string(),
        reason,
    };
    // cudarc loads the driver library lazily and panics when it is missing: a machine without
    // a driver is bad input here, not a crash.
    let opened = std::panic::catch_unwind(|| Device::new_cuda_with_stream(ordinal))
        .map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA driver library could not be loaded".into());
            unavailable(why)
        })?
        .map_err(|e| unavailable(e.to_string()))?;
    open.insert(ordinal, opened.clone());
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(DeviceName::parse("cpu").ok(), Some(DeviceName::Cpu));
        assert_eq!(DeviceName::parse("").ok(), Some(DeviceName::Cpu));
        assert_eq!(DeviceName::parse("cuda").ok(), Some(DeviceName::Cuda(0)));
        assert_eq!(DeviceName::parse("cuda:3").ok(), Some(DeviceName::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda3", "CUDA:0", "cuda:-1"] {
            assert!(
                matches!(DeviceName::parse(bad), Err(DeviceError::Name(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_stage_with_gpu_slots_runs_on_its_first_slot() {
        assert_eq!(DeviceName::Cuda(0).for_slots(&[2, 3]), DeviceName::Cuda(2));
        assert_eq!(DeviceName::Cuda(1).for_slots(&[]), DeviceName::Cuda(1));
        assert_eq!(DeviceName::Cpu.for_slots(&[1]), DeviceName::Cpu);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_to_rebuild() {
        let e = check_device("cuda:0").unwrap_err();
        assert!(matches!(e, DeviceError::NotBuilt(_)), "{e}");
        assert!(e.to_string().contains("--features cuda"), "{e}");
        assert!(check_device("cpu").is_ok());
    }
}
