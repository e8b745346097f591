//! Spans in a real Jaeger naming the pod, the container and the Secret of
//! each substitution, the admin port's metrics, and the log level changed
//! at runtime.

use std::future::ready;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kloak_e2e::k8s::{FakeContainer, Gated, Kloak, control_plane, ensure_namespace};
use kloak_e2e::poll::{eventually, eventually_every};
use kloak_e2e::{TlsServer, count, random_secret};
use kube::api::{Api, PostParams};

use crate::fixtures::{
    T, assert_no_values, create_local_secret, k8s_test, node_of, node_pod, placeholders, send,
    set_running, shadow, until_received,
};

#[test]
fn spans_name_the_pod_and_the_secret_in_jaeger() {
    k8s_test(spans_body());
}

async fn spans_body() {
    use kloak_e2e::otel::{jaeger, tag};
    let j = jaeger();
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-spans").await;
    let admin = cp.admin().await;
    let ns = "spans";
    ensure_namespace(&admin, ns, false).await;
    let srv = TlsServer::start();
    let api: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let token = random_secret("span-", 28);
    let other = random_secret("oth-", 28);
    for (name, v) in [("api", &token), ("other", &other)] {
        create_local_secret(&api, name, v).await;
    }
    let service = format!("kloak-k8s-{}", std::process::id());
    let node = node_of("spans");
    let state = cp.dir.join("state-spans/state.redb").display().to_string();
    let mut ctl = Kloak::start_with_env(
        &[
            "controller",
            "--resync-secs",
            "2",
            "--admin-listen",
            "127.0.0.1:0",
            "--no-webhook-cert",
            "--state",
            &state,
        ],
        &kc,
        &node,
        "spans-controller",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &j.otlp),
            ("OTEL_SERVICE_NAME", &service),
        ],
    );
    let ph =
        placeholders(&eventually("the shadow", T, || async { shadow(&api, "api").await }).await);
    let ph_other = placeholders(
        &eventually("shadow other", T, || async { shadow(&api, "other").await }).await,
    );
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let p = pods
        .create(&PostParams::default(), &node_pod(&node, "web", "token"))
        .await
        .unwrap();
    let mut c = FakeContainer::new(p.metadata.uid.as_deref().unwrap(), false);
    set_running(&pods, "web", &[("app", c.container_id())]).await;
    let client = kloak_e2e::py_cmd("gated", &srv, &[]);
    let mut g = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph["token"])]));
    until_received(&srv, &mut g, &token, &ctl, T, "the agent to serve").await;
    // A process of this pod that learned another Secret's placeholder.
    let mut stray = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph_other["token"])]));
    let r = send(&srv, &mut stray);
    assert_eq!(count(&r, other.as_bytes()), 0, "not bound: unchanged");

    let (spans, raw) = j.wait_spans(&service, T, |s| {
        s.iter()
            .any(|x| tag(x, "kloak.outcome").and_then(|v| v.as_str()) == Some("rewritten"))
    });
    let r = spans
        .iter()
        .find(|x| tag(x, "kloak.outcome").and_then(|v| v.as_str()) == Some("rewritten"))
        .unwrap();
    let s = |k: &str| {
        tag(r, k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(s("k8s.namespace.name"), ns, "{r}");
    assert_eq!(s("k8s.pod.name"), "web", "{r}");
    assert_eq!(s("k8s.container.name"), "app", "{r}");
    assert_eq!(s("kloak.secret.namespace"), ns, "{r}");
    assert_eq!(s("kloak.secret.name"), "api", "{r}");
    assert_eq!(s("kloak.secret.key"), "token", "{r}");
    assert_eq!(s("network.peer.address"), "127.0.0.1", "{r}");
    let node_tag = r["process"]["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["key"] == "k8s.node.name" && t["value"] == node.as_str());
    assert!(node_tag, "resource: {}", r["process"]);
    let (spans, _) = j.wait_spans(&service, T, |s| {
        s.iter()
            .any(|x| tag(x, "kloak.outcome").and_then(|v| v.as_str()) == Some("blocked"))
    });
    let b = spans
        .iter()
        .find(|x| tag(x, "kloak.outcome").and_then(|v| v.as_str()) == Some("blocked"))
        .unwrap();
    assert_eq!(tag(b, "error"), Some(&serde_json::json!(true)), "{b}");
    assert_eq!(
        tag(b, "kloak.secret.name").and_then(|v| v.as_str()),
        Some("other"),
        "{b}"
    );
    assert_eq!(
        tag(b, "kloak.blocked.reason").and_then(|v| v.as_str()),
        Some("the pod does not reference this secret"),
        "{b}"
    );
    assert_eq!(
        count(raw.as_bytes(), token.as_bytes()),
        0,
        "a value in Jaeger"
    );
    // The admin port counts what went out.
    let (_, metrics) = kloak_e2e::http_get(ctl.admin_addr(), "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kloak_spans_exported_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    for want in [
        r#"kloak_substitutions_total{outcome="rewritten",backend="pause",library="openssl"} "#,
        r#"kloak_substitutions_total{outcome="blocked",backend="pause",library="openssl"} "#,
        r#"kloak_blocked_total{reason="not_bound"} "#,
        "kloak_pause_duration_seconds_count ",
        "kloak_secret_sync_duration_seconds_count ",
    ] {
        let n: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(want))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {want}in:\n{metrics}"));
        assert!(n >= 1.0, "{want}{n}");
    }
    assert_no_values(&metrics, &[&token, &other]);
    // The data path's gauges: map fill, processes, lost events.
    let gauge = |m: &str, name: &str| -> Option<f64> {
        m.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let every = Duration::from_millis(500);
    eventually_every("the data path's gauges", T, every, || {
        let (_, m) = kloak_e2e::http_get(ctl.admin_addr(), "/metrics");
        let ok = gauge(&m, r#"kloak_bpf_map_entries{map="secret_map"} "#) >= Some(2.0)
            && gauge(&m, r#"kloak_bpf_map_capacity{map="secret_map"} "#) >= Some(64.0)
            && gauge(&m, r#"kloak_bpf_map_entries{map="tracked_cgroups"} "#) >= Some(1.0)
            && gauge(&m, "kloak_tracked_processes ") >= Some(2.0)
            && gauge(&m, "kloak_ringbuf_lost_events_total ") == Some(0.0)
            && gauge(&m, "kloak_attach_errors_total ").is_some();
        ready(if ok { Ok(()) } else { Err(m) })
    })
    .await;

    // The log level changes at runtime: debug lines appear after the PUT.
    let admin_addr = ctl.admin_addr();
    assert!(!ctl.log_text().contains("DEBUG"), "started at info");
    let (code, body) = kloak_e2e::http_request(admin_addr, "PUT", "/logging", "debug,kube=warn");
    assert_eq!(code, 200, "{body}");
    let (code, body) = kloak_e2e::http_request(admin_addr, "PUT", "/logging", "debug,=bad=");
    assert_eq!(code, 400, "a bad filter is refused: {body}");
    assert!(body.contains("not valid"), "{body}");
    let debug = "the agent to serve at debug level";
    until_received(&srv, &mut g, &token, &ctl, T, debug).await;
    eventually("debug lines", T, || async {
        ctl.log_text().contains("DEBUG").then_some(())
    })
    .await;
    ctl.assert_running();
    assert_no_values(&ctl.log_text(), &[&token]);
}
