//! Small pieces every crate and binary of the workspace shares, so each exists once:
//! [`fs`] writes files so a crash leaves the old or the new one, never a mix; [`logging`] sets
//! up the binaries' log output; [`config`] reads TOML settings refusing keys nothing reads;
//! [`Millis`] is the time the sans-IO state machines are given.
#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

mod clock;
pub mod config;
pub mod fs;
pub mod logging;

pub use clock::Millis;
