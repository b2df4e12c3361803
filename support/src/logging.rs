//! The binaries' log output on stderr: human-readable lines or JSON objects (one per line, for
//! log collectors), filtered by `RUST_LOG` or, without it, by the binary's default directives.
//! Every binary takes `--log-format text|json` through [`LogArgs`].

/// The logging flags every binary shares.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log lines as text for people, or as JSON objects (one a line) for log collectors.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl LogArgs {
    /// Installs the global subscriber in the chosen format; `default_filter` applies when
    /// `RUST_LOG` is unset or invalid.
    pub fn init(&self, default_filter: &str) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = if self.log_format == "json" {
            builder.json().try_init()
        } else {
            builder.try_init()
        };
    }
}

/// Installs the global subscriber; `default_filter` (e.g. `"info"` or
/// `"warn,wsa_fl=info"`) applies when `RUST_LOG` is unset or invalid. A second call (tests
/// that share a process) keeps the first subscriber.
pub fn init(default_filter: &str) {
    LogArgs {
        log_format: "text".into(),
    }
    .init(default_filter);
}

/// [`init`] for tests: lines go through the test harness's capture (shown for failing tests).
pub fn init_for_tests(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
