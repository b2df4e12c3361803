//! The fleet simulation: one partition of a training set among N clients, then, per seed and
//! strategy, a real aggregator and N real edge clients over loopback QUIC for R rounds, the
//! global head evaluated on the test set after every round; plus a centralized reference run
//! on the union of the client data. Results go to a run folder.
//!
//! The backbone is frozen, so features are extracted once (through the cache) and every client
//! gets its rows of the shared feature matrix.
//!
//! - [`config`]: what a run does ([`FleetConfig`]), written to the run folder;
//! - `data`: the features and each seed's hold-out, partition and shards;
//! - `run`: the orchestration ([`run_fleet`], [`resume_fleet`], and [`run_client_group`] in client processes);
//! - [`report`]: the rows, the summaries, the table and the plot;
//! - `worker`: a worker of a pool of virtual clients ([`run_worker`]).

pub mod config;
mod data;
pub mod report;
mod run;
mod worker;

pub use config::Pool;
pub use config::{Byzantine, DataSource, FleetConfig};
pub use report::{FleetSummary, RoundRow, StrategySummary, markdown_table, peak_rss_mib};
pub use run::{resume_fleet, run_client_group, run_fleet};
pub use worker::run_worker;
