//! `fpipe`: runs face-recognition experiments from YAML pipelines.
//!
//! Thin glue: parses arguments, builds the stage registry, calls the engine, prints.

/// `println!` for a long run: a reader that went away (`fpipe run F | head -1`) must not
/// stop the run or make it panic, so a failed write is ignored.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!` that ignores a closed stderr; see [`say!`].
macro_rules! say_err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod budget;
mod commands;
mod report;
mod term;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

// Training allocates and frees large tensors every step; the system allocator returns them to
// the OS and faults the pages back in (about half of candle's CPU time, see docs/benchmarks.md).
// `budget::Allocator` is mimalloc, reporting an allocation failure while a pipeline loads as
// bad input (see src/budget.rs).
#[global_allocator]
static GLOBAL: budget::Allocator = budget::Allocator;

#[derive(Parser)]
#[command(
    name = "fpipe",
    version,
    about = "Face-recognition experiments as content-addressed, cached YAML pipelines"
)]
struct Cli {
    /// Cache directory (default: `.fpipe/` beside the pipeline file; env FPIPE_CACHE).
    #[arg(long, global = true, env = "FPIPE_CACHE")]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Parameters shared by the commands that read a pipeline.
#[derive(clap::Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline file.
    pub file: PathBuf,
    /// Override a parameter: -p key=value (value read as YAML; dotted keys for nested ones).
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Parameter file(s) overriding the pipeline's `params:`.
    #[arg(long = "params", value_name = "FILE")]
    pub params_files: Vec<PathBuf>,
}

/// The most job slots `-j` takes: far above any machine's cores, and a bound on what the
/// scheduler sets aside for them.
const MAX_JOBS: u64 = 4096;
/// The most GPU slots `--gpus` takes (the largest nodes hold 8 to 16 GPUs).
const MAX_GPUS: u64 = 256;

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: only stages whose key changed are computed.
    Run(RunArgs),
    /// What would run and why.
    Status(StatusArgs),
    /// Check a pipeline without running it, and list every shell command it would run.
    Validate(ValidateArgs),
    /// Print the DAG as text, DOT or mermaid.
    Dag(DagArgs),
    /// Path of a stage's current output artifact (for scripts).
    Out(OutArgs),
    /// Summarise an artifact (a data set: images, identities, sizes).
    Inspect(InspectArgs),
    /// Table of reported metrics across runs.
    Show(ShowArgs),
    /// Remove artifacts that no recent run references.
    Gc(GcArgs),
    /// Cache maintenance and sharing.
    Cache(CacheArgs),
    /// List the stage kinds with their ports and parameters.
    Stages(StagesArgs),
    /// Write one self-contained HTML page of a run: metrics beside published numbers,
    /// overlaid curves, the DAG, log tails; optionally a second run side by side.
    Report(ReportArgs),
    /// Compute one stage from a job description (what a Slurm job runs on its node).
    #[command(name = "slurm-job", hide = true)]
    SlurmJob(commands::slurm::JobArgs),
}

/// Arguments of `fpipe report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// The pipeline file whose run to report.
    pub file: PathBuf,
    /// Where to write the page (default: reports/NAME.html in the cache).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Report the newest run with these pipeline parameters (-p key=value, as given to `run`).
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Show this run beside it: a run id (or a unique prefix) or `previous`.
    #[arg(long, value_name = "RUN")]
    pub compare: Option<String>,
    /// Show beside it the newest run with these parameters (repeatable).
    #[arg(long = "compare-param", value_name = "KEY=VALUE")]
    pub compare_params: Vec<String>,
    /// Print what the page holds (runs, plots) as JSON instead of the one line.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `fpipe run`.
#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Run only this stage and what it needs (repeatable).
    #[arg(long)]
    pub target: Vec<String>,
    /// Recompute this stage even if cached (repeatable).
    #[arg(long)]
    pub force: Vec<String>,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Parallel job slots (default: CPU count; 1 to 4096).
    #[arg(short = 'j', long, value_parser = clap::value_parser!(u64).range(1..=MAX_JOBS))]
    pub jobs: Option<u64>,
    /// GPU slots for stages declaring `resources: {gpu: N}` (default: every visible GPU: CUDA_VISIBLE_DEVICES, else what the driver reports; more than are visible is an error).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=MAX_GPUS))]
    pub gpus: Option<u64>,
    /// Device for the face stages: cpu, cuda or cuda:N (a stage given GPU slots runs on its slot's GPU); checked before anything runs.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print a line for every cached stage too.
    #[arg(short, long)]
    pub verbose: bool,
    /// Remote cache (s3://BUCKET/PREFIX, gs://..., az://..., file:///PATH) whose results are
    /// pulled before the run starts, and looked up by key for stages whose keys are known
    /// only during the run; credentials and endpoints come from the environment
    /// (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).
    #[arg(long, value_name = "URL", env = "FPIPE_REMOTE")]
    pub remote: Option<String>,
    /// After the run, upload to the remote what the pipeline's current state needs.
    #[arg(long, requires = "remote")]
    pub push: bool,
    #[command(flatten)]
    pub cluster: Box<commands::slurm::ClusterArgs>,
}

/// Arguments of `fpipe status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[arg(long)]
    pub target: Vec<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `fpipe validate`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The remote cache a run would use (shown, not contacted).
    #[arg(long, value_name = "URL", env = "FPIPE_REMOTE")]
    pub remote: Option<String>,
}

/// Arguments of `fpipe dag`.
#[derive(clap::Args)]
pub struct DagArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[arg(long, default_value = "text", value_parser = ["text", "dot", "mermaid"])]
    pub format: String,
}

/// Arguments of `fpipe out`.
#[derive(clap::Args)]
pub struct OutArgs {
    /// STAGE or STAGE.PORT
    pub stage: String,
    /// Pipeline file (default: the newest run record in the cache).
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
}

/// Arguments of `fpipe inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// STAGE or STAGE.PORT
    pub stage: String,
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `fpipe show`.
#[derive(clap::Args)]
pub struct ShowArgs {
    /// Only runs of this pipeline file.
    pub file: Option<PathBuf>,
    /// How many recent runs.
    #[arg(long, default_value_t = 10)]
    pub last: usize,
    /// Same as --format json.
    #[arg(long)]
    pub json: bool,
    /// Output format: an aligned table, CSV, a Markdown table, or JSON.
    #[arg(long, default_value = "table", value_parser = ["table", "csv", "markdown", "json"])]
    pub format: String,
}

/// Arguments of `fpipe gc`.
#[derive(clap::Args)]
pub struct GcArgs {
    /// Keep what the newest N run records reference (plus each pipeline's current outputs).
    #[arg(long, default_value_t = 5)]
    pub keep_runs: usize,
    #[arg(long)]
    pub dry_run: bool,
    /// Collect garbage on this remote cache instead: remove the remote artifacts that nothing
    /// this cache keeps references, and the records naming them. A dry run unless --yes.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// With --remote: really remove (after a dry run showed what goes).
    #[arg(long, requires = "remote")]
    pub yes: bool,
}

/// Arguments of `fpipe cache`.
#[derive(clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

/// Arguments of `fpipe stages`.
#[derive(clap::Args)]
pub struct StagesArgs {
    /// Only this kind.
    pub kind: Option<String>,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Rehash every artifact and report mismatches.
    Verify {
        /// Remove damaged entries so the next run recomputes them.
        #[arg(long)]
        repair: bool,
    },
    /// Copy this cache's entries to a remote cache URL or into another cache directory.
    ///
    /// To a URL (s3://BUCKET/PREFIX, gs://..., az://..., file:///PATH): the artifacts and
    /// action records FILE's current state needs (everything with --all or no FILE), only
    /// what the remote lacks. To a directory: everything, verified on arrival.
    Push {
        /// Remote URL, or a cache directory.
        dest: String,
        /// Push what this pipeline's current state needs (its cache: --cache, else the
        /// pipeline's `.fpipe/`).
        #[arg(conflicts_with = "all")]
        file: Option<PathBuf>,
        /// Push everything in the cache.
        #[arg(long)]
        all: bool,
        /// Override a parameter of FILE: -p key=value.
        #[arg(
            short = 'p',
            long = "param",
            value_name = "KEY=VALUE",
            requires = "file"
        )]
        params: Vec<String>,
        /// Parameter file(s) for FILE.
        #[arg(long = "params", value_name = "FILE", requires = "file")]
        params_files: Vec<PathBuf>,
    },
    /// Copy another cache's entries into this one (verified on arrival).
    ///
    /// Artifacts are checked against their hashes, but an action record is trusted like code
    /// you run: it says which result a stage key has. `--check N --pipeline FILE` recomputes N
    /// stages of FILE whose cached results came from this pull and refuses the pull (removes
    /// every record it added, exits 1) if any result differs.
    ///
    /// From a remote URL, every artifact is rehashed before it is stored, and each record
    /// pulled says where it came from (`pulled_from` URL, shown by `status` and `cache verify`).
    #[command(group(clap::ArgGroup::new("the_pipeline").args(["file", "pipeline"])))]
    Pull {
        /// Remote URL, or a cache directory.
        src: String,
        /// From a remote URL: pull only what this pipeline needs (the records of its stages'
        /// keys, then of the keys their outputs make known), into its cache.
        file: Option<PathBuf>,
        /// Recompute this many pulled stages of the pipeline (chosen at random, reproducibly
        /// with --seed) and refuse the pull on any mismatch. Needs FILE or --pipeline.
        #[arg(long, value_name = "N", requires = "the_pipeline")]
        check: Option<usize>,
        /// The pipeline whose stages --check recomputes (its cache: --cache, else the
        /// pipeline's `.fpipe/`).
        #[arg(long, value_name = "FILE", requires = "check", conflicts_with = "file")]
        pipeline: Option<PathBuf>,
        /// Override a parameter of the pipeline: -p key=value.
        #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Parameter file(s) for the pipeline.
        #[arg(long = "params", value_name = "FILE")]
        params_files: Vec<PathBuf>,
        /// Seed of the choice of stages to recompute (default: random, printed).
        #[arg(long, requires = "check")]
        seed: Option<u64>,
    },
}

/// Keeps freed memory in the process instead of returning it to the OS after 10 ms: a training
/// step frees and reallocates the same large buffers, and each return made the next step fault
/// and zero every page again (55 % of a MobileFaceNet step; docs/benchmarks.md). Options the
/// user sets through MIMALLOC_* variables win.
fn tune_allocator() {
    // Indices of mi_option_e in the mimalloc 2.x header bundled by libmimalloc-sys.
    const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set only stores an integer option; valid at any time.
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) && !uses_network(&cli.command) {
        // A command whose output is piped into `head` ends quietly when the reader goes
        // away, as other Unix tools do, instead of panicking on the broken pipe. `run`
        // keeps going instead (see `say!`): its stages must finish and be recorded.
        #[cfg(unix)]
        // SAFETY: setting a signal's disposition to the default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let bad_input = e
                .downcast_ref::<fpipe_engine::EngineError>()
                .is_some_and(|e| e.is_bad_input())
                || e.downcast_ref::<commands::BadInput>().is_some();
            say_err!(
                "error: {}",
                fpipe_engine::text::visible(&format!("{e:#}"), true)
            );
            if disk_full(&e) {
                say_err!("  hint: the disk holding the cache is full; free space (`fpipe gc` removes artifacts no recent run uses) or point --cache elsewhere, then run again: stages that finished are cached, and nothing half-written is used");
            }
            ExitCode::from(if bad_input { 2 } else { 1 })
        }
    }
}

/// Whether the command talks to a remote cache: a connection the server closes must be an
/// error of that request (EPIPE), not a SIGPIPE that kills fpipe half way through a transfer.
fn uses_network(c: &Command) -> bool {
    match c {
        Command::Cache(CacheArgs {
            command: CacheCommand::Push { dest: url, .. } | CacheCommand::Pull { src: url, .. },
        }) => fpipe_remote::is_url(url),
        Command::Gc(g) => g.remote.is_some(),
        _ => false,
    }
}

/// Whether an error comes from a full disk (ENOSPC) anywhere in its chain. A cache error
/// carries its OS error in its message rather than as a source, so it is asked directly.
fn disk_full(e: &anyhow::Error) -> bool {
    let full = |k: std::io::ErrorKind| k == std::io::ErrorKind::StorageFull;
    let cache_full = |c: &fpipe_cache::CacheError| c.io_kind().is_some_and(full);
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| full(io.kind()))
            || c.downcast_ref::<fpipe_cache::CacheError>()
                .is_some_and(cache_full)
            || matches!(
                c.downcast_ref::<fpipe_engine::EngineError>(),
                Some(fpipe_engine::EngineError::Cache(c)) if cache_full(c)
            )
    })
}
