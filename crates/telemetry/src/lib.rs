//! Tracing for every service, set up once: an env filter with noisy crates
//! turned down, JSON or compact log lines, and OpenTelemetry export over
//! OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Also the W3C
//! trace-context helpers that carry a trace across Redis messages and gRPC
//! metadata.

use std::collections::HashMap;

use domain::events::TraceContext;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Compact,
}

impl LogFormat {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "json" => Some(LogFormat::Json),
            "compact" | "text" => Some(LogFormat::Compact),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    pub service_name: &'static str,
    pub log_format: LogFormat,
    /// Filter directives (`RUST_LOG`); `None` means `info` with noisy crates at `warn`.
    pub filter: Option<String>,
    pub otlp_endpoint: Option<String>,
}

/// Keeps the exporter alive; flushes pending spans when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

const DEFAULT_FILTER: &str = "info,h2=warn,hyper=warn,tower=warn,tonic=warn,actix_server=warn,tokio_postgres=warn,opentelemetry=warn";

/// Installs the global subscriber. Call once, at start-up, from `main`.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, String> {
    let filter = EnvFilter::try_new(config.filter.as_deref().unwrap_or(DEFAULT_FILTER))
        .map_err(|e| format!("RUST_LOG: {e}"))?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service_name)
                .build();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            Some(provider)
        }
        None => None,
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(config.service_name)));

    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let result = match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Compact => registry
            .with(tracing_subscriber::fmt::layer().compact())
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(TelemetryGuard { provider })
}

/// The W3C trace context of the current span, to put on a bus message or
/// in gRPC metadata. `None` when no trace is being recorded.
pub fn current_trace_context() -> Option<TraceContext> {
    let context = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier
        .remove("traceparent")
        .map(|traceparent| TraceContext {
            traceparent,
            tracestate: carrier.remove("tracestate").filter(|s| !s.is_empty()),
        })
}

/// Makes `span` a child of the trace described by `trace` (from a bus
/// message or gRPC metadata), so one job's life reads as one trace.
pub fn continue_trace(span: &tracing::Span, trace: &TraceContext) {
    let mut carrier: HashMap<String, String> = HashMap::new();
    carrier.insert("traceparent".into(), trace.traceparent.clone());
    if let Some(state) = &trace.tracestate {
        carrier.insert("tracestate".into(), state.clone());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse() {
        assert_eq!(LogFormat::parse("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("compact"), Some(LogFormat::Compact));
        assert_eq!(LogFormat::parse("xml"), None);
    }

    #[test]
    fn no_trace_context_without_a_recording_span() {
        assert_eq!(current_trace_context(), None);
    }
}
