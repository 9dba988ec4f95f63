//! Rendering a pipeline file's templates over its parameters, with bounded work and output,
//! and errors that point at what a template produced.

use super::params::mentions;
use super::*;

pub(super) fn render(file: &Path, text: &str, params: &Value) -> Result<String, PipelineError> {
    if !text.contains("{{") && !text.contains("{%") && !text.contains("{#") {
        return Ok(text.to_string());
    }
    // No loader and no filesystem or environment access: a pipeline file from another team
    // cannot read anything through its templates.
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(true);
    // Bounded work: a template that loops too long runs out of fuel instead of spinning.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(TEMPLATE_RECURSION);
    let ctx = minijinja::context! { params => minijinja::Value::from_serialize(params) };
    let limit_err = |what: String| {
        PipelineError::new(file, format!("the template did too much work: {what}"))
            .hint("templates are for parameters and short loops over them; generate very large pipelines with a script instead")
    };
    let template = env
        .template_from_str(text)
        .map_err(|e| template_err(file, e))?;
    let mut out = CappedText::default();
    match template.render_captured_to(ctx, &mut out) {
        Ok(_) => {}
        Err(_) if out.overflowed => {
            return Err(limit_err(format!(
                "it rendered more than {} MB of text",
                TEMPLATE_OUTPUT_BYTES >> 20
            )))
        }
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => {
            return Err(
                limit_err(format!("it ran out of its budget of {TEMPLATE_FUEL} steps"))
                    .at(e.line()),
            )
        }
        Err(e) => return Err(template_err(file, e)),
    }
    String::from_utf8(out.bytes)
        .map_err(|_| PipelineError::new(file, "the template rendered text that is not UTF-8"))
}

/// Template steps one file may take: about a million loop iterations, far beyond any
/// pipeline's parameter loops.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Nesting of macro calls.
pub(super) const TEMPLATE_RECURSION: usize = 64;

/// Rendered text of one file.
pub const TEMPLATE_OUTPUT_BYTES: usize = 16 << 20;

/// The rendered text, refusing to grow past [`TEMPLATE_OUTPUT_BYTES`].
#[derive(Default)]
pub(super) struct CappedText {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > TEMPLATE_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered text too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(super) fn template_err(file: &Path, e: minijinja::Error) -> PipelineError {
    {
        let mut msg = format!("template error: {}", e.kind());
        if let Some(d) = e.detail() {
            msg.push_str(": ");
            msg.push_str(d);
        }
        PipelineError::new(file, msg)
            .at(e.line())
            .hint("templates see `params` only, e.g. {{ params.epochs }}; set missing ones with -p NAME=VALUE")
    }
}

/// A YAML error in a file after its templates ran. When templates changed the text, the line
/// the parser saw is not the line in the file, and the usual cause is a parameter value (often
/// one given with `-p`) that is not valid YAML where it was inserted: say so, and show the
/// rendered line.
pub(super) fn rendered_yaml_err(
    raw: &RawFile,
    rendered: &str,
    e: &serde_yaml::Error,
    overrides: &Overrides,
) -> PipelineError {
    let mut pe = yaml_err(&raw.file, e);
    if rendered == raw.text {
        return pe;
    }
    if let Some(line) = pe
        .line
        .and_then(|l| rendered.lines().nth(l.saturating_sub(1)))
    {
        let line = crate::text::visible_line(line.trim());
        pe.message = format!(
            "{} (after templates, line {} reads `{line}`)",
            pe.message,
            pe.line.unwrap_or(0)
        );
    }
    let from_cli: Vec<String> = overrides
        .pairs
        .iter()
        .filter_map(|p| p.split_once('='))
        .filter(|(k, _)| {
            let top = k.trim().split('.').next().unwrap_or_default();
            mentions(&raw.text, &format!("params.{top}"))
        })
        .map(|(k, v)| format!("-p {}={}", k.trim(), crate::text::visible_line(v)))
        .collect();
    if from_cli.is_empty() {
        pe.hint(
            "a parameter's value inserted by a template is not valid YAML there; quote the template (\"{{ params.NAME }}\") or give a plain value",
        )
    } else {
        pe.hint(format!(
            "the value given with {} is inserted here by a template and is not valid YAML there; give a plain value, or quote the template (\"{{{{ params.NAME }}}}\")",
            from_cli.join(", ")
        ))
    }
}
