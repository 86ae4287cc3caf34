use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let config = yard_agent::AgentConfig::parse();
    let Some(log_format) = telemetry::LogFormat::parse(&config.log_format) else {
        eprintln!("error: LOG_FORMAT must be `json` or `compact`");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Inside the runtime: the OTLP exporter needs it.
        let _telemetry = match telemetry::init(&telemetry::TelemetryConfig {
            service_name: "yard-agent",
            log_format,
            filter: std::env::var("RUST_LOG").ok().filter(|f| !f.is_empty()),
            otlp_endpoint: config.otlp_endpoint.clone().filter(|e| !e.is_empty()),
        }) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(2);
            }
        };
        let drain = CancellationToken::new();
        tokio::spawn(drain_on_signal(drain.clone()));
        match yard_agent::run(config, drain).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "yard-agent stopped");
                ExitCode::FAILURE
            }
        }
    })
}

/// The first SIGTERM/SIGINT drains (finish running jobs, take no new
/// ones); a second one exits at once.
async fn drain_on_signal(drain: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if round == 0 {
            tracing::info!("signal received: draining");
            drain.cancel();
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}
