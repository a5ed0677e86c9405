//! The view while a run is going: a progress bar with the current figures
//! in a terminal, plain periodic lines otherwise (CI logs). Both go to
//! standard error, so standard output carries only the final table.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::{count, micros};

/// The figures of the last second, summed over workers.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub open: u64,
    pub attempted: u64,
    pub sent_per_sec: f64,
    pub received_per_sec: f64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub errors: u64,
}

enum Mode {
    Bar(ProgressBar),
    Lines { every: Duration, last: Option<Instant> },
    Quiet,
}

pub struct Live {
    mode: Mode,
    phase: String,
    /// The latest figures, kept on screen when the phase changes.
    figures: String,
}

impl Live {
    /// `enabled = false` prints nothing (`--quiet`).
    pub fn new(enabled: bool, max_connections: u64) -> Live {
        let mode = if !enabled {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar =
                ProgressBar::with_draw_target(Some(max_connections), ProgressDrawTarget::stderr_with_hz(4));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos:>6}/{len:6} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            Mode::Bar(bar)
        } else {
            Mode::Lines { every: Duration::from_secs(5), last: None }
        };
        Live { mode, phase: String::new(), figures: String::new() }
    }

    /// A new phase ("ramp 2/5 → 2000", "hold 2/5"), shown at once.
    pub fn phase(&mut self, phase: String) {
        if let Mode::Lines { .. } = self.mode {
            eprintln!("echo-loadgen: {phase}");
        }
        self.phase = phase;
        if let Mode::Bar(bar) = &self.mode {
            bar.set_message(format!("{} | {}", self.phase, self.figures));
        }
    }

    pub fn update(&mut self, s: &Snapshot) {
        let figures = format!(
            "open {}  sent {}/s  recv {}/s  p50 {}  p99 {}  errors {}",
            s.open,
            count(s.sent_per_sec),
            count(s.received_per_sec),
            s.p50_us.map_or("-".into(), micros),
            s.p99_us.map_or("-".into(), micros),
            s.errors
        );
        self.figures = figures.clone();
        match &mut self.mode {
            Mode::Bar(bar) => {
                bar.set_position(s.open);
                bar.set_message(format!("{} | {figures}", self.phase));
            }
            Mode::Lines { every, last } => {
                if last.is_none_or(|t| t.elapsed() >= *every) {
                    *last = Some(Instant::now());
                    eprintln!("echo-loadgen: {} | {figures}", self.phase);
                }
            }
            Mode::Quiet => {}
        }
    }

    /// A line that stays (a finished step), printed above the bar.
    pub fn note(&self, line: &str) {
        match &self.mode {
            Mode::Bar(bar) => bar.println(line),
            Mode::Lines { .. } => eprintln!("echo-loadgen: {line}"),
            Mode::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}
