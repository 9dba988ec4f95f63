//! Device names as pipelines write them: `cpu`, `cuda`, `cuda:N`.

/// A device that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Not `cpu`, `cuda` or `cuda:N`.
    #[error("device `{0}`: use cpu or cuda:N")]
    Name(String),
    /// A CUDA device that this build or machine cannot open.
    #[error("device `{name}` unavailable ({reason}); fpipe must be built with --features cuda")]
    Unavailable { name: String, reason: String },
}

/// Parses `cpu`, `cuda` or `cuda:N` and opens the device.
pub fn parse_device(s: &str) -> Result<candle_core::Device, DeviceError> {
    if s == "cpu" || s.is_empty() {
        return Ok(candle_core::Device::Cpu);
    }
    let ord = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| DeviceError::Name(s.to_string()))?,
        None => return Err(DeviceError::Name(s.to_string())),
    };
    candle_core::Device::new_cuda(ord).map_err(|e| DeviceError::Unavailable {
        name: s.to_string(),
        reason: e.to_string(),
    })
}
