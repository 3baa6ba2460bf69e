//! The `contextos` command line: local runs, records, replay, and the runner-pod entrypoint.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

    let cli = cli::Cli::parse();
    // Logs (the gateway service's refusals, warnings) go to stderr; RUST_LOG adjusts the level.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        );
    // Spans go to an OpenTelemetry collector when OTEL_EXPORTER_OTLP_ENDPOINT names one; the
    // exporter flushes when `_telemetry` is dropped, after the runtime has stopped.
    #[cfg(feature = "otlp")]
    let (traces, _telemetry) =
        match contextos_runner::telemetry::from_env(cli.service_name(), cli.trace_relay()) {
            Ok(Some((layer, telemetry))) => (Some(layer), Some(telemetry)),
            Ok(None) => (None, None),
            Err(e) => {
                eprintln!("contextos: traces are not exported: {e}");
                (None, None)
            }
        };
    #[cfg(not(feature = "otlp"))]
    let traces: Option<tracing_subscriber::layer::Identity> = None;
    tracing_subscriber::registry().with(logs).with(traces).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("contextos: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(code) => code,
        Err(e) => {
            // An error can carry what a remote answered (a model, a tool, an MCP server).
            eprintln!(
                "contextos: {}",
                contextos_runner::text::for_terminal_keeping_lines(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}
