//! The terminal display of a run: live bars on a terminal, plain lines otherwise.

use fpipe_engine::records::StageState;
use fpipe_engine::{Event, Reporter};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shows stage events on stderr.
pub struct Terminal {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
    last_plain: Mutex<HashMap<String, Instant>>,
    show_cached: bool,
}

impl Terminal {
    /// `show_cached`: print a line per cached stage too.
    pub fn new(show_cached: bool) -> Self {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Terminal {
            multi,
            bars: Mutex::new(HashMap::new()),
            last_plain: Mutex::new(HashMap::new()),
            show_cached,
        }
    }

    /// Prints one event line. Control characters from pipeline files and stage logs are
    /// made visible first, so they cannot rewrite what the terminal shows.
    fn line(&self, s: String) {
        let s = fpipe_engine::text::visible(&s, true).into_owned();
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => say_err!("{s}"),
        }
    }
}

impl Reporter for Terminal {
    fn event(&self, e: Event<'_>) {
        match e {
            Event::Begin { .. } => {}
            Event::Start { name, kind, reason } => {
                self.line(format!("▶ {name} ({kind}): {reason}"));
                if let Some(m) = &self.multi {
                    let bar = m.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(
                            "  {spinner} {prefix} [{elapsed_precise}] {wide_msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_prefix(name.to_string());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    if let Ok(mut bars) = self.bars.lock() {
                        bars.insert(name.to_string(), bar);
                    }
                }
            }
            Event::Warning { message } => self.line(format!("warning: {message}")),
            Event::Waiting { name } => {
                self.line(format!("… {name}: another fpipe process is computing this stage; waiting for its result"));
            }
            Event::Progress {
                name,
                done,
                total,
                message,
            } => {
                if self.multi.is_some() {
                    if let Some(bar) = self.bars.lock().ok().and_then(|b| b.get(name).cloned()) {
                        if total > 0 && bar.length() != Some(total) {
                            bar.set_length(total);
                            bar.set_style(
                                ProgressStyle::with_template(
                                    "  {prefix} [{elapsed_precise}] {bar:30} {pos}/{len} eta {eta} {wide_msg}",
                                )
                                .unwrap_or_else(|_| ProgressStyle::default_bar()),
                            );
                        }
                        bar.set_position(done);
                        bar.set_message(fpipe_engine::text::visible_line(message).into_owned());
                    }
                } else {
                    // Logs and CI: a line every 30 s per stage at most.
                    let mut last = match self.last_plain.lock() {
                        Ok(l) => l,
                        Err(_) => return,
                    };
                    let now = Instant::now();
                    let due = last
                        .get(name)
                        .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(30));
                    if due {
                        last.insert(name.to_string(), now);
                        drop(last);
                        self.line(format!("  {name}: {done}/{total} {message}"));
                    }
                }
            }
            Event::Finish {
                name,
                state,
                seconds,
                error,
            } => {
                if let Some(bar) = self.bars.lock().ok().and_then(|mut b| b.remove(name)) {
                    bar.finish_and_clear();
                }
                let line = match state {
                    StageState::Ran => format!("✓ {name} ran in {seconds:.2} s"),
                    StageState::Cached if self.show_cached => format!("= {name} cached"),
                    StageState::Cached => return,
                    StageState::Failed => format!(
                        "✗ {name} failed after {seconds:.2} s: {}",
                        error.unwrap_or("")
                    ),
                    StageState::Skipped => format!("- {name} skipped: an input failed"),
                    StageState::Interrupted => format!("✗ {name} interrupted"),
                    StageState::NotRun => return,
                };
                self.line(line);
            }
        }
    }
}
