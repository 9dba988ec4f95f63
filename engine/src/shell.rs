//! The built-in `shell` stage kind: a command run in a fresh working directory.
//!
//! Layout of the working directory: `in/<port>/` holds each input artifact (a link to it in
//! the store; read it, never write it), files named in `deps:` appear at their path relative
//! to the pipeline file, and the command writes the paths declared in `outputs:`, which are
//! all that is kept. Outputs may not leave the working directory.

use crate::gpu;
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
                    ParamType::List(Box::new(ParamType::LocalPath)),
                    json!([]),
                    "files or folders the command reads (scripts, data), inside the pipeline file's folder and relative to it; hashed into the key",
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
        let outputs = strings(params.get("outputs"));
        for o in &outputs {
            check_output_path(o)?;
        }
        check_output_overlap(&outputs)?;
        match params.get("env") {
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    if k.is_empty() || k.contains(['=', '\0']) {
                        return Err(format!(
                            "env `{k}` is not a variable name (it must be non-empty, without `=`)"
                        ));
                    }
                    if !v.is_string() && !v.is_number() && !v.is_boolean() {
                        return Err(format!("env `{k}` must be a string"));
                    }
                    if env_value(v).contains('\0') {
                        return Err(format!("env `{k}` holds a NUL character"));
                    }
                }
            }
            Some(_) => return Err("`env` must be a mapping of names to strings".into()),
            None => {}
        }
        if params
            .get("shell")
            .and_then(Value::as_str)
            .is_some_and(|s| s.trim().is_empty())
        {
            return Err("`shell` is empty; name a shell such as sh or bash".into());
        }
        // Deps arrive as absolute paths inside the pipeline's folder (checked by the plan).
        let deps = strings(params.get("deps"));
        for (i, a) in deps.iter().enumerate() {
            for b in &deps[i + 1..] {
                let (pa, pb) = (Path::new(a), Path::new(b));
                if pa == pb {
                    return Err(format!("dep `{a}` is listed twice"));
                }
                if pa.starts_with(pb) || pb.starts_with(pa) {
                    let (inner, outer) = if pa.starts_with(pb) { (a, b) } else { (b, a) };
                    return Err(format!(
                        "dep `{inner}` lies inside dep `{outer}`; list only `{outer}`"
                    ));
                }
            }
        }
        Ok(())
    }
    fn commands(&self, params: &BTreeMap<String, Value>, base_dir: &Path) -> Vec<Invocation> {
        let Some(run) = params.get("run").and_then(Value::as_str) else {
            return vec![];
        };
        let program = params
            .get("shell")
            .and_then(Value::as_str)
            .unwrap_or("sh")
            .to_string();
        let env = match params.get("env") {
            Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), env_value(v))).collect(),
            _ => vec![],
        };
        let links = strings(params.get("deps"))
            .into_iter()
            .map(|abs| {
                let abs = PathBuf::from(abs);
                let at = abs
                    .strip_prefix(base_dir)
                    .map(|r| r.to_string_lossy().to_string())
                    .unwrap_or_else(|_| abs.to_string_lossy().to_string());
                (at, abs)
            })
            .collect();
        vec![Invocation {
            program,
            args: vec!["-c".into(), run.to_string()],
            env,
            links,
        }]
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
        for dep in strings(ctx.params.get("deps")) {
            let abs = PathBuf::from(&dep);
            // The plan resolved deps inside the pipeline's folder; check again, since a link
            // made at a path with `..` would land outside the working directory.
            let rel = abs
                .strip_prefix(&ctx.base_dir)
                .ok()
                .filter(|r| r.components().all(|c| matches!(c, Component::Normal(_))))
                .ok_or_else(|| {
                    StageError::msg(format!(
                        "dep `{}` is not inside the pipeline's folder {}; deps must live beside the pipeline file",
                        abs.display(),
                        ctx.base_dir.display()
                    ))
                })?;
            if rel.components().next() == Some(Component::Normal("in".as_ref())) {
                return Err(StageError::msg(format!(
                    "dep `{}` would be placed under in/, where the stage's inputs are; move it to another folder beside the pipeline",
                    rel.display()
                )));
            }
            let at = work.join(rel);
            if let Some(p) = at.parent() {
                std::fs::create_dir_all(p)?;
            }
            link(&abs, &at).map_err(|e| {
                StageError::msg(format!(
                    "cannot place dep `{}` in the working directory: {e}",
                    rel.display()
                ))
            })?;
        }
        let outputs = strings(ctx.params.get("outputs"));
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
            // The child renumbers the devices it sees: give it the parent's own entries.
            let parent = std::env::var(gpu::CUDA_VISIBLE_DEVICES).ok();
            let by_index = ctx.gpus.iter().max().map_or(0, |m| m + 1);
            let visible = gpu::visible_gpus(parent.as_deref(), by_index);
            let ids = gpu::child_visible_devices(&ctx.gpus, &visible).ok_or_else(|| {
                StageError::msg(format!(
                    "GPU slots {:?} have no visible device ({}={})",
                    ctx.gpus,
                    gpu::CUDA_VISIBLE_DEVICES,
                    parent.as_deref().unwrap_or("")
                ))
            })?;
            cmd.env(gpu::CUDA_VISIBLE_DEVICES, ids);
        }
        if let Some(Value::Object(env)) = ctx.params.get("env") {
            for (k, v) in env {
                cmd.env(k, env_value(v));
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
            publish(&src, &dest, o, &canon_work)?;
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
        let _ = (target, at);
        Err(std::io::Error::other(
            "deps and inputs need symbolic links (unix)",
        ))
    }
}

/// Moves output `name` from `src` in the working directory to `dest` in its staging folder.
/// An artifact holds only files and folders, so links are replaced by what they point to;
/// a link that resolves outside the working directory (or into `in/`, the store) is refused
/// and never read through.
fn publish(src: &Path, dest: &Path, name: &str, work: &Path) -> Result<(), StageError> {
    if !holds_links(src)? {
        std::fs::rename(src, dest)?;
        return Ok(());
    }
    let mut open_dirs = Vec::new();
    copy_resolving(src, dest, name, work, &mut open_dirs)
}

fn holds_links(path: &Path) -> std::io::Result<bool> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(true);
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(path)? {
            if holds_links(&e?.path())? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn copy_resolving(
    src: &Path,
    dest: &Path,
    shown: &str,
    work: &Path,
    open_dirs: &mut Vec<PathBuf>,
) -> Result<(), StageError> {
    let meta = std::fs::symlink_metadata(src)?;
    let real = if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let real = std::fs::canonicalize(src).map_err(|e| {
            StageError::msg(format!(
                "output `{shown}` is a link to `{target}` that dangles or loops ({e}); create the file itself"
            ))
        })?;
        if !real.starts_with(work) || real.starts_with(work.join("in")) {
            return Err(StageError::msg(format!(
                "output `{shown}` is a link to `{target}`, outside the stage's working directory; \
                 links in outputs must point inside it (copy the file in instead)"
            )));
        }
        real
    } else {
        src.to_path_buf()
    };
    let meta = std::fs::metadata(&real)?;
    if meta.is_file() {
        std::fs::copy(&real, dest).map_err(|e| {
            StageError::msg(format!("copying output `{shown}` into the artifact: {e}"))
        })?;
        return Ok(());
    }
    if !meta.is_dir() {
        return Err(StageError::msg(format!(
            "output `{shown}` is neither a file nor a folder; outputs hold only files and folders"
        )));
    }
    let canon = std::fs::canonicalize(&real)?;
    if open_dirs.contains(&canon) {
        return Err(StageError::msg(format!(
            "output `{shown}` is a link to a folder that contains it (a loop)"
        )));
    }
    open_dirs.push(canon);
    std::fs::create_dir_all(dest)?;
    for e in std::fs::read_dir(&real)? {
        let e = e?;
        let name = e.file_name();
        let shown = format!("{shown}/{}", name.to_string_lossy());
        copy_resolving(&e.path(), &dest.join(&name), &shown, work, open_dirs)?;
    }
    open_dirs.pop();
    Ok(())
}

/// The strings of a list parameter.
fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An `env:` value as the child sees it.
fn env_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Two outputs may not name the same path, or one lie inside the other.
fn check_output_overlap(outputs: &[String]) -> Result<(), String> {
    let norm: Vec<PathBuf> = outputs
        .iter()
        .map(|o| {
            Path::new(o)
                .components()
                .filter(|c| !matches!(c, Component::CurDir))
                .collect()
        })
        .collect();
    for (i, a) in norm.iter().enumerate() {
        for (j, b) in norm.iter().enumerate().skip(i + 1) {
            if a == b {
                return Err(format!(
                    "output `{}` is listed twice; list each output once",
                    outputs[j]
                ));
            }
            if a.starts_with(b) || b.starts_with(a) {
                let (inner, outer) = if a.starts_with(b) { (i, j) } else { (j, i) };
                return Err(format!(
                    "output `{}` lies inside output `{}`; list only `{}` (it keeps everything under it)",
                    outputs[inner], outputs[outer], outputs[outer]
                ));
            }
        }
    }
    Ok(())
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

    #[test]
    fn outputs_may_not_repeat_or_nest() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(super::check_output_overlap(&v(&["a", "b/c", "bc"])).is_ok());
        let e = super::check_output_overlap(&v(&["x", "./x"])).unwrap_err();
        assert!(e.contains("`./x` is listed twice"), "{e}");
        let e = super::check_output_overlap(&v(&["d/x", "d"])).unwrap_err();
        assert!(e.contains("`d/x` lies inside output `d`"), "{e}");
        let e = super::check_output_overlap(&v(&["d", "d/x"])).unwrap_err();
        assert!(e.contains("`d/x` lies inside output `d`"), "{e}");
    }
}
