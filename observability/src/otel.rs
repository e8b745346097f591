//! OTLP export settings from the standard environment variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (export is on when it is set),
//! `OTEL_SERVICE_NAME` (default `kloak-agent`), `OTEL_RESOURCE_ATTRIBUTES`.

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;

use crate::Error;

pub const DEFAULT_SERVICE: &str = "kloak-agent";

#[derive(Debug, Clone)]
pub struct OtelSettings {
    pub endpoint: String,
    pub resource: Resource,
}

impl OtelSettings {
    /// None when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset or empty.
    pub fn from_env(version: &str, node: Option<&str>) -> Option<OtelSettings> {
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())?;
        Some(OtelSettings::new(endpoint, version, node))
    }

    pub fn new(endpoint: String, version: &str, node: Option<&str>) -> OtelSettings {
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| {
                a.split(',')
                    .any(|kv| kv.trim().starts_with("service.name="))
            });
        // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
        let mut b = Resource::builder();
        if !named {
            b = b.with_service_name(DEFAULT_SERVICE);
        }
        b = b.with_attribute(KeyValue::new("service.version", version.to_string()));
        if let Some(n) = node {
            b = b.with_attribute(KeyValue::new("k8s.node.name", n.to_string()));
        }
        OtelSettings {
            endpoint,
            resource: b.build(),
        }
    }

    /// The OTLP/gRPC span exporter. Must be called inside a tokio runtime.
    pub fn exporter(&self) -> Result<opentelemetry_otlp::SpanExporter, Error> {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(self.endpoint.clone())
            .with_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Exporter {
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            })
    }

    /// A provider with the SDK's batch processor, for `tracing` spans.
    /// Must be called inside a tokio runtime.
    pub fn tracer_provider(&self) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, Error> {
        Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_resource(self.resource.clone())
            .with_batch_exporter(self.exporter()?)
            .build())
    }
}
