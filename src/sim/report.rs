//! What a run reports: a row per round (`rounds.csv`, `rounds.jsonl`, appended as each round
//! closes), a summary per strategy over the seeds, the markdown table and the plot.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::config::FleetConfig;
use crate::plot::{Series, line_plot};

/// One round of one run, as written to `rounds.csv`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRow {
    /// Strategy label.
    pub strategy: String,
    /// Seed.
    pub seed: u64,
    /// Round (0-based).
    pub round: u64,
    /// Test accuracy of the global head after the round.
    pub test_accuracy: f64,
    /// Validation accuracy (NaN without a validation split).
    pub validation_accuracy: f64,
    /// Test loss.
    pub test_loss: f64,
    /// Mean local training loss of the accepted updates.
    pub train_loss: f64,
    /// Mean Σ KL of the client heads to their targets.
    pub mean_kl: f64,
    /// Accepted updates.
    pub accepted: usize,
    /// Wall time of the round.
    pub wall_ms: u64,
    /// Update bytes received.
    pub bytes_in: u64,
    /// The attempt at this round number (a failed attempt is tried again).
    #[serde(default)]
    pub attempt: u32,
    /// The attempt closed below quorum: the head did not move and nothing was evaluated.
    #[serde(default)]
    pub failed: bool,
    /// The head this round started from on the clients' held-out rows (federated
    /// evaluation): the row-weighted mean accuracy (NaN without `eval_fraction`).
    #[serde(default = "nan")]
    pub federated_accuracy: f64,
    /// The spread of the clients' held-out accuracies (weighted standard deviation).
    #[serde(default = "nan")]
    pub federated_accuracy_std: f64,
    /// Client drift: the mean cosine between a client's step and the round's step (NaN for a
    /// failed attempt; per-tensor figures are in `aggregator-rounds.jsonl`).
    #[serde(default = "nan")]
    pub step_cosine: f64,
    /// The round's step length over the clients' mean step length.
    #[serde(default = "nan")]
    pub step_agreement: f64,
    /// The spread of the clients' scope means (in units of their σ), averaged over tensors.
    #[serde(default = "nan")]
    pub mean_spread: f64,
    /// The coefficient of variation of the clients' σ, averaged over tensors.
    #[serde(default = "nan")]
    pub std_spread: f64,
    /// The target σ̃ of the first scoped tensor after the round (the input-side layer; μ̃ and
    /// σ̃ of every tensor are in `aggregator-rounds.jsonl`).
    #[serde(default = "nan")]
    pub target_std_first: f64,
    /// The target σ̃ of the last scoped tensor (the logits layer, where label skew acts).
    #[serde(default = "nan")]
    pub target_std_last: f64,
    /// Under client-level DP, ε spent so far at the run's δ (NaN without DP).
    #[serde(default = "nan")]
    pub epsilon: f64,
    /// Under DP, the clip norm the round used.
    #[serde(default = "nan")]
    pub dp_clip: f64,
}

fn nan() -> f64 {
    f64::NAN
}

/// A strategy's figures over the seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StrategySummary {
    /// Strategy label.
    pub strategy: String,
    /// Test accuracy after the last round: mean, std over seeds.
    pub final_accuracy: (f64, f64),
    /// Best test accuracy over the rounds.
    pub best_accuracy: (f64, f64),
    /// Mean test accuracy of the last 10 rounds (or all, if fewer): the headline under skew.
    pub last10_accuracy: (f64, f64),
    /// First round (1-based count) reaching the target, per seed; `None`: never.
    pub rounds_to_target: Vec<Option<u64>>,
    /// Mean validation accuracy of the last 10 rounds (NaN without a validation split).
    pub last10_validation_accuracy: (f64, f64),
    /// Median round wall time, ms.
    pub median_round_ms: f64,
}

/// What a fleet run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetSummary {
    /// The configuration.
    pub config: FleetConfig,
    /// Per strategy (and "centralized").
    pub strategies: Vec<StrategySummary>,
    /// Label skew of each seed's partition (0: IID).
    pub partition_skew: Vec<f64>,
    /// Training rows, test rows, feature width.
    pub data_shape: (usize, usize, usize),
    /// Seconds spent getting the features.
    pub feature_seconds: f64,
    /// Seconds of the whole run.
    pub total_seconds: f64,
    /// Seconds from the start to the first run: the features, and the credentials of every
    /// client.
    #[serde(default)]
    pub setup_seconds: f64,
    /// Peak resident memory of the simulator's process, MiB: the aggregator (and the shared
    /// feature matrix), plus every client unless they ran in their own processes.
    pub peak_rss_mib: Option<f64>,
    /// Under a pool of virtual clients: each worker's peak resident memory, MiB (the largest
    /// over the sweep's runs).
    #[serde(default)]
    pub workers_peak_rss_mib: Vec<f64>,
    /// The plot.
    pub plot: PathBuf,
}

/// The mean and the sample std of `values` (NaN mean for none).
pub(crate) fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

pub(crate) fn summarize(
    label: &str,
    rows: &[RoundRow],
    seeds: &[u64],
    target: f64,
) -> StrategySummary {
    let per_seed: Vec<Vec<&RoundRow>> = seeds
        .iter()
        .map(|s| {
            rows.iter()
                .filter(|r| r.seed == *s && r.strategy == label && !r.failed)
                .collect()
        })
        .collect();
    let finals: Vec<f64> = per_seed
        .iter()
        .filter_map(|r| r.last().map(|r| r.test_accuracy))
        .collect();
    let bests: Vec<f64> = per_seed
        .iter()
        .map(|r| r.iter().map(|r| r.test_accuracy).fold(0.0, f64::max))
        .collect();
    let last10: Vec<f64> = per_seed
        .iter()
        .map(|r| {
            let tail = &r[r.len().saturating_sub(10)..];
            tail.iter().map(|r| r.test_accuracy).sum::<f64>() / tail.len().max(1) as f64
        })
        .collect();
    let last10_val: Vec<f64> = per_seed
        .iter()
        .map(|r| {
            let tail = &r[r.len().saturating_sub(10)..];
            tail.iter().map(|r| r.validation_accuracy).sum::<f64>() / tail.len().max(1) as f64
        })
        .collect();
    let mut walls: Vec<f64> = per_seed
        .iter()
        .flatten()
        .map(|r| r.wall_ms as f64)
        .collect();
    walls.sort_by(f64::total_cmp);
    StrategySummary {
        strategy: label.to_owned(),
        final_accuracy: mean_std(&finals),
        best_accuracy: mean_std(&bests),
        last10_accuracy: mean_std(&last10),
        last10_validation_accuracy: mean_std(&last10_val),
        rounds_to_target: per_seed
            .iter()
            .map(|r| {
                r.iter()
                    .find(|r| r.test_accuracy >= target)
                    .map(|r| r.round + 1)
            })
            .collect(),
        median_round_ms: walls.get(walls.len() / 2).copied().unwrap_or(f64::NAN),
    }
}

/// The markdown table of a run.
pub fn markdown_table(summary: &FleetSummary) -> String {
    let pm = |(m, s): (f64, f64)| {
        if summary.config.seeds.len() > 1 {
            format!("{:.4} ± {:.4}", m, s)
        } else {
            format!("{m:.4}")
        }
    };
    let mut t = format!(
        "| strategy | final | best | mean of last 10 | rounds to {:.0}% | median round ms | validation, last 10 |\n|---|---|---|---|---|---|---|\n",
        summary.config.target_accuracy * 100.0
    );
    for s in &summary.strategies {
        let reach: Vec<String> = s
            .rounds_to_target
            .iter()
            .map(|r| r.map_or("—".into(), |r| r.to_string()))
            .collect();
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {} |\n",
            s.strategy,
            pm(s.final_accuracy),
            pm(s.best_accuracy),
            pm(s.last10_accuracy),
            reach.join(", "),
            s.median_round_ms,
            if s.last10_validation_accuracy.0.is_nan() {
                "—".to_owned()
            } else {
                pm(s.last10_validation_accuracy)
            }
        ));
    }
    t
}

/// The rounds of a sweep as they close, appended to `rounds.csv` and `rounds.jsonl` and
/// flushed row by row, so that a sweep stopped hours in keeps every round it finished and
/// `--resume` can continue it.
pub(crate) struct RoundLog {
    csv: csv::Writer<File>,
    jsonl: File,
}

impl RoundLog {
    /// A new log in `out`, replacing any earlier one, holding `rows` already.
    pub(crate) fn create(out: &Path, rows: &[RoundRow]) -> Result<Self> {
        // Written beside and renamed over, so a resumed sweep's rows are never half-rewritten.
        let (csv_path, jsonl_path) = (out.join("rounds.csv"), out.join("rounds.jsonl"));
        let mut csv = csv::Writer::from_writer(Vec::new());
        let mut jsonl = Vec::new();
        for row in rows {
            csv.serialize(row)?;
            serde_json::to_writer(&mut jsonl, row)?;
            jsonl.push(b'\n');
        }
        support::fs::write_atomic(&csv_path, &csv.into_inner().map_err(|e| e.into_error())?)
            .with_context(|| format!("writing {}", csv_path.display()))?;
        support::fs::write_atomic(&jsonl_path, &jsonl)
            .with_context(|| format!("writing {}", jsonl_path.display()))?;
        let append = |path: &Path| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))
        };
        Ok(Self {
            // An empty file gets its header with the first row.
            csv: csv::WriterBuilder::new()
                .has_headers(rows.is_empty())
                .from_writer(append(&csv_path)?),
            jsonl: append(&jsonl_path)?,
        })
    }

    /// Appends `row` to both files and flushes them.
    pub(crate) fn append(&mut self, row: &RoundRow) -> Result<()> {
        self.csv.serialize(row)?;
        self.csv.flush()?;
        let mut line = serde_json::to_vec(row)?;
        line.push(b'\n');
        self.jsonl.write_all(&line)?;
        self.jsonl.flush()?;
        Ok(())
    }
}

/// The rows of `rounds.csv` in `out` up to the first unreadable one: what an interrupted
/// sweep finished. A last line without its newline is one a crash cut short (it may still
/// parse, with a number cut), so it is dropped; no file is no rows.
pub(crate) fn read_rounds(out: &Path) -> Result<Vec<RoundRow>> {
    let path = out.join("rounds.csv");
    let mut text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !text.ends_with(b"\n") {
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        text.truncate(whole);
    }
    let mut reader = csv::Reader::from_reader(text.as_slice());
    let mut rows = Vec::new();
    for (i, row) in reader.deserialize::<RoundRow>().enumerate() {
        match row {
            Ok(row) => rows.push(row),
            Err(e) => {
                tracing::warn!(line = i + 2, error = %e, "rounds.csv ends in an unreadable row; \
                    the sweep continues from the rows before it");
                break;
            }
        }
    }
    Ok(rows)
}

/// This process's peak resident memory (VmHWM), in MiB; `None` off Linux.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A figure of every round, as plotted: its file in the run folder, its axis, and the
/// values drawn for each run (one line each, named after the run and the part).
pub(crate) struct Plotted {
    file: &'static str,
    y_label: &'static str,
    parts: &'static [(&'static str, RowValue)],
}

/// One figure of a round's row.
type RowValue = fn(&RoundRow) -> f64;

/// The run folder's plots: test accuracy; client drift (the mean cosine between the clients'
/// steps and the round's step) and the target σ̃ of the first and last tensors (issue 17).
pub(crate) const PLOTS: [Plotted; 3] = [
    Plotted {
        file: "accuracy.png",
        y_label: "test accuracy",
        parts: &[("", |r| r.test_accuracy)],
    },
    Plotted {
        file: "drift.png",
        y_label: "mean cosine of client step to round step",
        parts: &[("", |r| r.step_cosine)],
    },
    Plotted {
        file: "targets.png",
        y_label: "target σ̃",
        parts: &[
            ("first tensor", |r| r.target_std_first),
            ("last tensor", |r| r.target_std_last),
        ],
    },
];

/// Plots `plotted`'s mean over the seeds, round by round, of every run in `labels` into the
/// run folder.
pub(crate) fn write_plot(
    cfg: &FleetConfig,
    rows: &[RoundRow],
    labels: &[String],
    plotted: &Plotted,
) -> Result<PathBuf> {
    let mut series = Vec::new();
    for label in labels {
        for (part, value) in plotted.parts {
            // The mean over seeds, round by round.
            let mut by_round: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
            for r in rows.iter().filter(|r| &r.strategy == label && !r.failed) {
                by_round.entry(r.round).or_default().push(value(r));
            }
            let points = by_round
                .iter()
                .map(|(round, values)| {
                    let mean = values.iter().sum::<f64>() / values.len() as f64;
                    ((round + 1) as f64, mean)
                })
                .collect();
            let name = if part.is_empty() {
                label.clone()
            } else {
                format!("{label}: {part}")
            };
            series.push(Series { name, points });
        }
    }
    let plot = cfg.out.join(plotted.file);
    line_plot(
        &plot,
        &format!(
            "{} clients, {} per round, {:?}",
            cfg.clients, cfg.per_round, cfg.partition
        ),
        "round",
        plotted.y_label,
        &series,
    )?;
    Ok(plot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(round: u64) -> RoundRow {
        RoundRow {
            strategy: "wsa:10:mean-std".into(),
            seed: 0,
            round,
            test_accuracy: 0.5,
            validation_accuracy: f64::NAN,
            test_loss: 1.0,
            train_loss: 1.0,
            mean_kl: 0.0,
            accepted: 4,
            wall_ms: 10,
            bytes_in: 100,
            attempt: 0,
            failed: false,
            federated_accuracy: 0.625,
            federated_accuracy_std: 0.125,
            step_cosine: 0.5,
            step_agreement: 0.25,
            mean_spread: f64::NAN,
            std_spread: 0.1,
            target_std_first: 0.03,
            target_std_last: 0.06,
            epsilon: f64::NAN,
            dp_clip: f64::NAN,
        }
    }

    #[test]
    fn the_log_appends_and_a_line_a_crash_cut_is_not_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            read_rounds(dir.path()).unwrap().is_empty(),
            "no file, no rows"
        );
        let mut log = RoundLog::create(dir.path(), &[]).unwrap();
        log.append(&row(0)).unwrap();
        log.append(&row(1)).unwrap();
        drop(log);
        let back = read_rounds(dir.path()).unwrap();
        assert_eq!(back.iter().map(|r| r.round).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(back[1].federated_accuracy_std, 0.125);
        // Cut inside the last number: still a well-formed row, but not a whole line.
        let path = dir.path().join("rounds.csv");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() - 3]).unwrap();
        let back = read_rounds(dir.path()).unwrap();
        assert_eq!(back.len(), 1);
        // A resumed log keeps the rows it is given, header once, and appends after them.
        let mut log = RoundLog::create(dir.path(), &back).unwrap();
        log.append(&row(1)).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("strategy,").count(), 1, "{text}");
        assert_eq!(read_rounds(dir.path()).unwrap().len(), 2);
        let jsonl = std::fs::read_to_string(dir.path().join("rounds.jsonl")).unwrap();
        assert_eq!(jsonl.lines().count(), 2);
    }
}
