//! The QUIC runtime around the round engine: it moves bytes and timers in and out of
//! [`Engine`], which holds every decision. One task per connection ([`connection`]); one
//! task, [`Server::run`], owns the engine and carries out its actions in order.
//!
//! A client opens one bidirectional *control* stream for its hello, the welcome and the final
//! goodbye. For each round the server opens a stream to each selected client and writes the
//! task; the client answers on it with its update and the server closes it with the verdict.
//! Clients may not open more streams than that (QUIC flow control refuses the rest).

mod connection;
mod metrics;
mod options;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use aggregator_core::engine::{Action, ClosedBy, Engine, EngineConfig, Event, Millis, Population};
use anyhow::{Context, Result};
use protocol::{GoodbyeReason, Message, encode_frame};
use tokio::sync::{mpsc, watch};

use crate::auth::LiveRegistry;

use connection::{FromConnection, GOODBYE_GRACE, Gate, Outbound, Shared, accept_loop};
pub use metrics::{Metrics, bind_metrics, serve_metrics};
pub use options::{RoundLine, RunSummary, ServerOptions, TransportStats};

/// A bound, not yet running, aggregator.
pub struct Server {
    endpoint: quinn::Endpoint,
    opts: ServerOptions,
}

impl Server {
    /// Binds the endpoint (so the address is known before [`Server::run`]).
    pub fn bind(opts: ServerOptions) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = protocol::quic::server_config(&opts.cert, &opts.key, &opts.quic)?;
        // The stateless-reset key and the connection-id key come from the server's private
        // key, not from chance: an aggregator restarted after a crash (same key) then
        // recognizes the old process's connection ids and answers them with a valid reset, so
        // clients reconnect at their next packet instead of at their idle timeout.
        let key =
            std::fs::read(&opts.key).with_context(|| format!("reading {}", opts.key.display()))?;
        let secret = ring::digest::digest(
            &ring::digest::SHA256,
            &[&b"wsa-fl stateless reset\0"[..], &key].concat(),
        );
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&secret.as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let (socket, granted) = protocol::quic::bind_udp(opts.listen, opts.quic.udp_buffer)
            .with_context(|| format!("binding {}", opts.listen))?;
        // Linux grants twice what it keeps for data, up to twice `net.core.rmem_max`.
        if granted < opts.quic.udp_buffer {
            tracing::warn!(
                asked = opts.quic.udp_buffer,
                granted,
                "the UDP receive buffer is smaller than asked: a large fleet's updates may be \
                 dropped and resent; raise net.core.rmem_max"
            );
        }
        let runtime = quinn::default_runtime().context("no async runtime for the endpoint")?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)
            .with_context(|| format!("starting the endpoint on {}", opts.listen))?;
        Ok(Self { endpoint, opts })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Runs `engine` until all rounds are done or `shutdown` turns true.
    pub async fn run(
        self,
        mut engine: Engine,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<RunSummary> {
        // A round the backend could not hold would leave the run stuck at its first opening:
        // refuse to start instead.
        engine
            .check_round_capacity(self.opts.registry.len())
            .context("the run's rounds do not fit the compute backend")?;
        if engine.config().sampling.population == Population::Registered {
            // Sampled from as the run starts: a client added later joins the next run.
            engine.set_population(self.opts.registry.ids().map(str::to_owned));
        }
        let shared = Arc::new(Shared {
            limits: session_limits(self.opts.limits, engine.config()),
            registry: LiveRegistry::new(
                self.opts.registry.clone(),
                self.opts.registry_file.clone(),
            ),
            hello_timeout: self.opts.hello_timeout,
            run_id: engine.config().run_id,
            classes: engine.config().classes.clone(),
            eval_fraction: engine.config().eval_fraction,
            round: std::sync::Mutex::new((engine.round(), engine.attempt())),
            sessions: AtomicU64::new(0),
        });
        let gate = Arc::new(Gate::new(
            self.opts.max_connections,
            self.opts.max_unauthenticated,
            self.opts.max_per_address,
            self.opts.validate_addresses,
        ));
        // Bounded: a flood of connection events waits for the engine instead of growing a
        // queue without end.
        let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
        let acceptor = tokio::spawn(accept_loop(
            self.endpoint.clone(),
            Arc::clone(&shared),
            gate,
            events_tx.clone(),
        ));

        let clock = Instant::now();
        let now = |clock: Instant| Millis(clock.elapsed().as_millis() as u64);
        let mut log = match &self.opts.rounds_log {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )),
            None => None,
        };
        let mut sessions: HashMap<String, (u64, mpsc::UnboundedSender<Outbound>)> = HashMap::new();
        let mut stats = TransportStats::default();
        let mut round_started = Instant::now();
        let mut model_error = None;
        let mut final_model: Option<Arc<Vec<u8>>> = None;
        let mut summary = RunSummary {
            rounds: Vec::new(),
            finished: false,
        };
        let mut stop_now = false;
        let mut task_frame: Option<(Arc<protocol::RoundTask>, Arc<Vec<u8>>)> = None;
        let metrics = self.opts.metrics.clone().unwrap_or_default();
        // The (round, attempt) last counted as opened.
        let mut opened: Option<(u64, u32)> = None;
        let mut pending = engine.handle(now(clock), Event::Tick);
        'run: loop {
            // Apply the engine's actions in order: a checkpoint is on disk before the next
            // round's tasks leave.
            for action in pending.drain(..) {
                match action {
                    Action::SendTask { client, task } => {
                        let frame = shared_task_frame(&mut task_frame, &task)?;
                        if let Some((_, out)) = sessions.get(&client) {
                            let _ = out.send(Outbound::Task {
                                round: task.round,
                                frame,
                                answer_within: Duration::from_millis(task.deadline_ms)
                                    .saturating_add(ANSWER_GRACE),
                            });
                        }
                    }
                    Action::SendSecureTask {
                        client,
                        setup,
                        task,
                    } => {
                        let frame = shared_task_frame(&mut task_frame, &task)?;
                        let setup =
                            encode_frame(&Message::SecAgg(protocol::SecAgg::Setup(*setup)))?;
                        if let Some((_, out)) = sessions.get(&client) {
                            let _ = out.send(Outbound::SecureTask {
                                round: task.round,
                                setup,
                                task: frame,
                                answer_within: Duration::from_millis(task.deadline_ms)
                                    .saturating_add(ANSWER_GRACE),
                            });
                        }
                    }
                    Action::SendSecAgg {
                        client,
                        round,
                        step,
                    } => {
                        if let Some((_, out)) = sessions.get(&client) {
                            let frame = encode_frame(&Message::SecAgg(*step))?;
                            let _ = out.send(Outbound::Step { round, frame });
                        }
                    }
                    Action::SendVerdict { client, verdict } => {
                        if let Some((_, out)) = sessions.get(&client) {
                            let _ = out.send(Outbound::Verdict(verdict));
                        }
                    }
                    Action::Checkpoint(checkpoint) => {
                        if let Some(path) = &self.opts.checkpoint {
                            // Blocking on purpose: nothing may leave before it is durable.
                            checkpoint.save_atomic(path).with_context(|| {
                                format!("writing checkpoint {}", path.display())
                            })?;
                            metrics.checkpointed();
                        }
                        if stop_now {
                            tracing::info!(
                                next_round = checkpoint.next_round,
                                "stopping after the configured rounds"
                            );
                            break 'run;
                        }
                    }
                    Action::RoundClosed(report) => {
                        stats.wall_ms = round_started.elapsed().as_millis() as u64;
                        stats.connected = sessions.len();
                        let line = RoundLine {
                            report: *report,
                            transport: std::mem::take(&mut stats),
                        };
                        log_round(&line);
                        metrics.round_closed(&line.report);
                        if let Some(log) = log.as_mut() {
                            use std::io::Write;
                            serde_json::to_writer(&mut *log, &line)?;
                            log.write_all(b"\n")?;
                            log.flush()?;
                        }
                        stop_now = line.report.closed_by != ClosedBy::Failed
                            && self
                                .opts
                                .stop_after_rounds
                                .is_some_and(|n| line.report.round + 1 >= n);
                        if let Some(observer) = &self.opts.round_observer {
                            let _ = observer.send(line.clone());
                        }
                        summary.rounds.push(line);
                        round_started = Instant::now();
                        *shared.round.lock().unwrap_or_else(|e| e.into_inner()) =
                            (engine.round(), engine.attempt());
                    }
                    Action::Finished => {
                        summary.finished = true;
                        // Every client leaves with the final model, just before the goodbye.
                        match protocol::FinalModel::from_saved(&engine.saved_model())
                            .map_err(|e| e.to_string())
                            .and_then(|m| {
                                encode_frame(&Message::FinalModel(m)).map_err(|e| e.to_string())
                            }) {
                            Ok(frame) => final_model = Some(Arc::new(frame)),
                            Err(e) => tracing::error!(error = %e, "cannot encode the final model"),
                        }
                        if let Some(dir) = &self.opts.model_dir {
                            // Reported after the goodbyes: the clients' run is over either way,
                            // and the checkpoint still holds the head.
                            match engine.saved_model().save(dir) {
                                Ok(()) => {
                                    tracing::info!(dir = %dir.display(), "final model written")
                                }
                                Err(e) => {
                                    model_error = Some(anyhow::Error::new(e).context(format!(
                                        "writing the final model to {}",
                                        dir.display()
                                    )))
                                }
                            }
                        }
                        if let Some(path) = &self.opts.confusion_csv
                            && engine.config().classes.len() <= MAX_CONFUSION_CLASSES
                            && let Some(counts) = engine.test_confusion()
                            && let Err(e) = write_confusion(path, &engine.config().classes, &counts)
                        {
                            model_error = Some(e);
                        }
                        break 'run;
                    }
                }
            }
            let open = engine.open_round().map(|r| (r.round, r.attempt));
            if open.is_some() && open != opened {
                metrics.round_opened(open.map_or(0, |(round, _)| round));
                opened = open;
            }
            metrics.connected(sessions.len());
            // A deadline past what the clock can hold is no deadline.
            let deadline = engine.next_deadline().and_then(|Millis(ms)| {
                clock
                    .checked_add(Duration::from_millis(ms))
                    .map(tokio::time::Instant::from_std)
            });
            tokio::select! {
                _ = shutdown.changed() => break 'run,
                _ = sleep_until(deadline) => {
                    pending = engine.handle(now(clock), Event::Tick);
                }
                event = events.recv() => {
                    let Some(event) = event else { break 'run };
                    let at = now(clock);
                    pending = match event {
                        FromConnection::Joined { session, out, event } => {
                            let Some(client) = event.client().map(str::to_owned) else {
                                continue;
                            };
                            if let Some((_, old)) = sessions.insert(client.clone(), (session, out)) {
                                // A reconnect replaces the old session; dropping its sender
                                // makes its connection task close it.
                                drop(old);
                                let mut a = engine.handle(at, Event::Disconnected { client });
                                a.extend(engine.handle(at, event));
                                a
                            } else {
                                engine.handle(at, event)
                            }
                        }
                        FromConnection::Session { session, event } => {
                            let current = event
                                .client()
                                .is_some_and(|c| sessions.get(c).is_some_and(|(s, _)| *s == session));
                            match &event {
                                _ if !current => Vec::new(),
                                Event::Disconnected { client } => {
                                    sessions.remove(client);
                                    engine.handle(at, event)
                                }
                                Event::Update { wire_bytes, .. } => {
                                    let wire_bytes = *wire_bytes;
                                    stats.bytes_in += wire_bytes;
                                    let t = Instant::now();
                                    let a = engine.handle(at, event);
                                    let spent = t.elapsed();
                                    stats.engine_update_us += spent.as_micros() as u64;
                                    stats.engine_updates += 1;
                                    metrics.update_handled(spent.as_secs_f64(), wire_bytes);
                                    a
                                }
                                _ => engine.handle(at, event),
                            }
                        }
                        FromConnection::OverLimit => {
                            stats.refused_connections += 1;
                            metrics.connection_refused();
                            Vec::new()
                        }
                        FromConnection::Refused { reason } => {
                            stats.refused_hello_count += 1;
                            metrics.hello_refused();
                            if stats.refused_hellos.len() < MAX_LISTED_REFUSALS {
                                stats.refused_hellos.push(reason);
                            }
                            Vec::new()
                        }
                        FromConnection::BytesOut(n) => {
                            stats.bytes_out += n;
                            metrics.bytes_sent(n);
                            Vec::new()
                        }
                    };
                }
            }
        }
        let reason = if summary.finished {
            GoodbyeReason::RunFinished
        } else {
            GoodbyeReason::ShuttingDown
        };
        let linger = summary.finished && !self.opts.linger.is_zero();
        if !linger {
            acceptor.abort();
        }
        let mut saying_goodbye = 0usize;
        for (_, (_, out)) in sessions.drain() {
            let goodbye = Outbound::Goodbye {
                reason,
                final_model: final_model.clone(),
            };
            saying_goodbye += usize::from(out.send(goodbye).is_ok());
        }
        // Let connection tasks flush their goodbyes, then close what is left.
        let drain = async {
            while saying_goodbye > 0 {
                match events.recv().await {
                    Some(FromConnection::Session {
                        event: Event::Disconnected { .. },
                        ..
                    }) => saying_goodbye -= 1,
                    Some(_) => {}
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(GOODBYE_GRACE + Duration::from_millis(500), drain).await;
        if linger {
            tracing::info!(
                seconds = self.opts.linger.as_secs(),
                "run finished; handing the final model to clients that join"
            );
            let handed = tokio::time::timeout(
                self.opts.linger,
                hand_out_final_model(&mut events, &mut shutdown, final_model.as_ref()),
            )
            .await
            .unwrap_or(0);
            tracing::info!(clients = handed, "stopped handing out the final model");
            acceptor.abort();
        }
        self.endpoint.close(0u32.into(), b"run over");
        // Release the UDP port before returning, so a restart can bind it again.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        match model_error {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

/// A round task's frame, encoded once for all its recipients: `cache` holds the last task's.
fn shared_task_frame(
    cache: &mut Option<(Arc<protocol::RoundTask>, Arc<Vec<u8>>)>,
    task: &Arc<protocol::RoundTask>,
) -> Result<Arc<Vec<u8>>> {
    if let Some((t, f)) = cache.as_ref()
        && Arc::ptr_eq(t, task)
    {
        return Ok(Arc::clone(f));
    }
    let f = Arc::new(encode_frame(&Message::RoundTask((**task).clone()))?);
    *cache = Some((Arc::clone(task), Arc::clone(&f)));
    Ok(f)
}

/// Answers every client that joins a finished run with the final model and the run's goodbye,
/// until `shutdown`; returns how many it answered.
async fn hand_out_final_model(
    events: &mut mpsc::Receiver<FromConnection>,
    shutdown: &mut watch::Receiver<bool>,
    final_model: Option<&Arc<Vec<u8>>>,
) -> usize {
    let mut handed = 0;
    loop {
        tokio::select! {
            // A dropped sender is no request to stop: the linger's timeout ends it.
            Ok(()) = shutdown.changed() => return handed,
            event = events.recv() => match event {
                Some(FromConnection::Joined { out, .. }) => {
                    let goodbye = Outbound::Goodbye {
                        reason: GoodbyeReason::RunFinished,
                        final_model: final_model.cloned(),
                    };
                    handed += usize::from(out.send(goodbye).is_ok());
                }
                Some(_) => {}
                None => return handed,
            },
        }
    }
}

/// The most classes a confusion matrix is written for: beyond, its k² cells (80 MB of CSV at
/// 1,000 classes) are more than anyone reads; per-class accuracy is in every round's line.
const MAX_CONFUSION_CLASSES: usize = 1_000;

/// Connection events the run loop may have waiting; connections wait beyond it.
const EVENT_QUEUE: usize = 4096;
/// Refused hellos listed by reason in one round's line (the count is complete).
const MAX_LISTED_REFUSALS: usize = 32;
/// How long past a task's deadline its stream is still read (a late update is answered).
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// A session's frame limits: the server's, cut down to what the run's head needs (an update in
/// f32 with its scales, scopes, ids and metrics, and room to spare), so an authenticated client
/// cannot make the server read 64 MiB to refuse it.
fn session_limits(base: protocol::Limits, config: &EngineConfig) -> protocol::Limits {
    let params = config.head.param_count();
    let rows = protocol::RowLayout::of_head(&config.head).rows();
    let scopes = config.head.scoped_tensor_count(config.scope_selection);
    let frame = 4 * params + 4 * rows + 16 * scopes + 64 * 1024;
    protocol::Limits {
        max_message_bytes: base
            .max_message_bytes
            .min(u32::try_from(frame).unwrap_or(u32::MAX)),
        max_params: base
            .max_params
            .min(u32::try_from(params).unwrap_or(u32::MAX)),
        max_scopes: base
            .max_scopes
            .min(u32::try_from(scopes).unwrap_or(u32::MAX)),
        ..base
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The confusion matrix as CSV: a header of predicted class names, then one row per true
/// class, written atomically.
/// The one line a person reads per round: how many answered, what was refused, how
/// training and evaluation went, how long it took.
fn log_round(line: &RoundLine) {
    let r = &line.report;
    let figure = |v: Option<f64>| v.map(|v| format!("{v:.4}"));
    tracing::info!(
        round = r.round,
        attempt = r.attempt,
        closed_by = ?r.closed_by,
        accepted = format!("{}/{}", r.accepted_count, r.selected_count),
        rejected = r.rejected_count,
        rejections = ?r.rejected_by_reason,
        train_loss = figure(r.train_loss),
        test_accuracy = figure(r.test_eval.map(|e| e.accuracy)),
        federated_accuracy = r
            .federated_eval
            .map(|f| format!("{:.4}±{:.4} ({} clients)", f.accuracy, f.accuracy_std, f.clients)),
        epsilon = r
            .privacy
            .map(|p| format!("{:.3} (delta {:e}, clip {:.3})", p.epsilon, p.delta, p.clip)),
        wall_ms = line.transport.wall_ms,
        "round closed"
    );
}

fn write_confusion(path: &std::path::Path, classes: &[String], counts: &[Vec<u64>]) -> Result<()> {
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record(
        std::iter::once("true \\ predicted").chain(classes.iter().map(String::as_str)),
    )?;
    for (class, row) in classes.iter().zip(counts) {
        out.write_record(std::iter::once(class.clone()).chain(row.iter().map(u64::to_string)))?;
    }
    let bytes = out.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    support::fs::write_atomic(path, &bytes)
        .with_context(|| format!("writing the confusion matrix {}", path.display()))
}
