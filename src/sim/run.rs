//! The orchestration: per seed and strategy, a real aggregator and real clients over loopback
//! QUIC (clients in this process or in client processes), the centralized reference, and the
//! run folder.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aggregator::server::RoundLine;
use aggregator_core::engine::{ClosedBy, Engine, RoundReport};
use aggregator_core::strategy::{Aggregation, Strategy};
use anyhow::{Context, Result, ensure};
use edge_client::{Adversary, LocalData};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{mpsc, watch};
use wsa::{Head, HeadSpec, LabelledFeatures, Sgd, TrainConfig};

use super::config::{FleetConfig, engine_config};
use super::data::{Dataset, SeedData, load_data, seed_data, validation_of};
use super::report::{
    FleetSummary, PLOTS, RoundLog, RoundRow, markdown_table, mean_std, peak_rss_mib, read_rounds,
    summarize, write_plot,
};
use crate::fleet::{Deployment, spawn_server};
use aggregator::tls::Tokens;

/// Runs one strategy on one seed's shards; returns one row per round.
async fn run_strategy(
    cfg: &FleetConfig,
    deployment: &Deployment,
    engine: Engine,
    label: &str,
    seed: u64,
    shards: &[Arc<LabelledFeatures>],
    progress: &Progress,
) -> Result<Vec<RoundRow>> {
    // The clients name their data's classes as the run does.
    let classes = engine.config().classes.clone();
    let (observer, mut lines) = mpsc::unbounded_channel::<RoundLine>();
    let listen = cfg
        .pool
        .as_ref()
        .and_then(|p| p.listen)
        .unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal"));
    let mut options =
        deployment.server_options(listen, None, Some(cfg.out.join("aggregator-rounds.jsonl")))?;
    options.round_observer = Some(observer);
    options.model_dir = Some(model_dir(cfg, label, seed));
    if cfg.pool.is_none() {
        // Every simulated client stays connected, and thousands of TLS handshakes on a couple
        // of cores take a while.
        options.max_connections = options.max_connections.max(cfg.clients + 16);
        options.max_unauthenticated = options.max_connections;
    }
    options.hello_timeout = Duration::from_secs(120);
    let server = deployment.bind(options)?;
    let addr = server.local_addr()?;
    let (mut handle, stop_server) = spawn_server(server, engine);
    let (stop_clients, stop) = watch::channel(false);
    let mut clients = Vec::new();
    let mut children = Vec::new();
    if let Some(pool) = &cfg.pool {
        if pool.spawn {
            for index in 0..pool.workers {
                let (index, workers) = (index.to_string(), pool.workers.to_string());
                children.push(spawn_this_binary(
                    &["worker".as_ref(), "--fleet".as_ref(), cfg.out.as_os_str()],
                    addr,
                    seed,
                    &[("--index", &index), ("--workers", &workers)],
                )?);
            }
        } else {
            tracing::info!(
                "{label}, seed {seed}: waiting for {} workers; start worker I (0 ≤ I < {}) with \
                 `wsa-fl worker --fleet {} --server {addr} --seed {seed} --index I --workers {}`",
                pool.workers,
                pool.workers,
                cfg.out.display(),
                pool.workers
            );
        }
    } else if cfg.client_processes == 0 {
        let named = shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Ok((
                    protocol::client_id(i),
                    LocalData::new(Arc::clone(s), classes.to_vec())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        clients = deployment.spawn_clients_with(addr, named, &stop, adversaries(cfg))?;
    } else {
        let config = cfg.out.join("config.json");
        for group in 0..cfg.client_processes {
            let (group, groups) = (group.to_string(), cfg.client_processes.to_string());
            children.push(spawn_this_binary(
                &["clients".as_ref(), "--config".as_ref(), config.as_os_str()],
                addr,
                seed,
                &[("--group", &group), ("--groups", &groups)],
            )?);
        }
    }
    let progress_task = {
        let (progress, label) = (progress.clone(), label.to_owned());
        tokio::spawn(async move {
            let mut rows = Vec::new();
            while let Some(line) = lines.recv().await {
                let row = round_row(&label, seed, &line.report);
                progress.record(&row)?;
                rows.push(row);
            }
            anyhow::Ok(rows)
        })
    };
    // A client or worker process that dies would leave its share of every round unserved and
    // the run waiting out deadlines for ever: stop the run instead.
    let summary = tokio::select! {
        summary = &mut handle => summary.context("aggregator task")??,
        failure = first_failure(&mut children) => {
            let _ = stop_server.send(true);
            for child in &mut children {
                let _ = child.kill();
            }
            let _ = handle.await;
            anyhow::bail!("{label}, seed {seed}: {failure}");
        }
    };
    // The aggregator has said its goodbyes and closed: a client that missed its goodbye
    // would otherwise retry the closed address until its reconnect policy gives up.
    let _ = stop_clients.send(true);
    for c in clients {
        c.await.context("client task")?.context("client")?;
    }
    for mut child in children {
        let status = tokio::task::spawn_blocking(move || child.wait()).await??;
        ensure!(
            status.success(),
            "a client or worker process failed: {status}"
        );
    }
    let rows = progress_task.await??;
    ensure!(summary.finished, "{label}: the run did not finish");
    Ok(rows)
}

/// Starts this binary as `command` (a subcommand and its folder) for the run of `seed` on
/// `server`, with `share` naming its part of the fleet.
fn spawn_this_binary(
    command: &[&std::ffi::OsStr],
    server: std::net::SocketAddr,
    seed: u64,
    share: &[(&str, &str)],
) -> Result<std::process::Child> {
    let mut child = std::process::Command::new(std::env::current_exe()?);
    child
        .args(command)
        .args(["--server", &server.to_string()])
        .args(["--seed", &seed.to_string()]);
    for (flag, value) in share {
        child.args([flag, value]);
    }
    child
        .spawn()
        .with_context(|| format!("starting {command:?} {share:?}"))
}

/// Resolves when one of `children` has exited with a failure (never, if none does).
async fn first_failure(children: &mut [std::process::Child]) -> String {
    loop {
        for child in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait()
                && !status.success()
            {
                return format!("a client or worker process failed: {status}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where finished rounds go: the round log on disk, and the progress bar.
#[derive(Clone)]
struct Progress {
    bar: ProgressBar,
    log: Arc<Mutex<RoundLog>>,
}

impl Progress {
    /// Appends `row` to the round log and shows it.
    fn record(&self, row: &RoundRow) -> Result<()> {
        self.log.lock().expect("round log").append(row)?;
        if !row.test_accuracy.is_nan() {
            self.bar.set_message(format!(
                "{} seed {} round {}: test acc {:.4}",
                row.strategy, row.seed, row.round, row.test_accuracy
            ));
        }
        self.bar.inc(1);
        Ok(())
    }
}

/// A federated round's row. A failed attempt (below quorum) moved nothing and has no
/// evaluation: it is kept, with NaN accuracies, so the record shows it.
fn round_row(label: &str, seed: u64, report: &RoundReport) -> RoundRow {
    let eval = report.test_eval;
    let drift = report.drift.as_ref();
    RoundRow {
        strategy: label.to_owned(),
        seed,
        round: report.round,
        test_accuracy: eval.map_or(f64::NAN, |e| e.accuracy),
        validation_accuracy: report.eval.map_or(f64::NAN, |e| e.accuracy),
        test_loss: eval.map_or(f64::NAN, |e| e.loss),
        train_loss: report.train_loss.unwrap_or(f64::NAN),
        mean_kl: report.mean_kl.unwrap_or(f64::NAN),
        accepted: report.accepted.len(),
        wall_ms: report.duration_ms,
        bytes_in: report.wire_bytes_in,
        attempt: report.attempt,
        failed: report.closed_by == ClosedBy::Failed,
        federated_accuracy: report.federated_eval.map_or(f64::NAN, |f| f.accuracy),
        federated_accuracy_std: report.federated_eval.map_or(f64::NAN, |f| f.accuracy_std),
        step_cosine: drift.and_then(|d| d.step_cosine).unwrap_or(f64::NAN),
        step_agreement: drift.and_then(|d| d.step_agreement).unwrap_or(f64::NAN),
        mean_spread: drift.map_or(f64::NAN, |d| mean_std(&d.mean_spread).0),
        std_spread: drift.map_or(f64::NAN, |d| mean_std(&d.std_spread).0),
        target_std_first: report.targets.first().map_or(f64::NAN, |t| t.std),
        target_std_last: report.targets.last().map_or(f64::NAN, |t| t.std),
        epsilon: report.privacy.map_or(f64::NAN, |p| p.epsilon),
        dp_clip: report.privacy.map_or(f64::NAN, |p| p.clip),
    }
}

/// The centralized reference: the same head, optimizer and initial weights trained on the
/// union of the client data, one "round" = one epoch over all of it. A federated round of the
/// experiment passes about half as many samples (10 clients × 5 epochs × ~1% of the data), so
/// the bound gets twice the federated budget and still converges; the local epoch count is
/// deliberately not reused, since 5 epochs a round would be 10× the budget and the run's
/// slowest part. With that optimizer (no decay) it is not an upper bound: averaged federated
/// heads end above it on IID splits (docs/results.md §5).
fn run_centralized(
    cfg: &FleetConfig,
    head: &HeadSpec,
    train: &LabelledFeatures,
    test: &LabelledFeatures,
    validation: Option<&LabelledFeatures>,
    seed: u64,
    progress: &Progress,
) -> Result<Vec<RoundRow>> {
    let init = engine_config(cfg, head, Strategy::FedAvg, Aggregation::Mean, seed);
    let mut model: Head<f32> = Head::init(&init.head, init.init, init.seed)?;
    let mut rows = Vec::new();
    for round in 0..cfg.rounds {
        let started = Instant::now();
        let tc = TrainConfig {
            seed: seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ..TrainConfig::new(Sgd {
                epochs: 1,
                ..cfg.train.clone()
            })
        };
        let out = wsa::train(&model, train, &tc)?;
        model = out.head;
        let eval = model.evaluate(test.x(), test.labels())?;
        let validation_accuracy = match validation {
            Some(v) => model.evaluate(v.x(), v.labels())?.accuracy,
            None => f64::NAN,
        };
        rows.push(RoundRow {
            strategy: "centralized".into(),
            seed,
            round,
            test_accuracy: eval.accuracy,
            validation_accuracy,
            test_loss: eval.loss,
            train_loss: out.metrics.loss,
            mean_kl: f64::NAN,
            accepted: 1,
            wall_ms: started.elapsed().as_millis() as u64,
            bytes_in: 0,
            attempt: 0,
            failed: false,
            federated_accuracy: f64::NAN,
            federated_accuracy_std: f64::NAN,
            step_cosine: f64::NAN,
            step_agreement: f64::NAN,
            mean_spread: f64::NAN,
            std_spread: f64::NAN,
            target_std_first: f64::NAN,
            target_std_last: f64::NAN,
            epsilon: f64::NAN,
            dp_clip: f64::NAN,
        });
        progress.record(rows.last().expect("just pushed"))?;
    }
    Ok(rows)
}

/// The body of a client process (`wsa-fl clients ...`): rebuilds the run's data for `seed`
/// and runs clients `i` with `i % groups == group` against `server` until the run ends.
pub fn run_client_group(
    config: &Path,
    server: std::net::SocketAddr,
    seed: u64,
    group: usize,
    groups: usize,
) -> Result<()> {
    let cfg = FleetConfig::load(config)?;
    ensure!(groups > 0 && group < groups, "group {group} of {groups}");
    let Dataset { train, classes, .. } = load_data(&cfg.data)?;
    let data = seed_data(&cfg, &train, seed)?;
    drop(train);
    let deployment = cfg.transport(Deployment::open(&cfg.out.join("creds")));
    let mine = data
        .shards
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % groups == group)
        .map(|(i, s)| Ok((protocol::client_id(i), LocalData::new(s, classes.clone())?)))
        .collect::<Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (_keep, stop) = watch::channel(false);
        for client in deployment.spawn_clients_with(server, mine, &stop, adversaries(&cfg))? {
            let report = client.await.context("client task")??;
            ensure!(
                report.end == edge_client::net::RunEnd::RunFinished,
                "a client ended with {:?}",
                report.end
            );
        }
        Ok(())
    })
}

/// Where a strategy's final model goes: `models/<label>-seed<seed>/` in the run folder, the
/// label's punctuation made file-name safe.
fn model_dir(cfg: &FleetConfig, label: &str, seed: u64) -> std::path::PathBuf {
    let safe: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    cfg.out.join("models").join(format!("{safe}-seed{seed}"))
}

/// Which clients attack: `client_id(i)` for `i` below the Byzantine count.
pub(crate) fn adversaries(cfg: &FleetConfig) -> impl Fn(&str) -> Option<Adversary> + use<> {
    let count = cfg.byzantine.as_ref().map_or(0, |b| b.count(cfg.clients));
    let attack = cfg.byzantine.as_ref().map(|b| b.attack.clone());
    move |id| {
        attack
            .clone()
            .filter(|_| protocol::client_index(id).is_some_and(|i| i < count))
    }
}

/// The peak RSS (MiB) of each worker index over the sweep's runs, as the workers left it.
fn workers_peak_rss(cfg: &FleetConfig, workers: usize) -> Vec<f64> {
    (0..workers)
        .map(|index| {
            cfg.seeds
                .iter()
                .filter_map(|&seed| {
                    std::fs::read_to_string(super::worker::rss_file(&cfg.out, seed, index)).ok()
                })
                .filter_map(|text| text.trim().parse::<f64>().ok())
                .fold(0.0, f64::max)
        })
        .collect()
}

/// Runs the whole comparison and writes the run folder.
pub fn run_fleet(cfg: &FleetConfig) -> Result<FleetSummary> {
    sweep(cfg, Vec::new())
}

/// Continues the sweep in the run folder `out` (its `config.json`) where it stopped: the
/// runs (a strategy on a seed, or the centralized reference on one) whose every round is in
/// `rounds.csv` are kept, and the others run again from their first round. The aggregator's
/// own log (`aggregator-rounds.jsonl`) keeps the lines of the interrupted attempt too.
pub fn resume_fleet(out: &Path) -> Result<FleetSummary> {
    let mut cfg = FleetConfig::load(&out.join("config.json"))?;
    cfg.out = out.to_owned();
    let rows = read_rounds(out)?;
    let finished: Vec<(String, u64)> = rows
        .iter()
        .filter(|r| !r.failed && r.round + 1 == cfg.rounds)
        .map(|r| (r.strategy.clone(), r.seed))
        .collect();
    let kept: Vec<RoundRow> = rows
        .into_iter()
        .filter(|r| finished.contains(&(r.strategy.clone(), r.seed)))
        .collect();
    tracing::info!(
        finished_runs = finished.len(),
        rows = kept.len(),
        "resuming the sweep"
    );
    sweep(&cfg, kept)
}

/// The sweep of `cfg`, skipping the runs whose rows `done` holds (they finished).
fn sweep(cfg: &FleetConfig, done: Vec<RoundRow>) -> Result<FleetSummary> {
    let resuming = !done.is_empty();
    let finished =
        |label: &str, seed: u64| done.iter().any(|r| r.strategy == label && r.seed == seed);
    ensure!(
        cfg.clients > 0 && cfg.per_round > 0 && cfg.per_round <= cfg.clients,
        "need 0 < per_round ≤ clients"
    );
    ensure!(
        cfg.rounds > 0 && !cfg.seeds.is_empty(),
        "need rounds and at least one seed"
    );
    if let Some(pool) = &cfg.pool {
        ensure!(
            pool.workers > 0 && pool.workers <= cfg.per_round,
            "a pool needs 1 ≤ workers ≤ per_round, got {} workers",
            pool.workers
        );
        ensure!(
            !cfg.centralized && cfg.client_processes == 0 && cfg.secure.is_none(),
            "a pool of virtual clients runs without the centralized reference, client \
             processes or secure aggregation"
        );
    }
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    std::fs::write(
        cfg.out.join("config.json"),
        serde_json::to_string_pretty(cfg)? + "\n",
    )?;
    if !resuming {
        let _ = std::fs::remove_file(cfg.out.join("aggregator-rounds.jsonl"));
    }

    let Dataset {
        train,
        test,
        classes,
        backbone: backbone_ref,
    } = load_data(&cfg.data)?;
    let feature_seconds = started.elapsed().as_secs_f64();
    let head = HeadSpec::mlp(train.dim(), &cfg.hidden, train.classes());
    let ids: Vec<String> = (0..cfg.clients).map(protocol::client_id).collect();
    let deployment = cfg.transport(match &cfg.pool {
        // A token file per virtual client would be a million files.
        Some(pool) => Deployment::generate_with(
            &cfg.out.join("creds"),
            &ids,
            Tokens::Derived,
            pool.server_name.as_deref(),
        )?,
        None => Deployment::generate(&cfg.out.join("creds"), &ids)?,
    });
    drop(ids);
    let setup_seconds = started.elapsed().as_secs_f64();

    let aggregations = if cfg.aggregations.is_empty() {
        vec![Aggregation::Mean]
    } else {
        cfg.aggregations.clone()
    };
    let plans: Vec<(Strategy, Aggregation)> = cfg
        .strategies
        .iter()
        .flat_map(|&s| aggregations.iter().map(move |&a| (s, a)))
        .collect();
    let backend = aggregator::backends::open_backend(cfg.backend)?;
    tracing::info!(backend = backend.name(), "aggregator backend");
    let runs_per_seed = plans.len() as u64 + u64::from(cfg.centralized);
    let progress = ProgressBar::new(runs_per_seed * cfg.seeds.len() as u64 * cfg.rounds);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} rounds {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    progress.inc(done.len() as u64);
    let progress = Progress {
        bar: progress,
        log: Arc::new(Mutex::new(RoundLog::create(&cfg.out, &done)?)),
    };
    let mut rows = done.clone();
    let mut skews = Vec::new();
    let mut labels = Vec::new();
    ensure!(
        (0.0..0.9).contains(&cfg.validation_fraction),
        "validation fraction must be in [0, 0.9)"
    );
    let data_shape = (train.len(), test.len(), train.dim());
    // A pool's workers build each sampled client themselves: the simulator keeps only each
    // seed's validation rows, not the training matrix.
    let (train, mut pool_validation) = match cfg.pool {
        Some(_) => {
            let validation = cfg
                .seeds
                .iter()
                .map(|&seed| validation_of(cfg, &train, seed))
                .collect::<Result<Vec<_>>>()?;
            (None, validation)
        }
        None => (Some(train), Vec::new()),
    };
    for (k, &seed) in cfg.seeds.iter().enumerate() {
        let (validation, shards, clients) = match &train {
            None => (pool_validation[k].take(), Vec::new(), None),
            Some(train) => {
                let SeedData {
                    train,
                    validation,
                    split,
                    shards,
                } = seed_data(cfg, train, seed)?;
                split.write_json(
                    &cfg.out.join(format!("partition-seed{seed}.json")),
                    train.labels(),
                    train.classes(),
                )?;
                skews.push(split.skew(train.labels(), train.classes()));
                (validation, shards, Some((train, split)))
            }
        };
        for &(strategy, aggregation) in &plans {
            let mut config = engine_config(cfg, &head, strategy, aggregation, seed);
            config.classes = classes.clone();
            config.backbone = backbone_ref.clone();
            let label = config.label();
            if !labels.contains(&label) {
                labels.push(label.clone());
            }
            if finished(&label, seed) {
                continue;
            }
            let mut engine = Engine::with_backend(config, Arc::clone(&backend))?;
            engine.set_test(test.clone())?;
            if let Some(v) = &validation {
                engine.set_validation(v.clone())?;
            }
            let r = runtime.block_on(run_strategy(
                cfg,
                &deployment,
                engine,
                &label,
                seed,
                &shards,
                &progress,
            ))?;
            rows.extend(r);
        }
        if let Some((train, split)) = clients.filter(|_| cfg.centralized) {
            if !labels.contains(&"centralized".to_owned()) {
                labels.push("centralized".into());
            }
            if finished("centralized", seed) {
                continue;
            }
            let union: Vec<usize> = split.clients.iter().flatten().copied().collect();
            let all = train.select(&union)?;
            rows.extend(run_centralized(
                cfg,
                &head,
                &all,
                &test,
                validation.as_ref(),
                seed,
                &progress,
            )?);
        }
    }
    progress.bar.finish();
    // Runtime teardown may wait for idle QUIC tasks; bound it.
    runtime.shutdown_timeout(Duration::from_secs(2));

    let plot = write_plot(cfg, &rows, &labels, &PLOTS[0])?;
    // The centralized run has no clients to drift.
    let federated: Vec<String> = labels
        .iter()
        .filter(|l| l.as_str() != "centralized")
        .cloned()
        .collect();
    if !federated.is_empty() {
        for plotted in &PLOTS[1..] {
            write_plot(cfg, &rows, &federated, plotted)?;
        }
    }
    let summary = FleetSummary {
        config: cfg.clone(),
        strategies: labels
            .iter()
            .map(|l| summarize(l, &rows, &cfg.seeds, cfg.target_accuracy))
            .collect(),
        partition_skew: skews,
        data_shape,
        feature_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        setup_seconds,
        peak_rss_mib: peak_rss_mib(),
        workers_peak_rss_mib: cfg
            .pool
            .as_ref()
            .map(|pool| workers_peak_rss(cfg, pool.workers))
            .unwrap_or_default(),
        plot,
    };
    std::fs::write(
        cfg.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    std::fs::write(cfg.out.join("table.md"), markdown_table(&summary))?;
    Ok(summary)
}
