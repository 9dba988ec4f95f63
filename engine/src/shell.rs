//! The built-in `shell` stage kind: a command run in a fresh working directory.
//!
//! Layout of the working directory: `in/<port>/` holds each input artifact (a link to it in
//! the store; read it, never write it), files named in `deps:` appear at their path relative
//! to the pipeline file, and the command writes the paths declared in `outputs:`, which are
//! all that is kept. Outputs may not leave the working directory.

use crate::stage::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs a shell command; see the module docs.
pub struct ShellStage;

/// Output port of `shell`: the declared outputs, at their paths.
pub const SHELL_OUTPUT: &str = "files";

impl Stage for ShellStage {
    fn kind(&self) -> &'static str {
        "shell"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "runs a shell command in a fresh directory; inputs at in/<port>/, keeps the declared outputs"
    }
    fn signature(&self) -> StageSignature {
        StageSignature {
            inputs: vec![],
            outputs: vec![PortSpec::new(SHELL_OUTPUT, "files", "the declared outputs, at their paths")],
            params: vec![
                ParamSpec::required("run", ParamType::String, "the command, run by `sh -c` in the stage's working directory"),
                ParamSpec::with_default(
                    "outputs",
                    ParamType::List(Box::new(ParamType::String)),
                    json!([]),
                    "paths (files or folders) the command creates, relative to its working directory",
                ),
                ParamSpec::with_default(
                    "deps",
                    ParamType::List(Box::new(ParamType::Path { companions: &[] })),
                    json!([]),
                    "files or folders the command reads (scripts, data), relative to the pipeline file; hashed into the key",
                ),
                ParamSpec::with_default("env", ParamType::Any, json!({}), "extra environment variables (a mapping of strings)"),
                ParamSpec::with_default("shell", ParamType::String, json!("sh"), "the shell that runs `run`"),
            ],
        }
    }
    fn accepts_any_inputs(&self) -> bool {
        true
    }
    fn check_params(&self, params: &BTreeMap<String, Value>) -> Result<(), String> {
        if let Some(Value::Array(outs)) = params.get("outputs") {
            for o in outs {
                let s = o.as_str().unwrap_or_default();
                check_output_path(s)?;
            }
        }
        match params.get("env") {
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    if !v.is_string() && !v.is_number() && !v.is_boolean() {
                        return Err(format!("env `{k}` must be a string"));
                    }
                }
            }
            Some(_) => return Err("`env` must be a mapping of names to strings".into()),
            None => {}
        }
        Ok(())
    }
    fn commands(&self, params: &BTreeMap<String, Value>) -> Vec<String> {
        params
            .get("run")
            .and_then(|v| v.as_str())
            .map(|s| vec![s.to_string()])
            .unwrap_or_default()
    }
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        // A fresh directory per attempt, so a command orphaned by a killed earlier attempt
        // cannot write into this one.
        for e in std::fs::read_dir(&ctx.scratch)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("work-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let work = ctx
            .scratch
            .join(format!("work-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(work.join("in"))?;
        for (port, dir) in &ctx.inputs {
            link(dir, &work.join("in").join(port))?;
        }
        if let Some(Value::Array(deps)) = ctx.params.get("deps") {
            for d in deps {
                let abs = PathBuf::from(d.as_str().unwrap_or_default());
                let rel = abs.strip_prefix(&ctx.base_dir).map_err(|_| {
                    StageError::msg(format!(
                        "dep `{}` is outside the pipeline's folder; deps must live beside the pipeline file",
                        abs.display()
                    ))
                })?;
                let at = work.join(rel);
                if let Some(p) = at.parent() {
                    std::fs::create_dir_all(p)?;
                }
                link(&abs, &at)?;
            }
        }
        let outputs: Vec<String> = ctx
            .params
            .get("outputs")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for o in &outputs {
            check_output_path(o).map_err(StageError::msg)?;
            if let Some(p) = work.join(o).parent() {
                std::fs::create_dir_all(p)?;
            }
        }
        let run = ctx.param_str("run")?.to_string();
        let shell = ctx.param_str("shell")?.to_string();
        let metrics_file = work.join(".fpipe-metrics.json");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&ctx.log_file)?;
        let mut cmd = Command::new(&shell);
        cmd.arg("-c")
            .arg(&run)
            .current_dir(&work)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .env("FPIPE_STAGE", &ctx.name)
            .env("FPIPE_METRICS", &metrics_file)
            .env("FPIPE_DEVICE", &ctx.device)
            .env("FPIPE_THREADS", ctx.threads.to_string());
        if !ctx.gpus.is_empty() {
            let ids: Vec<String> = ctx.gpus.iter().map(|g| g.to_string()).collect();
            cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
        }
        if let Some(Value::Object(env)) = ctx.params.get("env") {
            for (k, v) in env {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                cmd.env(k, v);
            }
        }
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0); // so Ctrl-C can stop the command and everything it started
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| StageError::msg(format!("cannot start `{shell}`: {e}")))?;
        let mut nap = Duration::from_micros(50);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if ctx.cancelled() {
                kill_group(&mut child);
                return Err(StageError::Interrupted);
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
        };
        if !status.success() {
            let code = status
                .code()
                .map(|c| format!("exit status {c}"))
                .unwrap_or_else(|| "a signal".into());
            return Err(StageError::msg(format!(
                "command failed with {code}; last lines of {}:\n{}",
                ctx.log_file.display(),
                tail(&ctx.log_file, 15)
            )));
        }
        let dest_root = ctx.output(SHELL_OUTPUT)?.to_path_buf();
        let canon_work = std::fs::canonicalize(&work)?;
        for o in &outputs {
            let src = work.join(o);
            if std::fs::symlink_metadata(&src).is_err() {
                return Err(StageError::msg(format!(
                    "the command did not create declared output `{o}`; create it, or remove it from `outputs:`"
                )));
            }
            // The output's folder must be inside the working directory, not reached through
            // a link (in/ points into the store, which must never be moved from).
            let parent = src.parent().unwrap_or(&work);
            let canon_parent = std::fs::canonicalize(parent)?;
            if !canon_parent.starts_with(&canon_work)
                || canon_parent.starts_with(canon_work.join("in"))
            {
                return Err(StageError::msg(format!(
                    "output `{o}` resolves outside the stage's working directory"
                )));
            }
            let dest = dest_root.join(o);
            if let Some(p) = dest.parent() {
                std::fs::create_dir_all(p)?;
            }
            if std::fs::symlink_metadata(&src)?.file_type().is_symlink() {
                copy_following(&src, &dest)?;
            } else {
                std::fs::rename(&src, &dest)?;
            }
        }
        if let Ok(text) = std::fs::read_to_string(&metrics_file) {
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => {
                    for (k, v) in m {
                        if let Some(f) = v.as_f64() {
                            ctx.metric(&k, f);
                        }
                    }
                }
                _ => ctx.log("# fpipe: $FPIPE_METRICS is not a JSON object of numbers; ignored"),
            }
        }
        Ok(())
    }
}

/// An output path must be relative, stay inside the working directory, and not be an input.
pub fn check_output_path(s: &str) -> Result<(), String> {
    let p = Path::new(s);
    if s.trim().is_empty() {
        return Err("an output path is empty".into());
    }
    if p.is_absolute() || s.starts_with('~') {
        return Err(format!(
            "output `{s}` is an absolute path; outputs must be relative to the stage's working directory (e.g. out/model.bin)"
        ));
    }
    for c in p.components() {
        match c {
            Component::ParentDir => {
                return Err(format!(
                    "output `{s}` escapes the stage's output directory (`..`); write outputs inside the working directory"
                ))
            }
            Component::Normal(_) | Component::CurDir => {}
            _ => return Err(format!("output `{s}` is not a plain relative path")),
        }
    }
    if p.components().find(|c| !matches!(c, Component::CurDir))
        == Some(Component::Normal("in".as_ref()))
    {
        return Err(format!(
            "output `{s}` is under in/, where the inputs are; write outputs elsewhere (e.g. out/)"
        ));
    }
    Ok(())
}

fn link(target: &Path, at: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(target, at)
    }
    #[cfg(not(unix))]
    {
        copy_following(target, at)
    }
}

fn copy_following(src: &Path, dest: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(src)?;
    if meta.is_dir() {
        std::fs::create_dir_all(dest)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_following(&e.path(), &dest.join(e.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(src, dest).map(|_| ())
    }
}

fn kill_group(child: &mut std::process::Child) {
    #[cfg(unix)]
    {
        let pgid = child.id() as i32;
        // SAFETY: kill(2) with a negative pid signals the process group we created.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = child.try_wait() {
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::check_output_path;

    #[test]
    fn output_paths_must_stay_inside() {
        assert!(check_output_path("out/a.txt").is_ok());
        assert!(check_output_path("./out").is_ok());
        assert!(check_output_path("../x").is_err());
        assert!(check_output_path("out/../../x").is_err());
        assert!(check_output_path("/etc/passwd").is_err());
        assert!(check_output_path("in/msg/x").is_err());
        assert!(check_output_path("").is_err());
    }
}
