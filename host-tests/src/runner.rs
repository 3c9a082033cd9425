//! Runs scenario files in the host, in real Envoy (the wasm modules, or the native module in their
//! place), or both (the fidelity check), and reports.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Result;

use crate::envoy::{default_envoy, default_native_dir, run_envoy, Runtime};
use crate::scenario::{collect_files, render_table, run_host, CaseResult, ModuleCache, Outcome, ScenarioFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Host,
    Envoy,
    /// Real Envoy with the native module (`libfirebreak.so`) in place of the wasm modules; files of
    /// other modules (the test filters) are skipped.
    EnvoyNative,
    /// Both, and every case Envoy can run must get the same verdict from each.
    Both,
}

impl Mode {
    fn runs_host(self) -> bool {
        matches!(self, Mode::Host | Mode::Both)
    }

    fn runs_envoy(self) -> bool {
        self != Mode::Host
    }

    /// The report's two columns: the first result's runtime, then the second's.
    fn columns(self) -> [&'static str; 2] {
        match self {
            Mode::Host => ["host", "-"],
            Mode::Envoy => ["envoy", "-"],
            Mode::EnvoyNative => ["native", "-"],
            Mode::Both => ["host", "envoy"],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// Run every file against this module instead of the one the file names.
    pub module: Option<PathBuf>,
    pub envoy: PathBuf,
    /// Where `libfirebreak.so` is (`Mode::EnvoyNative`).
    pub native_dir: PathBuf,
}

impl Options {
    /// What runs the filters in Envoy.
    fn runtime(&self) -> Runtime {
        if self.mode == Mode::EnvoyNative {
            Runtime::Native { dir: self.native_dir.clone() }
        } else {
            Runtime::Wasm
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options { mode: Mode::Host, module: None, envoy: default_envoy(), native_dir: default_native_dir() }
    }
}

/// One row per case: the host's result, Envoy's, and where they disagree (in a one-runtime mode,
/// that runtime's result alone).
pub struct Report {
    pub rows: Vec<(CaseResult, Option<CaseResult>, Vec<String>)>,
    /// The runtimes of the two results (`Mode::columns`).
    pub columns: [&'static str; 2],
}

impl Report {
    pub fn failures(&self) -> usize {
        self.rows
            .iter()
            .filter(|(h, e, m)| {
                matches!(h.outcome, Outcome::Fail(_))
                    || e.as_ref().is_some_and(|e| matches!(e.outcome, Outcome::Fail(_)))
                    || !m.is_empty()
            })
            .count()
    }

    pub fn passes(&self) -> usize {
        self.rows.len() - self.failures()
    }

    pub fn table(&self) -> String {
        let mut t = render_table(&self.rows, self.columns);
        t.push_str(&format!("{} passed, {} failed\n", self.passes(), self.failures()));
        t
    }
}

pub fn run(paths: &[PathBuf], options: &Options) -> Result<Report> {
    let files = collect_files(paths)?;
    let mut scenarios = Vec::new();
    for file in &files {
        let scenario = ScenarioFile::load(file)?;
        let module_paths = scenario.module_paths(file, options.module.as_deref())?;
        scenarios.push((file.clone(), scenario, module_paths));
    }
    // The host runs, one after the other (each compiles its modules once, through the cache).
    let mut cache = ModuleCache::default();
    let mut host_results = Vec::new();
    for (file, scenario, module_paths) in &scenarios {
        host_results.push(if !options.mode.runs_host() {
            None
        } else {
            let modules: Result<Vec<_>> = module_paths.iter().map(|p| cache.get(p)).collect();
            Some(match modules {
                Ok(m) => run_host(file, scenario, m),
                Err(e) => vec![error_row(file, format!("{e:#}"))],
            })
        });
    }
    // The Envoy runs, two at a time: most of an Envoy run is waiting (start-up, callouts).
    let runtime = options.runtime();
    let envoy_results: Vec<Option<Vec<CaseResult>>> = if !options.mode.runs_envoy() {
        scenarios.iter().map(|_| None).collect()
    } else {
        // Runs in one process (tests in parallel threads) each get their own work directories.
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, Ordering::SeqCst);
        let next = AtomicUsize::new(0);
        let slots: Mutex<Vec<Option<Vec<CaseResult>>>> = Mutex::new(scenarios.iter().map(|_| None).collect());
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some((file, scenario, module_paths)) = scenarios.get(i) else { break };
                    let dir = std::env::temp_dir().join(format!("firebreak-scenarios-{}-{run}-{i}", std::process::id()));
                    let rows = run_envoy(file, scenario, module_paths, &runtime, &options.envoy, &dir);
                    if rows.iter().any(|r| matches!(r.outcome, Outcome::Fail(_))) {
                        // Kept, and its end printed, so a failure can be understood.
                        let log = dir.join("envoy.log");
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        let lines: Vec<&str> = text.lines().collect();
                        eprintln!(
                            "{}: a case failed in Envoy; its log is kept in {} (last 40 lines):\n{}",
                            file.display(),
                            log.display(),
                            lines[lines.len().saturating_sub(40)..].join("\n")
                        );
                    } else {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    if let Ok(mut s) = slots.lock() {
                        s[i] = Some(rows);
                    }
                });
            }
        });
        slots.into_inner().unwrap_or_default()
    };
    let mut rows = Vec::new();
    for (((file, scenario, _), host_rows), envoy_rows) in scenarios.iter().zip(host_results).zip(envoy_results) {
        match (host_rows, envoy_rows) {
            (Some(h), None) => rows.extend(h.into_iter().map(|h| (h, None, Vec::new()))),
            (None, Some(e)) => rows.extend(e.into_iter().map(|e| (e, None, Vec::new()))),
            (Some(h), Some(e)) => {
                let mut e_iter = e.into_iter().peekable();
                for hr in h {
                    let er = match e_iter.peek() {
                        Some(er) if er.case == hr.case => e_iter.next(),
                        _ => None,
                    };
                    let mismatch = match (&hr.observed, er.as_ref().and_then(|e| e.observed.as_ref())) {
                        (Some(a), Some(b)) => {
                            let signed = scenario.cases.iter().any(|c| c.name == hr.case && c.sign.is_some());
                            a.disagreements(b, signed)
                        }
                        _ => Vec::new(),
                    };
                    rows.push((hr, er, mismatch));
                }
                for er in e_iter {
                    rows.push((error_row(file, "no host row".into()), Some(er), Vec::new()));
                }
            }
            (None, None) => {}
        }
    }
    Ok(Report { rows, columns: options.mode.columns() })
}

fn error_row(file: &Path, message: String) -> CaseResult {
    CaseResult { file: file.display().to_string(), case: "(load)".into(), outcome: Outcome::Fail(vec![message]), observed: None }
}
