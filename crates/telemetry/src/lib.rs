//! Tracing for every service, set up once: an env filter with noisy crates
//! turned down, JSON or compact log lines, and OpenTelemetry export over
//! OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Also the W3C
//! trace-context helpers that carry a trace across Redis messages and gRPC
//! metadata.
//!
//! Spans are always recorded by an OpenTelemetry tracer, even with no
//! endpoint configured (the provider then has no exporter, so nothing
//! leaves the process): that is what gives every request a trace id for the
//! logs and lets an incoming `traceparent` flow on to the next hop.

use std::collections::HashMap;

use domain::events::TraceContext;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
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
    init_with_writer(config, std::io::stdout)
}

/// [`init`], writing log lines to `writer` instead of stdout (tests read
/// what would be logged).
pub fn init_with_writer<W>(config: &TelemetryConfig, writer: W) -> Result<TelemetryGuard, String>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(config.filter.as_deref().unwrap_or(DEFAULT_FILTER))
        .map_err(|e| format!("RUST_LOG: {e}"))?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let provider = match &config.otlp_endpoint {
        None => SdkTracerProvider::builder().build(),
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
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build()
        }
    };
    opentelemetry::global::set_tracer_provider(provider.clone());
    let otel_layer =
        tracing_opentelemetry::layer().with_tracer(provider.tracer(config.service_name));

    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let result = match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .json()
                    .flatten_event(true)
                    // Every enclosing span's fields (request id, trace id,
                    // job id, epoch), not only the innermost one's.
                    .with_current_span(true)
                    .with_span_list(true),
            )
            .try_init(),
        LogFormat::Compact => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .compact(),
            )
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// The W3C trace context of the current span, to put on a bus message or
/// in gRPC metadata. `None` when no trace is being recorded.
pub fn current_trace_context() -> Option<TraceContext> {
    trace_context_of(&tracing::Span::current())
}

/// The W3C trace context of `span` (see [`current_trace_context`]).
pub fn trace_context_of(span: &tracing::Span) -> Option<TraceContext> {
    let context = span.context();
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
///
/// Call it right after creating the span, before it is entered. A
/// malformed `traceparent` is ignored (the span starts a trace of its own).
/// Also records the span's `trace_id` field, when it declares one.
pub fn continue_trace(span: &tracing::Span, trace: &TraceContext) {
    let parent = TraceContextPropagator::new().extract(&carrier_of(trace));
    let _ = span.set_parent(parent);
    record_trace_id(span);
}

/// [`continue_trace`] when there is a trace to continue; otherwise only
/// records the span's `trace_id` field (the span keeps its own trace).
pub fn adopt_trace(span: &tracing::Span, trace: Option<&TraceContext>) {
    match trace {
        Some(trace) => continue_trace(span, trace),
        None => record_trace_id(span),
    }
}

/// The span's trace id as 32 hex digits; `None` when it is not recorded.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Fills the span's `trace_id` field (declare it as
/// `trace_id = tracing::field::Empty`), so JSON log lines carry it.
pub fn record_trace_id(span: &tracing::Span) {
    if let Some(id) = trace_id_of(span) {
        span.record("trace_id", id.as_str());
    }
}

/// The trace id inside a `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_in(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    (trace_id.len() == 32 && trace_id.chars().all(|c| c.is_ascii_hexdigit())).then_some(trace_id)
}

fn carrier_of(trace: &TraceContext) -> HashMap<String, String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    carrier.insert("traceparent".into(), trace.traceparent.clone());
    if let Some(state) = &trace.tracestate {
        carrier.insert("tracestate".into(), state.clone());
    }
    carrier
}

/// An in-memory tracer for tests that check propagation with real spans.
#[cfg(feature = "testing")]
pub mod testing {
    use std::sync::OnceLock;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt;

    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();

    /// Installs, once per process, a global subscriber whose spans go to
    /// an in-memory exporter (exported as each span ends), and returns it.
    /// Tests sharing the process tell their spans apart by trace id.
    pub fn install() -> InMemorySpanExporter {
        EXPORTER
            .get_or_init(|| {
                let exporter = InMemorySpanExporter::default();
                let provider = SdkTracerProvider::builder()
                    .with_simple_exporter(exporter.clone())
                    .build();
                opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
                let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
                let subscriber = tracing_subscriber::registry()
                    .with(filter)
                    .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
                tracing::subscriber::set_global_default(subscriber)
                    .expect("no other global subscriber is installed before the tracer");
                // Kept for the life of the process.
                std::mem::forget(provider);
                exporter
            })
            .clone()
    }

    /// Finished spans of one trace.
    pub fn spans_of(exporter: &InMemorySpanExporter, trace_id: &str) -> Vec<SpanData> {
        exporter
            .get_finished_spans()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.span_context.trace_id().to_string() == trace_id)
            .collect()
    }
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

    #[test]
    fn trace_ids_are_read_from_traceparents() {
        assert_eq!(
            trace_id_in("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_in("00-nothex-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id_in("garbage"), None);
    }

    #[test]
    fn a_span_continues_the_trace_it_is_given_and_passes_it_on() {
        use opentelemetry::trace::TracerProvider as _;
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let incoming = TraceContext {
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                tracestate: Some("vendor=x".into()),
            };
            let span = tracing::info_span!("hop", trace_id = tracing::field::Empty);
            continue_trace(&span, &incoming);
            let outgoing = span.in_scope(current_trace_context).expect("recorded");
            assert_eq!(
                trace_id_in(&outgoing.traceparent),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            assert_ne!(outgoing.traceparent, incoming.traceparent, "a new span id");
            assert_eq!(outgoing.tracestate.as_deref(), Some("vendor=x"));
            assert_eq!(
                trace_id_of(&span).as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );

            // Garbage starts a fresh trace instead of failing.
            let fresh = tracing::info_span!("hop");
            adopt_trace(
                &fresh,
                Some(&TraceContext {
                    traceparent: "nonsense".into(),
                    tracestate: None,
                }),
            );
            let own = trace_context_of(&fresh).expect("recorded");
            assert_ne!(
                trace_id_in(&own.traceparent),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
        });
    }
}
