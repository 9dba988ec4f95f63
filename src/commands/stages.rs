//! `fpipe stages`: the stage kinds with their ports and parameters.

use super::*;

/// `fpipe stages`: lists the stage kinds.
pub fn stages(registry: Registry, args: StagesArgs) -> Result<ExitCode> {
    let StagesArgs { kind } = args;
    let mut any = false;
    // `fpipe stages OLD-NAME` shows the kind a former name now stands for.
    let wanted = kind
        .as_deref()
        .map(|n| registry.resolve(n).map(|(k, _)| k.kind()).unwrap_or(n));
    for k in registry.kinds() {
        if wanted.is_some_and(|n| n != k.kind()) {
            continue;
        }
        any = true;
        print_kind(k.as_ref());
        for (old, current) in registry.aliases() {
            if current == k.kind() {
                println!("  (formerly `{old}`: still accepted, with a warning)");
            }
        }
        println!();
    }
    if !any {
        bail!("no stage kind `{}`", kind.unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn print_kind(k: &dyn fpipe_engine::Stage) {
    let sig = k.signature();
    println!("{} (v{}): {}", k.kind(), k.version(), k.doc());
    for p in &sig.inputs {
        println!(
            "  in  {:<14} {:<10} {}{}",
            p.name,
            p.ty,
            p.doc,
            if p.optional { " (optional)" } else { "" }
        );
    }
    if k.accepts_any_inputs() {
        println!("  in  <any name>     any        placed at in/<name>/");
    }
    for p in &sig.outputs {
        println!("  out {:<14} {:<10} {}", p.name, p.ty, p.doc);
    }
    for p in &sig.params {
        let d = p
            .default
            .as_ref()
            .map(|d| format!(" [default {d}]"))
            .unwrap_or_else(|| " [required]".into());
        println!("  with {:<13} {}{}: {}", p.name, p.ty.describe(), d, p.doc);
    }
}
