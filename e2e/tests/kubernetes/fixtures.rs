//! What every test of this binary builds on: Secrets and pods as the API
//! server takes them, the controller under test, and the waits for what it
//! does.

use std::collections::BTreeMap;
use std::future::ready;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kloak_e2e::k8s::{Gated, Kloak, control_plane};
use kloak_e2e::poll::eventually_every;
use kloak_e2e::{TlsServer, count, root_test};
use kube::api::{Api, Patch, PatchParams, PostParams};

pub const T: Duration = Duration::from_secs(20);

/// Root-only and serial like every data-path test; the body runs on a
/// current-thread runtime, with the serial lock held outside it.
pub fn k8s_test(body: impl std::future::Future<Output = ()>) {
    let Some(_g) = root_test() else { return };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(body);
}

pub fn secret(name: &str, enabled: bool, ann: &[(&str, &str)], data: &[(&str, &str)]) -> Secret {
    let labels: BTreeMap<String, String> = if enabled {
        BTreeMap::from([("getkloak.io/enabled".into(), "true".into())])
    } else {
        BTreeMap::new()
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels,
            "annotations": ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "stringData": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
    }))
    .unwrap()
}

/// A labeled Secret with one key, `token`, allowed to loopback only.
pub async fn create_local_secret(api: &Api<Secret>, name: &str, value: &str) {
    api.create(
        &PostParams::default(),
        &secret(
            name,
            true,
            &[("getkloak.io/hosts", "127.0.0.1")],
            &[("token", value)],
        ),
    )
    .await
    .unwrap();
}

pub fn placeholders(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
        .collect()
}

pub async fn shadow(api: &Api<Secret>, name: &str) -> Option<Secret> {
    api.get_opt(&format!("{name}-kloak")).await.unwrap()
}

/// A controller with its own state file (per test, kept across restarts
/// within the test).
pub fn controller(kc: &std::path::Path, extra: &[&str], log: &str) -> Kloak {
    let state = control_plane()
        .dir
        .join(format!("state-{}", log.split('-').next().unwrap_or(log)));
    let state = state.join("state.redb").display().to_string();
    let mut args = vec![
        "controller",
        "--resync-secs",
        "2",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    if !extra.contains(&"--state") {
        args.extend(["--state", &state]);
    }
    args.extend(extra);
    // Every test's agent has a node of its own: agents sharing pods would
    // stop, patch and (through their guardians) continue each other's.
    Kloak::start(&args, kc, &node_of(log), log)
}

/// The node a test's controller serves, from the first word of its log name.
pub fn node_of(log: &str) -> String {
    format!("node-{}", log.split('-').next().unwrap_or(log))
}

pub fn assert_no_values(log: &str, values: &[&str]) {
    for v in values {
        assert_eq!(
            count(log.as_bytes(), v.as_bytes()),
            0,
            "a secret value is in the log"
        );
    }
}

pub fn pod(name: &str, labels: serde_json::Value, spec: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels}, "spec": spec,
    }))
    .unwrap()
}

/// A pod on `node` whose one container takes the given `(env, shadow, key)`
/// references, already annotated as the webhook would have.
pub fn annotated_pod(node: &str, name: &str, refs: &[(&str, &str, &str)]) -> Pod {
    let env: Vec<serde_json::Value> = refs
        .iter()
        .map(|(env, shadow, key)| {
            serde_json::json!({"name": env, "valueFrom": {"secretKeyRef": {"name": shadow, "key": key}}})
        })
        .collect();
    let mut p = pod(
        name,
        serde_json::json!({}),
        serde_json::json!({"nodeName": node, "containers": [{"name": "app", "image": "app", "env": env}]}),
    );
    p.metadata.annotations = Some(BTreeMap::from([(
        "getkloak.io/enabled".into(),
        "true".into(),
    )]));
    p
}

/// A pod on this test's node, already annotated by the webhook, whose one
/// container takes `key` of the shadow `api-kloak`.
pub fn node_pod(node: &str, name: &str, key: &str) -> Pod {
    annotated_pod(node, name, &[("T", "api-kloak", key)])
}

/// The pod as the kubelet would report it: running containers with IDs.
pub async fn set_running(pods: &Api<Pod>, name: &str, containers: &[(&str, String)]) {
    let statuses: Vec<serde_json::Value> = containers
        .iter()
        .map(|(n, id)| {
            serde_json::json!({"name": n, "image": "app", "imageID": "", "ready": true,
                "restartCount": 0, "containerID": id, "state": {"running": {}}})
        })
        .collect();
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"status": {"phase": "Running", "containerStatuses": statuses}}),
        ),
    )
    .await
    .unwrap();
}

/// One request from `g`; what the server received.
pub fn send(srv: &TlsServer, g: &mut Gated) -> Vec<u8> {
    srv.clear();
    g.send();
    srv.wait_for(1, Duration::from_secs(5)).remove(0)
}

/// Sends from `g` every 200 ms until `expected` arrives twice (header and
/// body); panics naming `what` with the agent's log after `timeout`.
pub async fn until_received(
    srv: &TlsServer,
    g: &mut Gated,
    expected: &str,
    ctl: &Kloak,
    timeout: Duration,
    what: &str,
) {
    eventually_every(what, timeout, Duration::from_millis(200), || {
        let got = count(&send(srv, g), expected.as_bytes()) == 2;
        ready(if got { Ok(()) } else { Err(ctl.log_text()) })
    })
    .await
}

pub fn readyz(ctl: &mut Kloak) -> (u16, serde_json::Value) {
    let (code, body) = kloak_e2e::http_get(ctl.admin_addr(), "/readyz");
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("readyz body {body:?}: {e}"));
    (code, v)
}

pub async fn until_ready(ctl: &mut Kloak) -> serde_json::Value {
    eventually_every("readyz 200", T, Duration::from_millis(100), || {
        let (code, v) = readyz(ctl);
        ready(if code == 200 {
            assert_eq!(v["ready"], true, "{v}");
            Ok(v)
        } else {
            Err(format!("{v}\n{}", ctl.log_text()))
        })
    })
    .await
}
