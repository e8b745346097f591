//! A real Jaeger (v2: OTLP in, query API out) for the observability tests,
//! built by `e2e/otel-tools/build.sh` and cached under ~/.cache/kloak.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::poll::eventually_sync;
use crate::{free_port, http_get, workspace_root};

pub struct Jaeger {
    /// For `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp: String,
    pub query: std::net::SocketAddr,
    pub log: std::path::PathBuf,
}

/// The run's Jaeger (`e2e/otel-tools/serve.sh`, started by `scripts/test.sh`
/// so the whole run's leak check sees every span), or else one of this
/// test binary's own.
pub fn jaeger() -> &'static Jaeger {
    static J: OnceLock<Jaeger> = OnceLock::new();
    J.get_or_init(|| {
        if let (Ok(otlp), Ok(query)) = (
            std::env::var("KLOAK_E2E_JAEGER_OTLP"),
            std::env::var("KLOAK_E2E_JAEGER_QUERY"),
        ) {
            return Jaeger {
                otlp,
                query: query.parse().expect("KLOAK_E2E_JAEGER_QUERY is host:port"),
                log: crate::ledger::run_dir()
                    .map(|d| d.join("jaeger.log"))
                    .unwrap_or_default(),
            };
        }
        let out = Command::new("bash")
            .arg(workspace_root().join("e2e/otel-tools/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running e2e/otel-tools/build.sh");
        assert!(out.status.success(), "building Jaeger failed");
        let dir = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let (grpc, http, query, qgrpc) = (free_port(), free_port(), free_port(), free_port());
        let log = std::env::temp_dir().join(format!("kloak-jaeger-{}.log", std::process::id()));
        let f = std::fs::File::create(&log).unwrap();
        let env = [
            ("JAEGER_HOST", "127.0.0.1".to_string()),
            ("JAEGER_OTLP_GRPC", grpc.to_string()),
            ("JAEGER_OTLP_HTTP", http.to_string()),
            ("JAEGER_QUERY_HTTP", query.to_string()),
            ("JAEGER_QUERY_GRPC", qgrpc.to_string()),
        ];
        let config = workspace_root().join("e2e/otel-tools/jaeger.yaml");
        // Held by a thread that lives as long as the test binary: the death
        // signal fires when the thread that started the child ends.
        let bin = format!("{dir}/jaeger");
        std::thread::spawn(move || {
            let mut child = Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--"])
                .arg(bin)
                .arg("--config")
                .arg(config)
                .envs(env)
                .stdout(Stdio::null())
                .stderr(f)
                .spawn()
                .expect("starting jaeger");
            let _ = child.wait();
            loop {
                std::thread::park();
            }
        });
        let j = Jaeger {
            otlp: format!("http://127.0.0.1:{grpc}"),
            query: format!("127.0.0.1:{query}").parse().unwrap(),
            log,
        };
        eventually_sync(
            "Jaeger to start",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                let up = std::net::TcpStream::connect(j.query).is_ok()
                    && std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok();
                if up { Ok(()) } else { Err(j.log_text()) }
            },
        );
        j
    })
}

impl Jaeger {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every span stored for `service`, flattened, with their process.
    pub fn spans(&self, service: &str) -> (Vec<serde_json::Value>, String) {
        let (code, body) = http_get(
            self.query,
            &format!("/api/traces?service={service}&limit=100000&lookback=6h"),
        );
        assert_eq!(code, 200, "Jaeger query: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut spans = Vec::new();
        for t in v["data"].as_array().into_iter().flatten() {
            for s in t["spans"].as_array().into_iter().flatten() {
                let mut s = s.clone();
                let pid = s["processID"].as_str().unwrap_or_default().to_string();
                s["process"] = t["processes"][&pid].clone();
                spans.push(s);
            }
        }
        (spans, body)
    }

    /// Every service that has exported spans.
    pub fn services(&self) -> Vec<String> {
        let (code, body) = http_get(self.query, "/api/services");
        assert_eq!(code, 200, "Jaeger query: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    }

    /// Waits until `enough` holds for the spans of `service`.
    pub fn wait_spans(
        &self,
        service: &str,
        timeout: Duration,
        enough: impl Fn(&[serde_json::Value]) -> bool,
    ) -> (Vec<serde_json::Value>, String) {
        eventually_sync(
            &format!("Jaeger to have the spans for {service}"),
            timeout,
            Duration::from_millis(250),
            || {
                let (spans, body) = self.spans(service);
                if enough(&spans) {
                    Ok((spans, body))
                } else {
                    Err(body)
                }
            },
        )
    }
}

/// A Jaeger of one test's own (`e2e/otel-tools/serve.sh`), which the test
/// may stop mid-run; killed on drop.
pub struct OwnJaeger {
    pub jaeger: Jaeger,
    pid: i32,
    _dir: tempfile::TempDir,
}

impl OwnJaeger {
    pub fn start() -> OwnJaeger {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(workspace_root().join("e2e/otel-tools/serve.sh"))
            .arg(dir.path())
            .stderr(Stdio::inherit())
            .output()
            .expect("running e2e/otel-tools/serve.sh");
        assert!(out.status.success(), "starting Jaeger failed");
        let out = String::from_utf8(out.stdout).unwrap();
        let var = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("serve.sh printed no {k}: {out}"))
                .to_string()
        };
        let pid = std::fs::read_to_string(dir.path().join("jaeger.pid")).unwrap();
        OwnJaeger {
            jaeger: Jaeger {
                otlp: var("KLOAK_E2E_JAEGER_OTLP="),
                query: var("KLOAK_E2E_JAEGER_QUERY=").parse().unwrap(),
                log: dir.path().join("jaeger.log"),
            },
            pid: pid.trim().parse().unwrap(),
            _dir: dir,
        }
    }

    /// For a shell command that stops the collector: `kill -9 <pid>`.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for OwnJaeger {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A span's tag value by key.
pub fn tag<'a>(span: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}
