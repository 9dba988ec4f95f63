//! `fpipe run --executor slurm` options, and `fpipe slurm-job` (hidden): what a Slurm job runs
//! on its node to compute one stage.

use super::*;
use fpipe_engine::exec::slurm::{self, JobDescription, JobOutcome, SlurmOptions};
use fpipe_engine::exec::Executor;

/// Jobs in flight at once under `--executor slurm` without `-j`: every ready stage (the
/// cluster's own limits apply on top).
pub const MAX_IN_FLIGHT: usize = 4096;

/// Where `fpipe run` computes stages, and how it submits them to Slurm.
#[derive(clap::Args, Clone)]
pub struct ClusterArgs {
    /// Where stages compute: `local` (this machine) or `slurm` (each stage that must compute
    /// is one `sbatch` job; the cache and the fpipe binary must be on a file system the
    /// compute nodes see). Under `slurm`, `-j` bounds the jobs in flight (default: no bound).
    #[arg(long, value_parser = ["local", "slurm"], default_value = "local")]
    pub executor: String,
    /// Slurm partition of every job (`sbatch --partition`).
    #[arg(long, value_name = "NAME", env = "FPIPE_SLURM_PARTITION")]
    pub partition: Option<String>,
    /// Slurm account charged for every job (`sbatch --account`).
    #[arg(long, value_name = "NAME", env = "FPIPE_SLURM_ACCOUNT")]
    pub account: Option<String>,
    /// Slurm QOS of every job (`sbatch --qos`).
    #[arg(long, value_name = "NAME", env = "FPIPE_SLURM_QOS")]
    pub qos: Option<String>,
    /// Any other `sbatch` option for every job, as one word (repeatable):
    /// `--slurm-opt=--constraint=a100 --slurm-opt=--exclusive`. A stage's own resources
    /// (`cpu`, `gpu`, `mem`, `time`) come after these and win.
    #[arg(long = "slurm-opt", value_name = "OPTION", allow_hyphen_values = true)]
    pub slurm_opts: Vec<String>,
    /// Times a stage is submitted again after its job is lost to NODE_FAIL or PREEMPTED
    /// (a stage's `retries:` overrides it; a failing command is never retried).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retries: u32,
    /// The fpipe binary the jobs run (default: this one); it must be on a path the compute
    /// nodes see.
    #[arg(long, value_name = "PATH", env = "FPIPE_SLURM_FPIPE")]
    pub slurm_fpipe: Option<PathBuf>,
}

impl ClusterArgs {
    /// The executor these arguments ask for, checked (Slurm tools on the PATH, a binary the
    /// nodes can run); warnings are printed.
    pub fn executor(&self, cache: &Path) -> Result<Executor> {
        if self.executor == "local" {
            return Ok(Executor::Local);
        }
        let fpipe = match &self.slurm_fpipe {
            Some(p) => std::path::absolute(p).unwrap_or_else(|_| p.clone()),
            None => std::env::current_exe().context("finding this fpipe binary")?,
        };
        let mut sbatch_args = Vec::new();
        for (flag, v) in [
            ("--partition", &self.partition),
            ("--account", &self.account),
            ("--qos", &self.qos),
        ] {
            if let Some(v) = v {
                sbatch_args.push(format!("{flag}={v}"));
            }
        }
        for o in &self.slurm_opts {
            if !o.starts_with('-') {
                bail!("--slurm-opt `{o}` is not an sbatch option; write it as one word, e.g. --slurm-opt=--constraint=a100");
            }
            sbatch_args.push(o.clone());
        }
        let opts = SlurmOptions {
            fpipe,
            sbatch_args,
            retries: self.retries,
        };
        for w in slurm::preflight(&opts, cache)? {
            say_err!("warning: {w}");
        }
        Ok(Executor::Slurm(opts))
    }
}

/// Arguments of `fpipe slurm-job`.
#[derive(clap::Args)]
pub struct JobArgs {
    /// The job description the controller wrote.
    pub description: PathBuf,
}

/// `fpipe slurm-job DESCRIPTION`: computes one stage on a compute node and writes its outcome
/// where the controller looks for it. The exit status is the stage's: 0 when it ran (or
/// another process computed it first), 1 when it failed, 130 when it was stopped.
pub fn job(registry: Registry, args: JobArgs) -> Result<ExitCode> {
    let started = fpipe_engine::records::now_unix();
    let desc = JobDescription::read(&args.description)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    // scancel and a time limit send SIGTERM first: stop the stage, publish nothing.
    let _ = ctrlc::set_handler(move || c.store(true, Ordering::SeqCst));
    let outcome = match plan_and_run(registry, &desc, cancel) {
        Ok(o) => o,
        Err(e) => JobOutcome::failed(format!("{e:#}"), started),
    };
    if let Some(m) = &outcome.message {
        say_err!("fpipe slurm-job: stage `{}`: {m}", desc.stage);
    }
    outcome.write(&desc.outcome)?;
    Ok(ExitCode::from(outcome.exit_code()))
}

fn plan_and_run(
    registry: Registry,
    desc: &JobDescription,
    cancel: Arc<AtomicBool>,
) -> Result<JobOutcome> {
    let plan = crate::budget::while_loading(|| {
        fpipe_engine::load_plan(
            &desc.pipeline,
            &Overrides {
                files: vec![desc.params_file.clone()],
                pairs: vec![],
            },
            &registry,
        )
    })?;
    let store = open_store(&desc.cache)?;
    let engine = Engine { store, registry };
    let reporter: Arc<dyn Reporter> = Arc::new(fpipe_engine::Quiet);
    Ok(engine.run_job(&plan, desc, cancel, &reporter))
}
