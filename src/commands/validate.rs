//! `fpipe validate` and `fpipe dag`: what a pipeline is, before anything runs.

use super::*;

/// `fpipe validate`: plans the pipeline and shows everything it would run.
pub fn validate(registry: Registry, args: ValidateArgs) -> Result<ExitCode> {
    let ValidateArgs { pipeline, remote } = args;
    let plan = load(&pipeline, &registry)?;
    print!("{}", validation_report(&pipeline.file, &plan));
    match remote {
        Some(url) => {
            // Checked, not contacted: a bad URL is an error here, before any run.
            super::remote::open_remote(&url)?;
            println!(
                "remote cache a run would use: {}",
                fpipe_engine::text::visible_line(&fpipe_remote::Remote::describe(&url))
            );
        }
        None => println!("remote cache: none (--remote URL or FPIPE_REMOTE sets one)"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `fpipe dag`: the DAG as text, DOT or mermaid.
pub fn dag(registry: Registry, args: DagArgs) -> Result<ExitCode> {
    let DagArgs { pipeline, format } = args;
    let plan = load(&pipeline, &registry)?;
    print!("{}", render_dag(&plan, &format));
    Ok(ExitCode::SUCCESS)
}

/// What `fpipe validate` prints: every program the pipeline would start, with its arguments,
/// the environment it gets and the files linked in beside it, and every file or folder the
/// stages read by path, all with control characters made visible, so a pipeline received
/// from someone else can be reviewed before it runs.
pub(super) fn validation_report(file: &Path, plan: &Plan) -> String {
    use fpipe_engine::text::{visible, visible_line};
    use std::fmt::Write;
    let mut out = String::new();
    let mut kinds = BTreeSet::new();
    let mut commands = Vec::new();
    let mut reads = Vec::new();
    for s in &plan.stages {
        kinds.insert(s.def.uses.clone());
        for c in s.kind.commands(&s.params, &s.def.base_dir) {
            commands.push((s.name(), c));
        }
        for (param, paths) in &s.path_params {
            for p in paths {
                reads.push((s.name(), param.as_str(), p));
            }
        }
    }
    let _ = writeln!(
        out,
        "{}: ok, {} stages ({})",
        visible_line(&file.display().to_string()),
        plan.stages.len(),
        kinds.into_iter().collect::<Vec<_>>().join(", ")
    );
    if commands.is_empty() {
        let _ = writeln!(out, "runs no shell commands");
    } else {
        let _ = writeln!(out, "shell commands it would run ({}):", commands.len());
        for (stage, c) in &commands {
            let _ = writeln!(out, "  [{stage}]");
            let script = c.args.last().map(String::as_str).unwrap_or_default();
            for line in visible(script, true).lines() {
                let _ = writeln!(out, "    $ {line}");
            }
            let mut argv: Vec<String> = std::iter::once(c.program.as_str())
                .chain(c.args.iter().map(String::as_str))
                .map(|a| shell_word(&visible_line(a)))
                .collect();
            if let Some(last) = argv.last_mut() {
                if c.args.len() > 1 {
                    *last = "<the command above>".into();
                }
            }
            let _ = writeln!(out, "    program: {}", argv.join(" "));
            for (k, v) in &c.env {
                let _ = writeln!(
                    out,
                    "    env: {}={}",
                    visible_line(k),
                    shell_word(&visible_line(v))
                );
            }
            for (at, from) in &c.links {
                let _ = writeln!(
                    out,
                    "    links in: {} -> {}",
                    visible_line(at),
                    visible_line(&from.display().to_string())
                );
            }
        }
        let _ = writeln!(
            out,
            "each also gets FPIPE_STAGE, FPIPE_METRICS, FPIPE_DEVICE, FPIPE_THREADS, CUDA_VISIBLE_DEVICES (with GPU slots) and the environment fpipe runs in"
        );
    }
    if !reads.is_empty() {
        let _ = writeln!(out, "files and folders it reads by path ({}):", reads.len());
        for (stage, param, p) in reads {
            let _ = writeln!(
                out,
                "  [{stage}] {param}: {}",
                visible_line(&p.display().to_string())
            );
        }
    }
    out
}

/// A word as a shell would need it quoted to mean the same (for display).
pub(super) fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

pub(super) fn render_dag(plan: &Plan, format: &str) -> String {
    let mut out = String::new();
    match format {
        "dot" => {
            out.push_str("digraph pipeline {\n  rankdir=LR;\n");
            for &i in &plan.order {
                let s = &plan.stages[i];
                out.push_str(&format!(
                    "  \"{}\" [label=\"{}\\n({})\", shape=box];\n",
                    s.name(),
                    s.name(),
                    s.def.uses
                ));
            }
            for &i in &plan.order {
                let s = &plan.stages[i];
                for w in &s.wires {
                    out.push_str(&format!(
                        "  \"{}\" -> \"{}\" [label=\"{}\"];\n",
                        plan.stages[w.from].name(),
                        s.name(),
                        w.port
                    ));
                }
            }
            out.push_str("}\n");
        }
        "mermaid" => {
            out.push_str("graph LR\n");
            for &i in &plan.order {
                let s = &plan.stages[i];
                out.push_str(&format!("  n{i}[\"{}<br/>{}\"]\n", s.name(), s.def.uses));
            }
            for &i in &plan.order {
                for w in &plan.stages[i].wires {
                    out.push_str(&format!("  n{} -->|{}| n{i}\n", w.from, w.port));
                }
            }
        }
        _ => {
            for &i in &plan.order {
                let s = &plan.stages[i];
                out.push_str(&format!("{} ({})\n", s.name(), s.def.uses));
                for w in &s.wires {
                    out.push_str(&format!(
                        "  {} <- {}.{}\n",
                        w.port,
                        plan.stages[w.from].name(),
                        w.from_port
                    ));
                }
            }
        }
    }
    out
}
