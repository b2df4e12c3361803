//! The binaries' log output: human-readable lines on stderr, filtered by `RUST_LOG` or, without
//! it, by the binary's default directives.

/// Installs the global subscriber; `default_filter` (e.g. `"info"` or
/// `"warn,wsa_fl=info"`) applies when `RUST_LOG` is unset or invalid. A second call (tests
/// that share a process) keeps the first subscriber.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
