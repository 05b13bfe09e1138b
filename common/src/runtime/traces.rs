//! OpenTelemetry traces of the saga, exported over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (off by default; then every function
//! here returns at once).
//!
//! One saga is one trace: the trace id is the order id, as in every
//! message's `traceparent` ([`crate::messaging::envelope::traceparent`]).
//! Each service exports two kinds of span, with ids derived from the events
//! so that the four services' spans join up without any of them having to
//! tell another its ids:
//!
//! - `<routing key> publish` (producer): one per event a service publishes;
//!   its span id is the one in the event's `traceparent`, its parent the
//!   span of the handling that emitted it (the event's `causation_id`).
//! - `<routing key> process` (consumer): one per message a service handles,
//!   from its batch's start to its end; its parent is the message's
//!   `traceparent`, its id derived from the service and the message's id.
//!
//! Spans are batched and sent by the SDK's own thread; a collector that is
//! down costs dropped spans, never a saga.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};
use serde::Deserialize;
use uuid::Uuid;

use crate::messaging::delivery::Incoming;
use crate::messaging::events::EXCHANGE;
use crate::messaging::outbox::OutboxMessage;

/// Whether any service of this process exports (a cheap check first).
static ENABLED: AtomicBool = AtomicBool::new(false);
/// The exporting services of this process, by name (one in production; the
/// tests run four in one process, so a service's spans go wherever the last
/// service of that name installed).
static TRACERS: Mutex<Vec<(&'static str, SdkTracerProvider, SdkTracer)>> = Mutex::new(Vec::new());

thread_local! {
    /// The ids the next span built on this thread takes (see [`SagaIds`]).
    static NEXT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Span ids derived from the saga's events instead of random ones: the SDK
/// asks its id generator while building a span, on the building thread, so
/// the ids set just before are the ones it gets.
#[derive(Debug, Default)]
struct SagaIds(RandomIdGenerator);

impl IdGenerator for SagaIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_IDS
            .get()
            .map_or_else(|| self.0.new_trace_id(), |(trace, _)| trace)
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_IDS
            .get()
            .map_or_else(|| self.0.new_span_id(), |(_, span)| span)
    }
}

/// The OTLP/HTTP encoding (`OTEL_EXPORTER_OTLP_PROTOCOL`).
pub fn protocol(name: &str) -> Result<Protocol, String> {
    match name {
        "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Ok(Protocol::HttpJson),
        other => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not supported: use http/protobuf or http/json"
        )),
    }
}

/// Starts exporting `service`'s spans to the collector at `endpoint` (its
/// base URL, e.g. `http://127.0.0.1:4318`; `/v1/traces` is added unless
/// the URL already ends with it).
pub fn install(service: &'static str, endpoint: &str, protocol: Protocol) -> anyhow::Result<()> {
    let base = endpoint.trim_end_matches('/');
    let url = if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .with_endpoint(url)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(SagaIds::default())
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer(service);
    let mut tracers = TRACERS.lock().unwrap_or_else(PoisonError::into_inner);
    tracers.retain(|(s, _, _)| *s != service);
    tracers.push((service, provider, tracer));
    ENABLED.store(true, Ordering::Release);
    Ok(())
}

/// Sends what `service` has not sent yet and stops its export (shutdown).
pub fn shutdown(service: &'static str) {
    let provider = {
        let mut tracers = TRACERS.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(i) = tracers.iter().position(|(s, _, _)| *s == service) else {
            return;
        };
        let (_, provider, _) = tracers.remove(i);
        if tracers.is_empty() {
            ENABLED.store(false, Ordering::Release);
        }
        provider
    };
    if let Err(error) = provider.shutdown() {
        tracing::debug!(%error, "trace export shut down with spans unsent");
    }
}

fn tracer(service: &str) -> Option<SdkTracer> {
    if !ENABLED.load(Ordering::Acquire) {
        return None;
    }
    TRACERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|(s, _, _)| *s == service)
        .map(|(_, _, t)| t.clone())
}

/// `(trace id, span id)` of a W3C `traceparent`.
fn parse_traceparent(tp: &str) -> Option<(TraceId, SpanId)> {
    let mut parts = tp.split('-');
    let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    (trace != TraceId::INVALID && span != SpanId::INVALID).then_some((trace, span))
}

/// The span id of `service` handling the event `event_id`.
fn handling_span_id(service: &str, event_id: Uuid) -> SpanId {
    let derived = Uuid::new_v5(&event_id, service.as_bytes());
    let bytes = derived.as_bytes();
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    SpanId::from_bytes(id)
}

fn remote_parent(trace: TraceId, span: SpanId) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        trace,
        span,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// Builds a span with the given ids (the SDK takes them from [`SagaIds`]).
fn span_with_ids(
    tracer: &SdkTracer,
    builder: opentelemetry::trace::SpanBuilder,
    parent: &Context,
    ids: (TraceId, SpanId),
) -> opentelemetry_sdk::trace::Span {
    NEXT_IDS.set(Some(ids));
    let span = builder.start_with_context(tracer, parent);
    NEXT_IDS.set(None);
    span
}

/// Records the handling of each message of a batch: `outcomes` in the
/// batch's order (`ok`, `retry`, `parked`, `escalated`).
pub fn consumed<'a>(
    service: &str,
    handled: impl IntoIterator<Item = (&'a Incoming, &'static str)>,
    batch_size: usize,
    started: SystemTime,
    ended: SystemTime,
) {
    let Some(tracer) = tracer(service) else {
        return;
    };
    for (msg, outcome) in handled {
        let Some((trace, parent)) = msg.traceparent.as_deref().and_then(parse_traceparent) else {
            continue;
        };
        let Some(event_id) = msg
            .message_id
            .as_deref()
            .and_then(|m| m.parse::<Uuid>().ok())
        else {
            continue;
        };
        let builder = tracer
            .span_builder(format!("{} process", msg.routing_key))
            .with_kind(SpanKind::Consumer)
            .with_start_time(started)
            .with_attributes([
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.name", EXCHANGE),
                KeyValue::new(
                    "messaging.rabbitmq.destination.routing_key",
                    msg.routing_key.clone(),
                ),
                KeyValue::new("messaging.message.id", event_id.to_string()),
                KeyValue::new("messaging.batch.message_count", batch_size as i64),
                KeyValue::new("saga.outcome", outcome),
                KeyValue::new("saga.attempt", i64::from(msg.attempt)),
            ]);
        let mut span = span_with_ids(
            &tracer,
            builder,
            &remote_parent(trace, parent),
            (trace, handling_span_id(service, event_id)),
        );
        span.end_with_timestamp(ended);
    }
}

#[derive(Deserialize)]
struct Causation {
    causation_id: Option<String>,
}

/// Records the publishing of saga events (those with a `traceparent`).
pub fn published(service: &str, messages: &[OutboxMessage]) {
    let Some(tracer) = tracer(service) else {
        return;
    };
    let now = SystemTime::now();
    for m in messages {
        let Some((trace, span_id)) = m.traceparent.as_deref().and_then(parse_traceparent) else {
            continue;
        };
        // The handling that emitted it, if an event caused it (an order
        // placed over HTTP starts the trace).
        let cause: Option<Uuid> = serde_json::from_slice::<Causation>(&m.body)
            .ok()
            .and_then(|c| c.causation_id)
            .and_then(|c| c.parse().ok());
        let parent = match cause {
            Some(cause) => remote_parent(trace, handling_span_id(service, cause)),
            None => Context::new(),
        };
        let builder = tracer
            .span_builder(format!("{} publish", m.routing_key))
            .with_kind(SpanKind::Producer)
            .with_start_time(now)
            .with_attributes([
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "publish"),
                KeyValue::new("messaging.destination.name", m.exchange.clone()),
                KeyValue::new(
                    "messaging.rabbitmq.destination.routing_key",
                    m.routing_key.clone(),
                ),
                KeyValue::new("messaging.message.id", m.id.to_string()),
            ]);
        let mut span = span_with_ids(&tracer, builder, &parent, (trace, span_id));
        span.end_with_timestamp(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::envelope::traceparent;

    #[test]
    fn a_messages_traceparent_gives_the_order_as_trace_and_the_event_as_span() {
        let order = Uuid::now_v7();
        let event = Uuid::now_v7();
        let (trace, span) = parse_traceparent(&traceparent(order, event)).unwrap();
        assert_eq!(trace.to_string(), order.simple().to_string());
        assert_eq!(span.to_string(), event.simple().to_string()[16..]);
        assert!(parse_traceparent("00-zz-11-01").is_none());
        assert!(parse_traceparent("garbage").is_none());
    }

    #[test]
    fn each_service_handling_an_event_has_its_own_stable_span() {
        let event = Uuid::now_v7();
        assert_eq!(
            handling_span_id("payment-svc", event),
            handling_span_id("payment-svc", event)
        );
        assert_ne!(
            handling_span_id("payment-svc", event),
            handling_span_id("inventory-svc", event)
        );
    }

    #[test]
    fn only_http_protocols_are_accepted() {
        assert!(protocol("http/json").is_ok());
        assert!(protocol("http/protobuf").is_ok());
        assert!(protocol("grpc").is_err());
    }
}
