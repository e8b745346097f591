//! The node agent's wire backend: a pod behind a veth, as a CNI would wire
//! it, gets its value patched on the host side of its veth. The pod holds
//! `CAP_NET_RAW` in its own network namespace (containers get it by
//! default), taps its own `eth0` and decrypts the capture with its own TLS
//! keys (the key log its TLS library wrote): it reads only the placeholder,
//! while the server received the real value.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kloak_e2e::k8s::{FakeContainer, Gated, control_plane, ensure_namespace};
use kloak_e2e::poll::eventually;
use kloak_e2e::{Netns, TlsServer, count, fixtures, http_get, py_client, random_secret};
use kube::api::{Api, PostParams};

use crate::fixtures::{
    T, assert_no_values, controller, k8s_test, node_of, node_pod, placeholders, secret, send,
    set_running, shadow, until_received,
};

const HOST: &str = "10.199.7.1";
const POD: &str = "10.199.7.2";

/// A veth pair: the pod's end is `eth0` in `ns`, the host's end stays here.
struct Veth {
    host: String,
}

impl Veth {
    fn new(ns: &Netns) -> Veth {
        let host = format!("kvh{}", std::process::id() % 100_000);
        let peer = format!("{host}p");
        let _ = Command::new("ip")
            .args(["link", "del", &host])
            .stderr(Stdio::null())
            .status();
        ns.run(
            &[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", &peer,
            ],
            false,
        );
        ns.run(&["ip", "link", "set", &peer, "netns", &ns.name], false);
        ns.run(
            &["ip", "addr", "add", &format!("{HOST}/24"), "dev", &host],
            false,
        );
        ns.run(&["ip", "link", "set", &host, "up"], false);
        ns.run(&["ip", "link", "set", &peer, "name", "eth0"], true);
        ns.run(
            &["ip", "addr", "add", &format!("{POD}/24"), "dev", "eth0"],
            true,
        );
        ns.run(&["ip", "link", "set", "eth0", "up"], true);
        Veth { host }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .stderr(Stdio::null())
            .status();
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_pod_behind_a_veth_gets_its_value_on_the_wire_and_its_own_capture_holds_only_the_placeholder() {
    k8s_test(body());
}

async fn body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-node").await;
    let admin = cp.admin().await;
    ensure_namespace(&admin, "wirepods", false).await;
    let ns = Netns::new("kloak-pod");
    let _veth = Veth::new(&ns);
    let srv = TlsServer::start_on(&[HOST]);
    let api: Api<Secret> = Api::namespaced(admin.clone(), "wirepods");
    let token = random_secret("wire-", 30);
    api.create(
        &PostParams::default(),
        &secret(
            "api",
            true,
            &[("getkloak.io/hosts", HOST)],
            &[("token", &token)],
        ),
    )
    .await
    .unwrap();
    // No --mode: auto picks the wire on this kernel.
    let mut ctl = controller(&kc, &["--no-webhook-cert"], "wireveth-controller");
    let sh = eventually("the shadow", T, || async { shadow(&api, "api").await }).await;
    let ph = placeholders(&sh);

    let pods: Api<Pod> = Api::namespaced(admin.clone(), "wirepods");
    let one = pods
        .create(
            &PostParams::default(),
            &node_pod(&node_of("wireveth"), "one", "token"),
        )
        .await
        .unwrap();
    let mut c = FakeContainer::new(one.metadata.uid.as_deref().unwrap(), false);
    let work = tempfile::tempdir().unwrap();
    let keylog = work.path().join("keys.log");
    let capture = work.path().join("eth0.cap");

    // The pod taps its own eth0, as root in its namespace.
    let mut tap = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg("--")
        .arg("python3")
        .arg(fixtures().join("capture.py"))
        .arg("eth0")
        .arg(&capture)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(tap.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY", "the capture did not start");

    let argv: Vec<String> = [
        "nsenter".to_string(),
        format!("--net=/run/netns/{}", ns.name),
        "--".into(),
        "python3".into(),
        py_client(),
        "gated".into(),
        "--port".into(),
        srv.port.to_string(),
        "--cacert".into(),
        srv.cacert().display().to_string(),
        "--ip".into(),
        HOST.into(),
    ]
    .into();
    let keylog_s = keylog.display().to_string();
    let mut g = Gated::new(c.spawn(
        &argv,
        &[("API_TOKEN", &ph["token"]), ("SSLKEYLOGFILE", &keylog_s)],
    ));
    set_running(&pods, "one", &[("app", c.container_id())]).await;
    until_received(&srv, &mut g, &token, &ctl, T, "the pod to get its token").await;
    // A few more, all real, all from the wire.
    for _ in 0..5 {
        let r = send(&srv, &mut g);
        assert_eq!(count(&r, token.as_bytes()), 2);
        assert_eq!(count(&r, b"kloak:"), 0);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = tap.kill();
    let _ = tap.wait();
    // What the pod could read from its own capture with its own keys.
    let out = Command::new("python3")
        .arg(fixtures().join("tls13_decrypt.py"))
        .arg("--capture")
        .arg(&capture)
        .arg("--keylog")
        .arg(&keylog)
        .args(["--port", &srv.port.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        use base64::Engine;
        seen.extend(
            base64::engine::general_purpose::STANDARD
                .decode(v["plaintext"].as_str().unwrap())
                .unwrap(),
        );
    }
    // Six requests at least, each with the placeholder in header and body.
    assert!(
        count(&seen, b"POST /gated/") >= 6,
        "the pod's capture did not decrypt: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "decrypted: {} requests, {} placeholders, {} values",
        count(&seen, b"POST /gated/"),
        count(&seen, ph["token"].as_bytes()),
        count(&seen, token.as_bytes())
    );
    assert_eq!(
        count(&seen, token.as_bytes()),
        0,
        "the pod read the real value from its own capture"
    );
    assert!(count(&seen, ph["token"].as_bytes()) >= 12);

    let (code, metrics) = http_get(ctl.admin_addr(), "/metrics");
    assert_eq!(code, 200);
    assert!(
        metric(&metrics, "kloak_wire_veths") >= 1.0,
        "no veth hooked: {metrics}"
    );
    let wire = metric(
        &metrics,
        r#"kloak_substitutions_total{outcome="rewritten",backend="wire""#,
    );
    assert!(wire >= 6.0, "not served by the wire: {metrics}");
    assert_eq!(
        metric(
            &metrics,
            r#"kloak_substitutions_total{outcome="rewritten",backend="pause""#
        ),
        0.0,
        "{metrics}"
    );

    // A CBC suite in the same pod: only pause could serve it, and a pod
    // behind a veth gets no pause for a secret with destination rules (the
    // value would sit in its memory, where a hostile pod takes it anywhere):
    // the placeholder arrives, and the block is counted.
    let cbc: Vec<String> = argv
        .iter()
        .cloned()
        .chain(
            [
                "--tls12",
                "--ciphers",
                "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256",
            ]
            .map(String::from),
        )
        .collect();
    let mut g2 = Gated::new(c.spawn(&cbc, &[("API_TOKEN", &ph["token"])]));
    let r = send(&srv, &mut g2);
    assert_eq!(
        count(&r, token.as_bytes()),
        0,
        "CBC in a veth pod got the value"
    );
    assert_eq!(count(&r, ph["token"].as_bytes()), 2);
    let (_, metrics) = http_get(ctl.admin_addr(), "/metrics");
    assert!(
        metric(&metrics, r#"kloak_blocked_total{reason="require_wire""#) >= 2.0,
        "{metrics}"
    );

    ctl.assert_running();
    let log = ctl.log_text();
    assert!(log.contains(r#"backend="wire""#), "{log}");
    assert_no_values(&log, &[&token]);
    assert_no_values(&metrics, &[&token]);
}
