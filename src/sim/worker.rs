//! A worker of a pool of virtual clients (`wsa-fl worker`): it follows the run from the
//! welcomes its clients get, and for each (round, attempt) acts as its share of the sample,
//! the same one the engine draws ([`round_sample`]). Each sampled client is built from its
//! index (rows, derived token), checks in over real QUIC with its own identity, answers its
//! one task and leaves ([`Visit`]); nothing of it is kept after. Workers never talk to each
//! other or to the coordinator: the aggregator's welcomes are the only shared state, so they
//! run the same on one machine or many.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aggregator_core::engine::{round_sample, sample_sizes};
use aggregator_core::strategy::{Aggregation, Strategy};
use anyhow::{Context, Result, ensure};
use edge_client::LocalData;
use edge_client::net::{ClientReport, ConnectOptions, RunEnd, Visit};
use tokio::sync::watch;
use wsa::{HeadSpec, LabelledFeatures};

use super::config::{FleetConfig, engine_config};
use super::data::{ClientRows, Dataset, hold_out, load_data};
use super::report::peak_rss_mib;
use super::run::adversaries;
use crate::fleet::Deployment;

/// Probes past the last round that must fail in a row before a worker takes the aggregator for
/// gone (each tries twice, with a 2 s idle timeout).
const UNREACHABLE_PROBES: u32 = 3;

/// Where a worker writes its peak RSS (MiB) when it ends, in the fleet folder.
pub(crate) fn rss_file(fleet: &Path, seed: u64, index: usize) -> std::path::PathBuf {
    fleet
        .join("workers")
        .join(format!("seed{seed}-worker{index}.rss"))
}

/// The body of `wsa-fl worker`: worker `index` of `workers` for the run of `seed` in the fleet
/// folder `fleet` (its `config.json` and `creds/`), against `server`, until the run ends.
pub fn run_worker(
    folder: &Path,
    server: SocketAddr,
    server_name: &str,
    seed: u64,
    index: usize,
    workers: usize,
) -> Result<()> {
    let path = folder.join("config.json");
    let cfg = FleetConfig::load(&path)?;
    let pool = cfg
        .pool
        .clone()
        .with_context(|| format!("{} runs no pool of virtual clients", path.display()))?;
    ensure!(
        workers == pool.workers && index < workers,
        "worker {index} of {workers}: the run has {} workers (index 0 to {})",
        pool.workers,
        pool.workers.saturating_sub(1)
    );
    ensure!(
        cfg.seeds.contains(&seed),
        "seed {seed} is not one of the run's seeds {:?}",
        cfg.seeds
    );
    let Dataset {
        train: all,
        classes,
        ..
    } = load_data(&cfg.data)?;
    // Without a validation split the rows are the clients' as they are: no second copy.
    let train = if cfg.validation_fraction == 0.0 {
        all
    } else {
        hold_out(&cfg, &all, seed)?.0
    };
    let rows = ClientRows::new(&cfg, &train, seed)?;
    // The engine's sampling of this run; the strategy does not change it.
    let engine = engine_config(
        &cfg,
        &HeadSpec::mlp(train.dim(), &cfg.hidden, train.classes()),
        Strategy::FedAvg,
        Aggregation::Mean,
        seed,
    );
    let (_, select) = sample_sizes(&engine.sampling, engine.quorum, cfg.clients);
    let population = sorted_population(cfg.clients);
    let fleet = Fleet {
        cfg: &cfg,
        deployment: cfg.transport(Deployment::open(&folder.join("creds"))),
        server,
        server_name,
        train,
        classes,
        rows,
        patience: Duration::from_millis(pool.patience_ms),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        // Where the run is believed to stand, and the last (round, attempt) this worker
        // answered, still open while others finish it.
        let mut state = (0u64, 0u32);
        let mut previous = None;
        // This worker's clients that answered the task of `state` (they are not sent again).
        let mut done: Vec<usize> = Vec::new();
        // Probes past the last round in a row that could not reach the aggregator.
        let mut unreachable = 0;
        loop {
            let past_the_end = state.0 >= cfg.rounds;
            let sample = round_sample(engine.seed, state.0, state.1, cfg.clients, select);
            let mine: Vec<usize> = sample
                .iter()
                .enumerate()
                .filter(|(k, _)| k % workers == index)
                .map(|(_, &position)| population[position] as usize)
                .filter(|i| !done.contains(i))
                // Past the last round one client asks where the run stands.
                .take(if past_the_end { 1 } else { usize::MAX })
                .collect();
            let visit = Visit {
                expect: state,
                or_after: previous,
                patience: fleet.patience,
                last_round: state.0 + 1 == cfg.rounds,
                recheck: false,
            };
            tracing::debug!(index, ?state, ?previous, clients = mine.len(), "visiting");
            let reports = fleet.visit(&mine, visit, past_the_end).await?;
            if reports
                .iter()
                .any(|r| r.as_ref().is_some_and(|r| r.end == RunEnd::RunFinished))
            {
                break;
            }
            let seen = reports
                .iter()
                .flatten()
                .filter_map(|r| r.last_welcome)
                .max();
            if past_the_end && (reports.iter().any(Option::is_none) || seen.is_none()) {
                // Gone, or too busy to answer: three probes in a row (some 15 s) say gone.
                unreachable += 1;
                if unreachable >= UNREACHABLE_PROBES {
                    break;
                }
                continue;
            }
            unreachable = 0;
            if seen.is_some_and(|(round, _)| round >= cfg.rounds) {
                break;
            }
            for (&client, report) in mine.iter().zip(&reports) {
                if report
                    .as_ref()
                    .is_some_and(|r| r.rounds.iter().any(|round| round.round == state.0))
                {
                    done.push(client);
                }
            }
            let answered = mine.iter().all(|c| done.contains(c));
            if answered && !past_the_end {
                previous = Some(state);
                state = (state.0 + 1, 0);
                done.clear();
            } else if let Some(seen) = seen
                && seen != state
                && Some(seen) != previous
            {
                tracing::debug!(?state, ?seen, "the run is elsewhere; following it");
                state = seen;
                done.clear();
            }
            // Otherwise the run stood where expected and no task came in time: ask again.
        }
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Some(rss) = peak_rss_mib() {
        let file = rss_file(folder, seed, index);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&file, format!("{rss}\n"))?;
    }
    result
}

/// For a check-in when the aggregator may be gone: a silent address should cost seconds, not
/// the minute a live connection is allowed to go quiet.
fn impatient(options: &mut ConnectOptions) {
    options.backoff.max_attempts = Some(2);
    options.quic.idle_timeout = Duration::from_secs(2);
    options.quic.keep_alive = Duration::from_millis(500);
}

/// Client indices in the order of their ids as strings: the order the engine sorts the
/// registry in (`client-10000` comes before `client-1001`).
fn sorted_population(clients: usize) -> Vec<u32> {
    let mut ids: Vec<(String, u32)> = (0..clients)
        .map(|i| (protocol::client_id(i), i as u32))
        .collect();
    ids.sort_unstable();
    ids.into_iter().map(|(_, i)| i).collect()
}

/// What a worker needs to bring any client of the fleet to life.
struct Fleet<'a> {
    cfg: &'a FleetConfig,
    deployment: Deployment,
    server: SocketAddr,
    server_name: &'a str,
    train: LabelledFeatures,
    classes: Vec<String>,
    rows: ClientRows,
    patience: Duration,
}

impl Fleet<'_> {
    /// Each of `clients` checks in for `visit`, all at once, until it has answered a task, the
    /// run is over, or one of them finds the run elsewhere (then all leave). The first checks
    /// in again every second ([`Visit::recheck`]) until the others are done, so a round that
    /// fails or closes while they wait is seen within a second; the others wait. Each one's last report, or `None` where it could not reach the aggregator
    /// and `tolerate_absence` (past the last round, when the aggregator may be gone).
    async fn visit(
        &self,
        clients: &[usize],
        visit: Visit,
        tolerate_absence: bool,
    ) -> Result<Vec<Option<ClientReport>>> {
        let (moved, stop) = watch::channel(false);
        let moved = Arc::new(moved);
        let waiting = Arc::new(AtomicUsize::new(clients.len()));
        let attack = adversaries(self.cfg);
        let mut running = Vec::with_capacity(clients.len());
        for (k, &index) in clients.iter().enumerate() {
            let id = protocol::client_id(index);
            let data = LocalData::new(
                Arc::new(self.rows.client(&self.train, index)?),
                self.classes.clone(),
            )?;
            let mut options = self.deployment.client_options(self.server, &id)?;
            options.server_name = self.server_name.to_owned();
            options.adversary = attack(&id);
            options.visit = Some(Visit {
                recheck: k == 0,
                ..visit
            });
            if tolerate_absence {
                impatient(&mut options);
            }
            let (stop, moved, waiting) = (stop.clone(), Arc::clone(&moved), Arc::clone(&waiting));
            let prober = k == 0;
            running.push(tokio::spawn(async move {
                let mut answered: Option<ClientReport> = None;
                let result = loop {
                    let report =
                        match edge_client::net::run(options.clone(), data.clone(), stop.clone())
                            .await
                        {
                            Ok(report) => report,
                            Err(_) if tolerate_absence => break Ok(None),
                            // A prober that answered the last round and finds no aggregator:
                            // the run ended while it looked again.
                            Err(_) if answered.is_some() && visit.last_round => {
                                break Ok(answered);
                            }
                            Err(e) => break Err(e),
                        };
                    let finished = report.end == RunEnd::RunFinished;
                    let elsewhere = report.last_welcome.is_none_or(|s| !visit.waits_at(s));
                    if elsewhere || finished {
                        // The run is not where this worker thought, or over: all of its
                        // clients leave.
                        let _ = moved.send(true);
                    }
                    if !report.rounds.is_empty() {
                        answered = Some(report.clone());
                    }
                    // A prober keeps looking while the others wait, as long as its answer was
                    // accepted: a refused one would be asked again at each check-in.
                    let keeps_probing = prober
                        && answered.as_ref().is_some_and(|a| {
                            a.rounds.last().is_some_and(|r| r.outcome == "accepted")
                        })
                        && waiting.load(Ordering::Acquire) > 1;
                    if elsewhere
                        || finished
                        || tolerate_absence
                        || *stop.borrow()
                        || (answered.is_some() && !keeps_probing)
                    {
                        break Ok(Some(answered.unwrap_or(report)));
                    }
                    if answered.is_some() && visit.last_round {
                        // Looking again after the last verdict: the aggregator may be gone.
                        impatient(&mut options);
                    }
                    // Waited and no task came, or the prober waits on the others: check in
                    // again.
                };
                waiting.fetch_sub(1, Ordering::AcqRel);
                result
            }));
        }
        let mut reports = Vec::with_capacity(running.len());
        for handle in running {
            reports.push(
                handle
                    .await
                    .context("client task")?
                    .context("a virtual client failed")?,
            );
        }
        Ok(reports)
    }
}
