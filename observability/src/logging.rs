//! Logs: text or JSON on stderr, filtered by `RUST_LOG` (or a default),
//! with the filter swappable at runtime through [`LogHandle`].

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log format {s:?}: expected text or json")),
        }
    }
}

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    /// Replaces the filter with `directives` (`RUST_LOG` syntax), e.g.
    /// `debug` or `info,kloak::datapath=trace`.
    pub fn set(&self, directives: &str) -> Result<(), Error> {
        let f = EnvFilter::try_new(directives).map_err(|e| Error::Filter {
            directives: directives.into(),
            reason: e.to_string(),
        })?;
        self.reload
            .modify(|cur| *cur = f)
            .map_err(|e| Error::Subscriber(e.to_string()))
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.reload
            .with_current(|f| f.to_string())
            .unwrap_or_default()
    }
}

/// Installs the process's subscriber. With `otel`, spans made through
/// `tracing` are exported too (the audit spans are not `tracing` spans: they
/// carry the kernel's timestamps, see [`crate::audit`]).
pub fn init(
    format: LogFormat,
    default: &str,
    otel: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
) -> Result<LogHandle, Error> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let (filter, reload) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    let otel = otel.map(|p| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer().with_tracer(p.tracer("kloak"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .map_err(|e| Error::Subscriber(e.to_string()))?;
    Ok(LogHandle { reload })
}
