//! GPU slots and the devices they stand for.
//!
//! The scheduler hands out GPU slots `0..N`. Inside the fpipe process, CUDA numbers the devices
//! it may use from 0 in the order of the parent's `CUDA_VISIBLE_DEVICES`, so slot `i` is CUDA
//! ordinal `i` for a built-in stage. A child process (a `shell` stage) inherits that variable
//! and would renumber again, so it is told the parent's own entry for its slots: with
//! `CUDA_VISIBLE_DEVICES=2,3` in the parent, slot 0 is `2` for the child, not physical GPU 0.

/// The environment variable CUDA reads to restrict and order the devices a process sees.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// The devices the GPU slots map to, in slot order.
///
/// `cuda_visible_devices` is the parent's `CUDA_VISIBLE_DEVICES` (`None` when unset): its
/// entries, as CUDA reads them (indices or `GPU-`/`MIG-` UUIDs; an empty value hides every
/// GPU, and CUDA stops at the first entry it cannot read, so the rest are not visible). When
/// unset, every device the driver reports (`driver_count`) is visible as `0..driver_count`.
pub fn visible_gpus(cuda_visible_devices: Option<&str>, driver_count: usize) -> Vec<String> {
    let Some(list) = cuda_visible_devices else {
        return (0..driver_count).map(|i| i.to_string()).collect();
    };
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim) {
        let index = !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit());
        let uuid = entry.starts_with("GPU-") || entry.starts_with("MIG-");
        if !(index || uuid) || out.iter().any(|e| e == entry) {
            break;
        }
        out.push(entry.to_string());
    }
    out
}

/// The `CUDA_VISIBLE_DEVICES` value for a child process given `slots`, or `None` when a slot
/// has no device (the scheduler never hands out more slots than there are visible GPUs).
pub fn child_visible_devices(slots: &[usize], visible: &[String]) -> Option<String> {
    let ids: Option<Vec<&str>> = slots
        .iter()
        .map(|&s| visible.get(s).map(String::as_str))
        .collect();
    ids.map(|ids| ids.join(","))
}

/// Why `--gpus N` cannot be granted.
#[derive(Debug, thiserror::Error)]
#[error("--gpus {asked}: only {visible} GPU(s) are visible to fpipe ({why}); ask for at most {visible}, or make more GPUs visible")]
pub struct TooManyGpus {
    /// Slots asked for.
    pub asked: usize,
    /// GPUs visible.
    pub visible: usize,
    /// Where the visible GPUs came from, for the message.
    pub why: String,
}

/// The number of GPU slots to schedule: `asked` (from `--gpus`) when that many are visible, or
/// every visible GPU when not asked.
pub fn gpu_slots(
    asked: Option<usize>,
    cuda_visible_devices: Option<&str>,
    visible: &[String],
) -> Result<usize, TooManyGpus> {
    match asked {
        None => Ok(visible.len()),
        Some(n) if n <= visible.len() => Ok(n),
        Some(n) => Err(TooManyGpus {
            asked: n,
            visible: visible.len(),
            why: match cuda_visible_devices {
                Some(v) => format!("{CUDA_VISIBLE_DEVICES}={v}"),
                None => "as the driver reports them".into(),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unset_means_every_device_the_driver_reports() {
        assert_eq!(visible_gpus(None, 3), ids(&["0", "1", "2"]));
        assert!(visible_gpus(None, 0).is_empty());
    }

    #[test]
    fn set_keeps_the_parents_entries_in_order() {
        assert_eq!(visible_gpus(Some("2,3"), 8), ids(&["2", "3"]));
        assert_eq!(visible_gpus(Some(" 3 , 1"), 8), ids(&["3", "1"]));
        assert_eq!(
            visible_gpus(Some("GPU-8e2f,MIG-1a2b"), 0),
            ids(&["GPU-8e2f", "MIG-1a2b"])
        );
    }

    #[test]
    fn empty_or_unreadable_entries_hide_what_follows() {
        assert!(visible_gpus(Some(""), 4).is_empty());
        assert_eq!(visible_gpus(Some("0,-1,2"), 4), ids(&["0"]));
        assert!(visible_gpus(Some("NoDevFiles"), 4).is_empty());
        assert_eq!(visible_gpus(Some("1,,2"), 4), ids(&["1"]));
        assert_eq!(visible_gpus(Some("1,1"), 4), ids(&["1"]));
    }

    #[test]
    fn a_child_gets_the_parents_entries_for_its_slots() {
        let visible = ids(&["2", "3"]);
        assert_eq!(child_visible_devices(&[0], &visible).as_deref(), Some("2"));
        assert_eq!(
            child_visible_devices(&[1, 0], &visible).as_deref(),
            Some("3,2")
        );
        assert_eq!(child_visible_devices(&[2], &visible), None);
        let uuids = ids(&["GPU-a", "GPU-b"]);
        assert_eq!(
            child_visible_devices(&[1], &uuids).as_deref(),
            Some("GPU-b")
        );
    }

    #[test]
    fn asking_for_more_gpus_than_visible_is_an_error() {
        let two = ids(&["2", "3"]);
        assert_eq!(gpu_slots(None, Some("2,3"), &two).ok(), Some(2));
        assert_eq!(gpu_slots(Some(1), Some("2,3"), &two).ok(), Some(1));
        let e = gpu_slots(Some(4), Some("2,3"), &two).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--gpus 4: only 2 GPU(s) are visible to fpipe (CUDA_VISIBLE_DEVICES=2,3); ask for at most 2, or make more GPUs visible"
        );
        assert!(gpu_slots(Some(1), None, &[]).is_err());
        assert_eq!(gpu_slots(Some(0), None, &[]).ok(), Some(0));
    }
}
