//! Logging set-up. Called once by the binary; tests and embedders may install
//! their own subscriber instead, so the library never does it on its own.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::{LogFormat, TelemetrySettings};

/// Installs the global tracing subscriber: the configured filter (or
/// `RUST_LOG` when set) and text or JSON lines on stderr.
pub fn init(settings: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.log_format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("tracing was already set up: {e}");
    }
}
