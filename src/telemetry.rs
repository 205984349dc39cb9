//! Logging and trace export set-up. Called once by the binary; tests and
//! embedders may install their own subscriber instead, so the library never
//! does it on its own.
//!
//! With the `otlp` cargo feature and `telemetry.otlp_endpoint` set, spans are
//! also exported to an OpenTelemetry collector over OTLP/HTTP by a batch
//! exporter on its own thread. The default build has no exporter at all.

use tracing_subscriber::{fmt, prelude::*, EnvFilter, Layer, Registry};

use crate::config::{LogFormat, TelemetrySettings};

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes it.
#[derive(Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes spans not yet exported (call before the process exits).
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("flashsale: flushing traces failed: {e}");
            }
        }
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global tracing subscriber: the configured filter (or
/// `RUST_LOG` when set), text or JSON lines on stderr, and the OTLP exporter
/// when built in and configured.
pub fn init(settings: &TelemetrySettings) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let output: BoxedLayer = match settings.log_format {
        LogFormat::Json => fmt::layer().json().with_writer(std::io::stderr).boxed(),
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    let mut layers: Vec<BoxedLayer> = vec![output];
    let mut telemetry = Telemetry::default();
    if !settings.otlp_endpoint.is_empty() {
        match otlp_layer(&settings.otlp_endpoint, &mut telemetry) {
            Ok(layer) => layers.push(layer),
            Err(e) => eprintln!("flashsale: trace export disabled: {e}"),
        }
    }
    if let Err(e) = tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()
    {
        eprintln!("tracing was already set up: {e}");
    }
    telemetry
}

#[cfg(feature = "otlp")]
fn otlp_layer(endpoint: &str, telemetry: &mut Telemetry) -> Result<BoxedLayer, String> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("flashsale")
                .build(),
        )
        .build();
    let tracer = provider.tracer("flashsale");
    telemetry.provider = Some(provider);
    Ok(tracing_opentelemetry::layer().with_tracer(tracer).boxed())
}

#[cfg(not(feature = "otlp"))]
fn otlp_layer(_: &str, _: &mut Telemetry) -> Result<BoxedLayer, String> {
    Err("telemetry.otlp_endpoint is set but this build has no OTLP exporter (build with --features otlp)".into())
}

/// Names the calling thread after its role (at most 15 bytes show), so that
/// `top -H`, `perf` and the benchmark's per-thread CPU tell the HTTP
/// workers, the stock actors' thread and the order writers' thread apart:
/// actix names all of them `actix-rt|system:…`, cut to the same 15 bytes.
/// Best effort: a failure changes nothing else, and outside Linux it does
/// nothing.
pub fn name_current_thread(name: &str) {
    #[cfg(target_os = "linux")]
    {
        let _ = std::fs::write("/proc/thread-self/comm", name.as_bytes());
    }
    #[cfg(not(target_os = "linux"))]
    let _ = name;
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    fn own_name() -> std::io::Result<String> {
        Ok(std::fs::read_to_string("/proc/thread-self/comm")?
            .trim_end()
            .to_owned())
    }

    #[test]
    fn names_the_calling_thread_only() -> std::io::Result<()> {
        let named = std::thread::spawn(|| {
            super::name_current_thread("fs-test-role");
            own_name()
        })
        .join()
        .map_err(|_| std::io::Error::other("the thread panicked"))??;
        assert_eq!(named, "fs-test-role");
        assert_ne!(own_name()?, "fs-test-role");
        Ok(())
    }
}
