//! A local deployment: one credentials folder, a real aggregator and real edge clients in one
//! process, talking QUIC with TLS over loopback. Nothing is mocked; only the addresses are
//! local.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aggregator::server::{RunSummary, Server, ServerOptions};
use aggregator::tls::{
    Lifetimes, Tokens, client_token, default_ca_dir, generate_credentials_with, layout,
};
use aggregator_core::engine::Engine;
use anyhow::Result;
use edge_client::net::{Backoff, ClientError, ClientReport, ConnectOptions};
use edge_client::{Adversary, LocalData};
use protocol::Limits;
use protocol::quic::QuicLimits;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A credentials folder made by `gen-certs` logic, with helpers to configure both ends.
#[derive(Debug, Clone)]
pub struct Deployment {
    creds: PathBuf,
    /// Both ends' QUIC limits.
    quic: QuicLimits,
}

impl Deployment {
    /// Makes a CA, a server certificate for `localhost` and a token per client under `creds`
    /// (the CA key beside it, in `<creds>-ca`), replacing any there: a simulated fleet's
    /// credentials live as long as its run.
    pub fn generate(creds: &Path, client_ids: &[String]) -> Result<Self> {
        Self::generate_with(creds, client_ids, Tokens::Random, None)
    }

    /// [`Deployment::generate`] with tokens made as `tokens` says (derived for a fleet too
    /// large for a file per client), and the server certificate also naming `server_name`.
    pub fn generate_with(
        creds: &Path,
        client_ids: &[String],
        tokens: Tokens,
        server_name: Option<&str>,
    ) -> Result<Self> {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(server_name.map(str::to_owned));
        generate_credentials_with(
            creds,
            &default_ca_dir(creds),
            &names,
            client_ids,
            Lifetimes::default(),
            true,
            tokens,
        )?;
        Ok(Self::open(creds))
    }

    /// A credentials folder made earlier (by [`Deployment::generate`] or `gen-certs`).
    pub fn open(creds: &Path) -> Self {
        Self {
            creds: creds.to_owned(),
            quic: QuicLimits::default(),
        }
    }

    /// Both ends' UDP socket buffers in bytes ([`QuicLimits::udp_buffer`]); 0: the OS default.
    pub fn with_udp_buffer(mut self, bytes: usize) -> Self {
        self.quic.udp_buffer = bytes;
        self
    }

    /// The credentials folder.
    pub fn creds(&self) -> &Path {
        &self.creds
    }

    /// Server options listening on `listen`, with the given checkpoint and round log. A
    /// whole fleet on one machine connects at once, from one address, and its TLS handshakes
    /// share a few cores: room for 4,096 connections, all of them from loopback and at once
    /// unauthenticated, and 30 s to say hello.
    pub fn server_options(
        &self,
        listen: SocketAddr,
        checkpoint: Option<PathBuf>,
        rounds_log: Option<PathBuf>,
    ) -> Result<ServerOptions> {
        Ok(ServerOptions {
            max_connections: 4096,
            max_unauthenticated: 4096,
            max_per_address: usize::MAX,
            hello_timeout: Duration::from_secs(30),
            quic: self.quic,
            checkpoint,
            rounds_log,
            ..ServerOptions::new(listen, &self.creds)?
        })
    }

    /// Binds a server, retrying for a few seconds when the port is still held by a
    /// predecessor that just stopped (a restart on the same address).
    pub fn bind(&self, options: ServerOptions) -> Result<Server> {
        let mut last = None;
        for _ in 0..50 {
            match Server::bind(options.clone()) {
                Ok(server) => return Ok(server),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.expect("tried at least once"))
    }

    /// A server on a free loopback port with the default options and no checkpoint or log:
    /// what tests and benchmarks run against.
    pub fn bind_loopback(&self) -> Result<Server> {
        self.bind(self.server_options(([127, 0, 0, 1], 0).into(), None, None)?)
    }

    /// Options for client `id` to reach `server`, with a patient reconnect policy.
    pub fn client_options(&self, server: SocketAddr, id: &str) -> Result<ConnectOptions> {
        Ok(ConnectOptions {
            report_file: None,
            server,
            server_name: "localhost".into(),
            ca_cert: self.creds.join(layout::CA_CERT),
            client_id: id.into(),
            token: client_token(&self.creds, id)?,
            limits: Limits::default(),
            quic: self.quic,
            backoff: Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(1000),
                max_attempts: Some(200),
            },
            adversary: None,
            // A simulation keeps each strategy's final model in the run folder instead.
            model_dir: None,
            visit: None,
        })
    }

    /// Starts one edge client per `(id, data)` on the current runtime; they stop when the run
    /// finishes or `stop` turns true. Plain features name their classes by index.
    pub fn spawn_clients(
        &self,
        server: SocketAddr,
        shards: Vec<(String, impl Into<LocalData>)>,
        stop: &watch::Receiver<bool>,
    ) -> Result<Vec<JoinHandle<Result<ClientReport, ClientError>>>> {
        self.spawn_clients_with(server, shards, stop, |_| None)
    }

    /// [`Deployment::spawn_clients`] where `adversary(id)` makes some clients attack.
    pub fn spawn_clients_with(
        &self,
        server: SocketAddr,
        shards: Vec<(String, impl Into<LocalData>)>,
        stop: &watch::Receiver<bool>,
        adversary: impl Fn(&str) -> Option<Adversary>,
    ) -> Result<Vec<JoinHandle<Result<ClientReport, ClientError>>>> {
        shards
            .into_iter()
            .map(|(id, data)| {
                let mut options = self.client_options(server, &id)?;
                options.adversary = adversary(&id);
                Ok(tokio::spawn(edge_client::net::run(
                    options,
                    data.into(),
                    stop.clone(),
                )))
            })
            .collect()
    }
}

/// Runs `engine` on `server` in a task; the returned sender stops it.
pub fn spawn_server(
    server: Server,
    engine: Engine,
) -> (JoinHandle<Result<RunSummary>>, watch::Sender<bool>) {
    let (stop_tx, stop) = watch::channel(false);
    (tokio::spawn(server.run(engine, stop)), stop_tx)
}
