//! Shared helpers for Ferry's benchmark targets: statistics and table printing.

pub mod cluster;
pub mod qemu;

use std::error::Error;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

/// The first three figures of `/proc/loadavg`, for a table's caption.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

/// For benches whose own executable also serves as hostd: when started as
/// `BENCH hostd CONFIG HOST`, runs that hostd and returns its exit code.
pub fn run_if_hostd(name: &str) -> Option<ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 || args[1] != "hostd" {
        return None;
    }
    hostd::init_logging("warn");
    Some(match hostd::daemon::run(Path::new(&args[2]), &args[3]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: hostd: {error:#}");
            ExitCode::FAILURE
        }
    })
}

/// Starts this executable as hostd `host` of `config` (see [`run_if_hostd`]), inside network
/// namespace `netns` if one is given, appending its output to `log`; `FERRY_BENCH_LOG` sets
/// its log level (default `warn`).
pub fn spawn_hostd(
    netns: Option<&str>,
    config: &Path,
    host: &str,
    log: &Path,
) -> Result<Child, Box<dyn Error>> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let exe = std::env::current_exe()?;
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    Ok(command
        .arg("hostd")
        .arg(config)
        .arg(host)
        .env(
            "RUST_LOG",
            std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// A benchmark's `main` body: runs `run` and, when it fails, prints the error and its causes
/// after `name`. (Call `ferry_vmm::run_if_vmm()` first where the bench starts VMMs.)
pub fn report_outcome(name: &str, run: impl FnOnce() -> Result<(), Box<dyn Error>>) -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error}");
            let mut cause = error.source();
            while let Some(inner) = cause {
                eprintln!("  caused by: {inner}");
                cause = inner.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// A positive number from the environment variable `name`, or `default` when it is unset.
pub fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => text
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{name}={text:?} is not a positive number")),
    }
}

/// A plain-text table whose columns are padded to their widest cell.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(headers: I) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells print empty.
    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table as text: header, rule, rows. The first column is left-aligned, the others
    /// right-aligned (they hold numbers).
    pub fn render(&self) -> String {
        let columns = self
            .headers
            .len()
            .max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let cell = |row: &[String], i: usize| row.get(i).cloned().unwrap_or_default();
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                std::iter::once(&self.headers)
                    .chain(&self.rows)
                    .map(|row| cell(row, i).chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |row: &[String]| {
            let mut out = String::new();
            for (i, width) in widths.iter().enumerate() {
                let text = cell(row, i);
                if i == 0 {
                    let _ = write!(out, "{text:<width$}");
                } else {
                    let _ = write!(out, "  {text:>width$}");
                }
            }
            out.trim_end().to_string()
        };
        let mut out = line(&self.headers);
        out.push('\n');
        out.push_str(
            &"-".repeat(widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1)),
        );
        for row in &self.rows {
            out.push('\n');
            out.push_str(&line(row));
        }
        out
    }
}

/// The median of `samples` (mean of the middle two for an even count); `NaN` when empty.
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Rate in GB/s (10^9 bytes per second).
pub fn gb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

/// User plus system CPU time consumed so far by this process, all threads included.
pub fn process_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage it is given, which is valid, writable storage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: the storage was zeroed before the call, so it is initialised whether or not the
    // call succeeded.
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns() {
        let mut table = Table::new(["case", "GB/s"]);
        table.row(["raw", "4.10"]);
        table.row(["ferry random", "3.5"]);
        assert_eq!(
            table.render(),
            "case          GB/s\n------------------\nraw           4.10\nferry random   3.5"
        );
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
