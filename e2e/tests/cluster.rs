//! The Helm chart on a real single-node cluster (`e2e/cluster/up.sh`: etcd,
//! kube-apiserver, controller-manager, scheduler, containerd + runc, kubelet,
//! kube-proxy, CoreDNS), with the image built here and real pods: curl and
//! Python in an application pod, a TLS echo server behind a Service, Jaeger
//! deployed by the test. Root only; takes minutes; reports its phases.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kloak_e2e::cluster::Cluster;
use kloak_e2e::otel::tag;
use kloak_e2e::{
    count, fixtures, http_get, make_certificates_for, random_secret, root_test, workspace_root,
};
use serde_json::{Value, json};

const RELEASE: &str = "kloak";
const NS: &str = "kloak-system";
const ECHO: &str = "echo.echo.svc.cluster.local";
const OTHER: &str = "other.echo.svc.cluster.local";
const LONG: Duration = Duration::from_secs(240);

fn list(items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A CA and a server certificate for the echo Services' names.
fn echo_pki(dir: &std::path::Path) -> (String, String, String) {
    make_certificates_for(
        dir,
        &format!("subjectAltName=DNS:{ECHO},DNS:echo.echo.svc,DNS:{OTHER},DNS:other.echo.svc"),
    );
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    (read("ca.pem"), read("cert.pem"), read("key.pem"))
}

fn tools_pod(name: &str, ns: &str, spec: Value) -> Value {
    let mut spec = spec;
    spec["containers"][0]["image"] = json!("docker.io/kloak-test/tools:1");
    spec["containers"][0]["imagePullPolicy"] = json!("Never");
    spec["terminationGracePeriodSeconds"] = json!(1);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// The echo server: tls_server.py in the tools image, recording every
/// request it receives, behind two Services (`echo` and `other`).
fn echo_objects(ca: &str, crt: &str, key: &str) -> String {
    let server = std::fs::read_to_string(fixtures().join("tls_server.py")).unwrap();
    let mut pod = tools_pod(
        "echo",
        "echo",
        json!({
            "containers": [{
                "name": "echo",
                "command": ["python3", "/srv/tls_server.py", "--cert", "/tls/tls.crt", "--key", "/tls/tls.key",
                            "--bind", "0.0.0.0", "--port", "8443", "--record", "/records/echo.jsonl"],
                "ports": [{"containerPort": 8443}],
                "volumeMounts": [
                    {"name": "srv", "mountPath": "/srv"},
                    {"name": "tls", "mountPath": "/tls"},
                    {"name": "records", "mountPath": "/records"},
                ],
            }],
            "volumes": [
                {"name": "srv", "configMap": {"name": "echo-server"}},
                {"name": "tls", "secret": {"secretName": "echo-tls"}},
                {"name": "records", "emptyDir": {}},
            ],
        }),
    );
    pod["metadata"]["labels"] = json!({"app": "echo"});
    let svc = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "echo"},
               "spec": {"selector": {"app": "echo"}, "ports": [{"port": 443, "targetPort": 8443}]}})
    };
    list(vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "echo"}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "echo-server", "namespace": "echo"},
               "data": {"tls_server.py": server}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "echo-tls", "namespace": "echo"},
               "type": "kubernetes.io/tls", "stringData": {"tls.crt": crt, "tls.key": key, "ca.crt": ca}}),
        pod,
        svc("echo"),
        svc("other"),
    ])
}

fn jaeger_objects() -> String {
    list(vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kloak-test"}}),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "jaeger", "namespace": "kloak-test", "labels": {"app": "jaeger"}},
               "spec": {"containers": [{"name": "jaeger", "image": "docker.io/kloak-test/jaeger:1",
                   "imagePullPolicy": "Never",
                   "env": [{"name": "JAEGER_HOST", "value": "0.0.0.0"},
                           {"name": "JAEGER_OTLP_GRPC", "value": "4317"},
                           {"name": "JAEGER_OTLP_HTTP", "value": "4318"},
                           {"name": "JAEGER_QUERY_HTTP", "value": "16686"},
                           {"name": "JAEGER_QUERY_GRPC", "value": "16685"}],
                   "readinessProbe": {"tcpSocket": {"port": 16686}, "periodSeconds": 1}}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "jaeger", "namespace": "kloak-test"},
               "spec": {"selector": {"app": "jaeger"},
                        "ports": [{"name": "otlp", "port": 4317}, {"name": "query", "port": 16686}]}}),
    ])
}

/// The application: a labeled namespace, a labeled Secret allowed to the
/// echo Service only, and a pod holding it as a file and in its environment.
fn app_objects(value: &str, ca: &str) -> String {
    let client = std::fs::read_to_string(fixtures().join("py_client.py")).unwrap();
    let capture = std::fs::read_to_string(fixtures().join("capture.py")).unwrap();
    let pod = tools_pod(
        "app",
        "app",
        json!({
            "containers": [{
                "name": "app",
                "command": ["sleep", "infinity"],
                "env": [{"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}}],
                "volumeMounts": [
                    {"name": "api", "mountPath": "/etc/api", "readOnly": true},
                    {"name": "client", "mountPath": "/client"},
                ],
            }],
            "volumes": [
                {"name": "api", "secret": {"secretName": "api"}},
                {"name": "client", "configMap": {"name": "client"}},
            ],
        }),
    );
    list(vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "app", "labels": {"getkloak.io/enabled": "true"}}}),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "api", "namespace": "app",
                            "labels": {"getkloak.io/enabled": "true"},
                            "annotations": {"getkloak.io/hosts": ECHO}},
               "stringData": {"token": value}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "client", "namespace": "app"},
               "data": {"py_client.py": client, "capture.py": capture, "ca.pem": ca}}),
        pod,
    ])
}

/// What the ready agent pod serves on /metrics.
fn agent_metrics(c: &Cluster) -> String {
    let agent_ip = c.kubectl(&[
        "-n",
        NS,
        "get",
        "pod",
        &agent_pod(c).expect("a ready agent pod"),
        "-o",
        "jsonpath={.status.podIP}",
    ]);
    let (code, metrics) = http_get(
        format!("{}:9090", agent_ip.trim()).parse().unwrap(),
        "/metrics",
    );
    assert_eq!(code, 200, "{metrics}");
    metrics
}

/// The sum of a metric's samples whose line starts with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the echo server recorded, by request path.
fn echo_records(c: &Cluster) -> Vec<(String, Vec<u8>)> {
    let out = c.kubectl_output(
        &[
            "-n",
            "echo",
            "exec",
            "echo",
            "--",
            "cat",
            "/records/echo.jsonl",
        ],
        None,
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("record line is JSON");
            let raw = {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(v["raw"].as_str().unwrap())
                    .expect("raw is base64")
            };
            let path = String::from_utf8_lossy(&raw)
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            (path, raw)
        })
        .collect()
}

/// The agent pod that is ready and not being deleted.
fn agent_pod(c: &Cluster) -> Option<String> {
    let pods: Value = serde_json::from_str(&c.kubectl(&[
        "-n",
        NS,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=controller",
        "-o",
        "json",
    ]))
    .ok()?;
    pods["items"]
        .as_array()?
        .iter()
        .find(|p| {
            p["metadata"]["deletionTimestamp"].is_null()
                && p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .and_then(|p| p["metadata"]["name"].as_str().map(str::to_string))
}

#[test]
fn the_chart_on_a_real_node_rewrites_for_allowed_hosts_survives_restarts_and_uninstalls_cleanly() {
    let Some(_g) = root_test() else { return };
    let dir = std::path::PathBuf::from(
        std::env::var("KLOAK_CLUSTER_DIR").unwrap_or_else(|_| "/var/lib/kloak-cluster".into()),
    );
    let mut c = Cluster::up(&dir);
    let chart = workspace_root().join("charts/kloak");
    let chart = chart.to_str().unwrap();

    // A cluster kept from an earlier run (KLOAK_KEEP_CLUSTER) starts clean.
    let _ = c.helm_output(&["uninstall", RELEASE, "-n", NS, "--wait"]);
    let _ = c.kubectl_output(
        &[
            "delete",
            "namespace",
            "app",
            "echo",
            "kloak-test",
            "--ignore-not-found",
            "--wait",
        ],
        None,
    );

    // --- the chart itself -------------------------------------------------
    c.helm(&["lint", "--strict", chart]);
    let bad = c.helm_output(&[
        "template",
        RELEASE,
        chart,
        "--set",
        "controller.mode=inplace",
    ]);
    assert!(!bad.status.success(), "the schema accepted mode=inplace");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("mode"),
        "the schema's error names the value: {}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let _ = c.kubectl_output(&["create", "namespace", NS], None);
    // Offline rendering assumes an old Kubernetes; this cluster's is given.
    let version: Value = serde_json::from_str(&c.kubectl(&["version", "-o", "json"])).unwrap();
    let kube = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let rendered = c.helm(&[
        "template",
        RELEASE,
        chart,
        "-n",
        NS,
        "--kube-version",
        &kube,
    ]);
    let dry = c.kubectl_output(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered));
    assert!(
        dry.status.success(),
        "the API server refused the rendered chart: {}",
        String::from_utf8_lossy(&dry.stderr)
    );
    c.phase("helm lint, schema, server-side dry run");

    // --- Jaeger and the echo server -----------------------------------------
    let pki = tempfile::tempdir().unwrap();
    let (ca, crt, key) = echo_pki(pki.path());
    c.apply(&jaeger_objects());
    c.apply(&echo_objects(&ca, &crt, &key));
    c.kubectl(&[
        "-n",
        "kloak-test",
        "wait",
        "--for=condition=Ready",
        "pod/jaeger",
        "--timeout=120s",
    ]);
    c.kubectl(&[
        "-n",
        "echo",
        "wait",
        "--for=condition=Ready",
        "pod/echo",
        "--timeout=120s",
    ]);
    c.phase("Jaeger and the echo server running");

    // --- install ----------------------------------------------------------
    let version = env!("CARGO_PKG_VERSION");
    c.helm(&[
        "install",
        RELEASE,
        chart,
        "-n",
        NS,
        "--wait",
        "--timeout",
        "4m",
        "--set",
        &format!("image.tag={version}"),
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "otlpEndpoint=http://jaeger.kloak-test.svc.cluster.local:4317",
        "--set",
        "logLevel=info\\,kloak=debug",
    ]);
    for kind in [
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        c.eventually(&format!("the caBundle of the {kind}"), LONG, || {
            let out = c.kubectl(&[
                "get",
                kind,
                RELEASE,
                "-o",
                "jsonpath={.webhooks[*].clientConfig.caBundle}",
            ]);
            (!out.trim().is_empty()).then_some(())
        });
    }
    c.phase("helm install, agent and webhook ready");

    // --- the application ----------------------------------------------------
    let value = random_secret("cluster-", 32);
    // Right after an install the webhook's Service may not be routed yet
    // (kube-proxy follows its endpoints a moment later): admission fails
    // closed until it is, as it would for any client.
    let app = app_objects(&value, &ca);
    c.eventually("the webhooks admitting the application", LONG, || {
        c.kubectl_output(&["apply", "-f", "-"], Some(&app))
            .status
            .success()
            .then_some(())
    });
    c.kubectl(&[
        "-n",
        "app",
        "wait",
        "--for=condition=Ready",
        "pod/app",
        "--timeout=120s",
    ]);
    let placeholder = c.kubectl(&["-n", "app", "exec", "app", "--", "cat", "/etc/api/token"]);
    assert!(
        placeholder.starts_with("kloak:"),
        "the mounted file holds {placeholder:?}"
    );
    assert_eq!(placeholder.len(), value.len());
    assert_eq!(count(placeholder.as_bytes(), value.as_bytes()), 0);
    let env = c.kubectl(&["-n", "app", "exec", "app", "--", "printenv", "API_TOKEN"]);
    assert_eq!(
        env.trim(),
        placeholder,
        "the environment holds the placeholder too"
    );
    c.phase("application pod running with placeholders");

    let exec = |cmd: &str| c.kubectl(&["-n", "app", "exec", "app", "--", "sh", "-c", cmd]);
    let curl = |host: &str, path: &str| {
        exec(&format!(
            "curl -sS --fail --cacert /client/ca.pem -H \"Authorization: Bearer $API_TOKEN\" \
             --data-binary \"token=$(cat /etc/api/token)\" https://{host}{path}"
        ))
    };
    curl(ECHO, "/curl");
    exec(&format!(
        "python3 /client/py_client.py request --port 443 --cacert /client/ca.pem --host {ECHO} --path /python"
    ));
    curl(OTHER, "/denied");
    let records = c.eventually("the echo server's records", LONG, || {
        let r = echo_records(&c);
        (r.len() >= 3).then_some(r)
    });
    let at = |path: &str| {
        records
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("nothing arrived at {path}"))
            .1
            .clone()
    };
    for path in ["/curl", "/python"] {
        let r = at(path);
        assert_eq!(
            count(&r, value.as_bytes()),
            2,
            "{path}: header and body carry the value"
        );
        assert_eq!(count(&r, placeholder.as_bytes()), 0, "{path}");
    }
    let denied = at("/denied");
    assert_eq!(
        count(&denied, value.as_bytes()),
        0,
        "a host not allowed got the value"
    );
    assert_eq!(
        count(&denied, placeholder.as_bytes()),
        2,
        "the placeholder went out unchanged"
    );
    c.phase("curl and Python: value to the echo Service, placeholder elsewhere");

    // --- the wire, on the host side of the pod's veth ----------------------------
    // Both were served by the wire backend (auto picks it on this kernel),
    // patched where the pod cannot look.
    let exec = |cmd: &str| c.kubectl(&["-n", "app", "exec", "app", "--", "sh", "-c", cmd]);
    let metrics = agent_metrics(&c);
    assert!(
        metric(
            &metrics,
            r#"kloak_substitutions_total{outcome="rewritten",backend="wire""#
        ) >= 4.0,
        "not served by the wire: {metrics}"
    );
    assert!(metric(&metrics, "kloak_wire_veths") >= 1.0, "{metrics}");
    // The pod holds CAP_NET_RAW in its own network namespace (containers
    // get it by default): it taps its own eth0 and decrypts the capture
    // with the keys its TLS library logged. It reads the placeholder only,
    // while the echo server receives the value.
    exec(
        "nohup python3 /client/capture.py eth0 /tmp/eth0.cap > /tmp/capture.out 2>&1 & \
          echo $! > /tmp/capture.pid; \
          for i in $(seq 50); do grep -q READY /tmp/capture.out && break; sleep 0.1; done",
    );
    exec(&format!(
        "SSLKEYLOGFILE=/tmp/keys.log python3 /client/py_client.py request --port 443 \
         --cacert /client/ca.pem --host {ECHO} --path /captured"
    ));
    exec("sleep 0.5; kill $(cat /tmp/capture.pid)");
    let cap_dir = tempfile::tempdir().unwrap();
    for f in ["eth0.cap", "keys.log"] {
        use base64::Engine;
        let b = exec(&format!("base64 -w0 /tmp/{f}"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .unwrap_or_else(|e| panic!("{f} from the pod: {e}"));
        std::fs::write(cap_dir.path().join(f), bytes).unwrap();
    }
    let out = Command::new("python3")
        .arg(fixtures().join("tls13_decrypt.py"))
        .arg("--capture")
        .arg(cap_dir.path().join("eth0.cap"))
        .arg("--keylog")
        .arg(cap_dir.path().join("keys.log"))
        .args(["--port", "443"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        use base64::Engine;
        let v: Value = serde_json::from_str(l).unwrap();
        seen.extend(
            base64::engine::general_purpose::STANDARD
                .decode(v["plaintext"].as_str().unwrap())
                .unwrap(),
        );
    }
    assert_eq!(
        count(&seen, b"POST /captured"),
        1,
        "the pod's own capture did not decrypt: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        count(&seen, value.as_bytes()),
        0,
        "the pod read the value from its own capture"
    );
    assert_eq!(count(&seen, placeholder.as_bytes()), 2);
    let captured = c.eventually("the captured request at the echo server", LONG, || {
        echo_records(&c).into_iter().find(|(p, _)| p == "/captured")
    });
    assert_eq!(
        count(&captured.1, value.as_bytes()),
        2,
        "the echo server got the value"
    );
    c.phase("the wire: patched on the host side of the pod's veth; the pod's own capture holds only the placeholder");

    // --- Jaeger ---------------------------------------------------------------
    let jaeger_ip = c.kubectl(&[
        "-n",
        "kloak-test",
        "get",
        "svc",
        "jaeger",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let query: std::net::SocketAddr = format!("{}:16686", jaeger_ip.trim()).parse().unwrap();
    let spans = c.eventually("the rewrite and block spans in Jaeger", LONG, || {
        let (code, body) = http_get(
            query,
            "/api/traces?service=kloak-agent&limit=1000&lookback=1h",
        );
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        let spans: Vec<Value> = v["data"]
            .as_array()?
            .iter()
            .flat_map(|t| t["spans"].as_array().cloned().unwrap_or_default())
            .collect();
        let has = |o: &str| {
            spans
                .iter()
                .any(|s| tag(s, "kloak.outcome").and_then(|x| x.as_str()) == Some(o))
        };
        (has("rewritten") && has("blocked")).then_some((spans, body))
    });
    let (spans, raw) = spans;
    let rewritten = spans
        .iter()
        .find(|s| tag(s, "kloak.outcome").and_then(|x| x.as_str()) == Some("rewritten"))
        .unwrap();
    assert_eq!(
        tag(rewritten, "k8s.pod.name"),
        Some(&json!("app")),
        "{rewritten}"
    );
    assert_eq!(
        tag(rewritten, "k8s.namespace.name"),
        Some(&json!("app")),
        "{rewritten}"
    );
    assert_eq!(
        tag(rewritten, "k8s.container.name"),
        Some(&json!("app")),
        "{rewritten}"
    );
    assert_eq!(
        tag(rewritten, "kloak.secret.name"),
        Some(&json!("api")),
        "{rewritten}"
    );
    assert_eq!(
        tag(rewritten, "server.address"),
        Some(&json!(ECHO)),
        "{rewritten}"
    );
    let blocked = spans
        .iter()
        .find(|s| tag(s, "kloak.outcome").and_then(|x| x.as_str()) == Some("blocked"))
        .unwrap();
    assert_eq!(tag(blocked, "error"), Some(&json!(true)), "{blocked}");
    assert_eq!(
        count(raw.as_bytes(), value.as_bytes()),
        0,
        "a value in Jaeger"
    );
    c.phase("Jaeger shows the spans with pod attributes");

    // --- restart mid-traffic ----------------------------------------------------
    // One keep-alive connection, a request every 100 ms, while the agent pod
    // is deleted and the DaemonSet brings a new one up.
    let old = agent_pod(&c).expect("a ready agent pod");
    let mut steady = Command::new(dir.join("bin/kubectl"))
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args([
            "-n",
            "app",
            "exec",
            "app",
            "--",
            "python3",
            "/client/py_client.py",
            "steady",
            "--port",
            "443",
            "--cacert",
            "/client/ca.pem",
            "--host",
            ECHO,
            "--requests",
            "250",
            "--wait",
            "0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let lines = BufReader::new(steady.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        lines
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("SENT")).then(|| {
                    let n: u32 = w.next().unwrap().parse().unwrap();
                    let t: f64 = w.next().unwrap().parse().unwrap();
                    (n, t)
                })
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_secs(3));
    let gone_from = now();
    c.kubectl(&["-n", NS, "delete", "pod", &old, "--wait=false"]);
    let back_at = c.eventually("a new ready agent pod", LONG, || {
        agent_pod(&c).filter(|p| *p != old).map(|_| now())
    });
    assert!(steady.wait().unwrap().success(), "the steady client failed");
    let sent = reader.join().unwrap();
    assert_eq!(sent.len(), 250, "every request was sent");
    let records = echo_records(&c);
    let mut outside = 0;
    let mut placeholder_in_gap = 0;
    for (n, t) in &sent {
        let path = format!("/steady/{n}");
        let (_, r) = records
            .iter()
            .find(|(p, _)| *p == path)
            .unwrap_or_else(|| panic!("{path} never arrived"));
        let real = count(r, value.as_bytes()) == 2;
        // The stated window: while no agent serves (old one told to stop,
        // new one not ready yet) placeholders go out unchanged.
        if *t < gone_from || *t > back_at {
            outside += 1;
            assert!(
                real,
                "{path} sent at {t:.3} (agent down {gone_from:.3}..{back_at:.3}) lost its value"
            );
        } else if !real {
            placeholder_in_gap += 1;
        }
    }
    eprintln!(
        "restart: agent down {:.1} s; {placeholder_in_gap} requests inside that window went out unchanged, \
         all {outside} outside it arrived with the value",
        back_at - gone_from
    );
    assert!(
        outside >= 100,
        "too few requests outside the restart window: {outside}"
    );
    c.phase("agent pod deleted mid-traffic, the open connection keeps its value");

    // For the whole run's leak check: what the agents and the webhook logged,
    // and what the agent serves on /metrics.
    for what in ["ds/kloak-controller", "deploy/kloak-webhook"] {
        let log = c.kubectl(&["-n", NS, "logs", what, "--all-containers"]);
        assert_eq!(
            count(log.as_bytes(), value.as_bytes()),
            0,
            "the value in {what}'s log"
        );
        kloak_e2e::ledger::keep_log_text("cluster", &log);
    }
    let metrics = agent_metrics(&c);
    assert!(metrics.contains("kloak_substitutions_total{"), "{metrics}");
    assert_eq!(
        count(metrics.as_bytes(), value.as_bytes()),
        0,
        "the value in /metrics"
    );
    kloak_e2e::ledger::keep_metrics("cluster", &metrics);

    // --- uninstall --------------------------------------------------------------
    c.helm(&["uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "2m"]);
    // The chart's objects go at once; their pods with the garbage collector.
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let query = [
        "get",
        "all,serviceaccounts,secrets,configmaps,roles,rolebindings",
        "-n",
        NS,
        "-l",
        &selector,
        "-o",
        "name",
    ];
    let left = c.kubectl(&query);
    assert!(
        left.lines().all(|l| l.starts_with("pod/")),
        "left in {NS} right after uninstall: {left}"
    );
    c.eventually("the release's pods to go", LONG, || {
        c.kubectl(&query).trim().is_empty().then_some(())
    });
    let secrets = c.kubectl(&["get", "secrets", "-n", NS, "-o", "name"]);
    assert_eq!(secrets.trim(), "", "Secrets left in {NS}: {secrets}");
    for kind in [
        "clusterrole",
        "clusterrolebinding",
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        let out = c.kubectl_output(&["get", kind, RELEASE], None);
        assert!(!out.status.success(), "{kind} {RELEASE} is still there");
    }
    // Shadows stay, as documented: the running pod still mounts one.
    let shadows = c.kubectl(&[
        "get",
        "secrets",
        "-n",
        "app",
        "-l",
        "getkloak.io/managed=true",
        "-o",
        "name",
    ]);
    assert!(
        !shadows.trim().is_empty(),
        "the app's shadow Secret went with the release"
    );
    c.phase("helm uninstall");
    eprintln!("{}", c.report());
}
