//! Kloak against a real kube-apiserver and etcd on loopback: shadows,
//! convergence of concurrent controllers, admission webhooks called by the
//! API server over TLS, and a "pod" on this host whose writes are
//! rewritten. The controller and the webhook run with a token for a
//! ServiceAccount bound only to the seed's ClusterRole.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kloak_e2e::k8s::{
    self, FakeContainer, Gated, Kloak, control_plane, ensure_namespace, eventually,
};
use kloak_e2e::{TlsServer, count, hpack_friendly_secret, random_secret, root_test};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

const T: Duration = Duration::from_secs(20);

/// Root-only and serial like every data-path test; the body runs on a
/// current-thread runtime, with the serial lock held outside it.
fn k8s_test(body: impl std::future::Future<Output = ()>) {
    let Some(_g) = root_test() else { return };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(body);
}

fn secret(name: &str, enabled: bool, ann: &[(&str, &str)], data: &[(&str, &str)]) -> Secret {
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

fn placeholders(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
        .collect()
}

async fn shadow(api: &Api<Secret>, name: &str) -> Option<Secret> {
    api.get_opt(&format!("{name}-kloak")).await.unwrap()
}

/// A controller with its own state file (per test, kept across restarts
/// within the test).
fn controller(kc: &std::path::Path, extra: &[&str], log: &str) -> Kloak {
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
fn node_of(log: &str) -> String {
    format!("node-{}", log.split('-').next().unwrap_or(log))
}

fn assert_no_values(log: &str, values: &[&str]) {
    for v in values {
        assert_eq!(
            count(log.as_bytes(), v.as_bytes()),
            0,
            "a secret value is in the log"
        );
    }
}

#[test]
fn shadows_follow_their_secrets_under_the_seed_role() {
    k8s_test(shadows_follow_their_secrets_under_the_seed_role_body());
}

async fn shadows_follow_their_secrets_under_the_seed_role_body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-shadows").await;
    let admin = cp.admin().await;
    ensure_namespace(&admin, "shadows", false).await;
    let api: Api<Secret> = Api::namespaced(admin.clone(), "shadows");
    let mut ctl = controller(
        &kc,
        &["--datapath=false", "--no-webhook-cert"],
        "shadows-controller",
    );

    let token = random_secret("tok-", 32);
    let user = hpack_friendly_secret(12);
    let s = api
        .create(
            &PostParams::default(),
            &secret(
                "api",
                true,
                &[("getkloak.io/hosts", "api.example.com")],
                &[("token", &token), ("user", &user)],
            ),
        )
        .await
        .unwrap();
    let sh = eventually("the shadow", T, || async { shadow(&api, "api").await }).await;
    let p = placeholders(&sh);
    assert_eq!(p["token"].len(), token.len());
    assert_eq!(p["user"].len(), user.len());
    assert!(p.values().all(|v| v.starts_with("kloak:")));
    assert_ne!(p["token"], token);
    assert_eq!(
        sh.metadata.labels.as_ref().unwrap()["getkloak.io/managed"],
        "true"
    );
    let owner = &sh.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Secret", s.metadata.uid.as_deref().unwrap())
    );
    assert_eq!(sh.type_.as_deref(), Some("Opaque"));

    // Rotation: token keeps its length (placeholder stays), user grows
    // (re-minted). The user change shows the controller saw this version.
    let token2 = random_secret("tok-", 32);
    let user2 = hpack_friendly_secret(16);
    let mut s2 = secret(
        "api",
        true,
        &[("getkloak.io/hosts", "api.example.com")],
        &[("token", &token2), ("user", &user2)],
    );
    s2.metadata.resource_version = None;
    api.patch("api", &PatchParams::default(), &Patch::Merge(&s2))
        .await
        .unwrap();
    let sh2 = eventually("the re-minted user placeholder", T, || async {
        shadow(&api, "api")
            .await
            .filter(|s| placeholders(s)["user"].len() == user2.len())
    })
    .await;
    let p2 = placeholders(&sh2);
    assert_eq!(
        p2["token"], p["token"],
        "same-length rotation keeps the placeholder"
    );
    assert_ne!(p2["user"], p["user"]);

    // A restart keeps every placeholder: they live in the API server.
    ctl.stop();
    let mut ctl = controller(
        &kc,
        &["--datapath=false", "--no-webhook-cert"],
        "shadows-controller-2",
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    ctl.assert_running();
    let sh3 = shadow(&api, "api").await.unwrap();
    assert_eq!(placeholders(&sh3), p2);
    assert_eq!(
        sh3.metadata.resource_version, sh2.metadata.resource_version,
        "no rewrite after restart"
    );

    // Unlabeling removes the shadow; labeling again brings one back.
    api.patch(
        "api",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"getkloak.io/enabled": null}}})),
    )
    .await
    .unwrap();
    eventually("the shadow to go after unlabeling", T, || async {
        shadow(&api, "api").await.is_none().then_some(())
    })
    .await;
    api.patch(
        "api",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": {"getkloak.io/enabled": "true"}}})),
    )
    .await
    .unwrap();
    eventually("the shadow to return", T, || async {
        shadow(&api, "api").await
    })
    .await;
    api.delete("api", &DeleteParams::default()).await.unwrap();
    eventually("the shadow to go with its Secret", T, || async {
        shadow(&api, "api").await.is_none().then_some(())
    })
    .await;

    // A bad labeled Secret (no webhook in this test) gets no shadow, and the
    // log names the key, not the value.
    let short = "s3cr3t!";
    api.create(
        &PostParams::default(),
        &secret("bad", true, &[], &[("pw", short)]),
    )
    .await
    .unwrap();
    let ok = random_secret("ok-", 20);
    api.create(
        &PostParams::default(),
        &secret("good", true, &[], &[("k", &ok)]),
    )
    .await
    .unwrap();
    eventually("the good shadow", T, || async {
        shadow(&api, "good").await
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(shadow(&api, "bad").await.is_none());
    ctl.assert_running();
    let log = ctl.log_text();
    assert!(log.contains("\"pw\"") && log.contains("minimum"), "{log}");
    assert_no_values(&log, &[&token, &token2, &user, &user2, short, &ok]);
}

#[test]
fn concurrent_controllers_converge_on_one_placeholder_per_key() {
    k8s_test(concurrent_controllers_converge_on_one_placeholder_per_key_body());
}

async fn concurrent_controllers_converge_on_one_placeholder_per_key_body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-converge").await;
    let admin = cp.admin().await;
    ensure_namespace(&admin, "converge", false).await;
    let api: Api<Secret> = Api::namespaced(admin.clone(), "converge");
    let args = [
        "--datapath=false",
        "--namespace",
        "converge",
        "--webhook-secret",
        "converge-cert",
        "--webhook-config",
        "converge-none",
    ];
    let mut ctls: Vec<Kloak> = (0..3)
        .map(|i| controller(&kc, &args, &format!("converge-{i}")))
        .collect();
    // Short values: 2 random characters, 1,024 placeholders; clashes are likely.
    let n = 40;
    for i in 0..n {
        let v = hpack_friendly_secret(8);
        api.create(
            &PostParams::default(),
            &secret(&format!("s{i}"), true, &[], &[("k", &v)]),
        )
        .await
        .unwrap();
    }
    let all = || async {
        let mut out = BTreeMap::new();
        for i in 0..n {
            let s = shadow(&api, &format!("s{i}")).await?;
            out.insert(
                i,
                (
                    placeholders(&s)["k"].clone(),
                    s.metadata.resource_version.clone(),
                ),
            );
        }
        Some(out)
    };
    let first = eventually("every shadow", T, all).await;
    // Settled: a few resyncs later nothing has been rewritten, and every
    // placeholder is distinct.
    let settled = eventually("the shadows to settle", Duration::from_secs(60), || async {
        let a = all().await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let b = all().await?;
        (a == b).then_some(b)
    })
    .await;
    let distinct: BTreeSet<&String> = settled.values().map(|(p, _)| p).collect();
    assert_eq!(distinct.len(), n, "placeholders are unique: {settled:?}");
    let moved = first.iter().filter(|(i, v)| settled[i].0 != v.0).count();
    eprintln!("{moved} of {n} placeholders were re-minted while converging");

    // One certificate Secret, however many controllers raced to make it.
    let certs: Api<Secret> = Api::namespaced(admin.clone(), "converge");
    let c1 = certs.get("converge-cert").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c2 = certs.get("converge-cert").await.unwrap();
    assert_eq!(c1.metadata.resource_version, c2.metadata.resource_version);

    // A forced clash: copy one shadow's placeholder into another. The
    // junior (later creation, then greater uid) re-mints; the senior keeps it.
    let (a, b) = (
        shadow(&api, "s0").await.unwrap(),
        shadow(&api, "s1").await.unwrap(),
    );
    let seniority = |s: &Secret| {
        (
            s.metadata.creation_timestamp.clone().map(|t| t.0),
            s.metadata.uid.clone(),
        )
    };
    let (senior, junior) = if seniority(&a) < seniority(&b) {
        ("s0", "s1")
    } else {
        ("s1", "s0")
    };
    let pa = placeholders(&shadow(&api, senior).await.unwrap())["k"].clone();
    let mut j = shadow(&api, junior).await.unwrap();
    j.data = Some(BTreeMap::from([(
        "k".into(),
        k8s_openapi::ByteString(pa.clone().into_bytes()),
    )]));
    api.replace(&format!("{junior}-kloak"), &PostParams::default(), &j)
        .await
        .unwrap();
    let pb = eventually("the junior shadow to re-mint", T, || async {
        let p = placeholders(&shadow(&api, junior).await?)["k"].clone();
        (p != pa).then_some(p)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(placeholders(&shadow(&api, senior).await.unwrap())["k"], pa);
    assert_eq!(
        placeholders(&shadow(&api, junior).await.unwrap())["k"],
        pb,
        "settled"
    );
    for c in &mut ctls {
        c.assert_running();
    }
}

fn webhook_config(name: &str, port: u16) -> MutatingWebhookConfiguration {
    let hook = |hname: &str, path: &str, resource: &str, ops: &[&str], ns_sel: bool| {
        let mut rules = vec![
            serde_json::json!({"apiGroups": [""], "apiVersions": ["v1"], "operations": ops, "resources": [resource]}),
        ];
        if resource == "pods" {
            // `kubectl debug` adds containers through this subresource.
            rules.push(serde_json::json!({"apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["UPDATE"], "resources": ["pods/ephemeralcontainers"]}));
        }
        let mut w = serde_json::json!({
            "name": hname,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{path}")},
            "rules": rules,
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        });
        let sel = serde_json::json!({"matchLabels": {"getkloak.io/enabled": "true"}});
        if ns_sel {
            w["namespaceSelector"] = sel;
        } else {
            w["objectSelector"] = sel;
        }
        w
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "webhooks": [
            hook("pods-ns.getkloak.io", "/mutate", "pods", &["CREATE"], true),
            hook("pods-label.getkloak.io", "/mutate", "pods", &["CREATE"], false),
            hook("secrets.getkloak.io", "/validate", "secrets", &["CREATE", "UPDATE"], false),
        ]
    }))
    .unwrap()
}

fn pod(name: &str, labels: serde_json::Value, spec: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels}, "spec": spec,
    }))
    .unwrap()
}

fn env_pod(name: &str, secret: &str) -> Pod {
    pod(
        name,
        serde_json::json!({}),
        serde_json::json!({
            "containers": [{"name": "app", "image": "app",
                "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}]}],
            "volumes": [{"name": "s", "secret": {"secretName": secret}}],
        }),
    )
}

fn err_message(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message,
        other => panic!("expected an API error, got {other}"),
    }
}

#[test]
fn webhooks_mutate_deny_and_validate_through_the_apiserver() {
    k8s_test(webhooks_mutate_deny_and_validate_through_the_apiserver_body());
}

async fn webhooks_mutate_deny_and_validate_through_the_apiserver_body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-webhooks").await;
    let admin = cp.admin().await;
    ensure_namespace(&admin, "apps", true).await;
    ensure_namespace(&admin, "plain", false).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let _ = mwcs.delete("kloak-test", &DeleteParams::default()).await;
    mwcs.create(&PostParams::default(), &webhook_config("kloak-test", port))
        .await
        .unwrap();
    let ctl_args = [
        "--datapath=false",
        "--webhook-config",
        "kloak-test",
        "--webhook-san",
        "127.0.0.1",
        // Short-lived, so the test sees a rotation: renewed with 10 s left.
        "--cert-validity-secs",
        "30",
    ];
    let mut ctl = controller(&kc, &ctl_args, "webhooks-controller");
    let listen = format!("127.0.0.1:{port}");
    let mut hook = Kloak::start(
        &["webhook", "--listen", &listen],
        &kc,
        "node-e2e",
        "webhooks-webhook",
    );
    let ca = eventually("the caBundle to be patched", T, || async {
        let c = mwcs.get("kloak-test").await.ok()?;
        let ws = c.webhooks?;
        let b = ws[0].client_config.ca_bundle.clone()?;
        ws.iter()
            .all(|w| w.client_config.ca_bundle.as_ref() == Some(&b))
            .then_some(b)
    })
    .await;
    assert!(String::from_utf8_lossy(&ca.0).contains("BEGIN CERTIFICATE"));

    let apps: Api<Secret> = Api::namespaced(admin.clone(), "apps");
    let db = random_secret("db-", 24);
    // The first writes may race the webhook's start; retry until it answers.
    eventually(
        "the validating webhook to accept a good Secret",
        T,
        || async {
            apps.create(
                &PostParams::default(),
                &secret(
                    "db",
                    true,
                    &[("getkloak.io/port", "5432")],
                    &[("token", &db)],
                ),
            )
            .await
            .ok()
        },
    )
    .await;
    eventually("the db shadow", T, || async { shadow(&apps, "db").await }).await;

    // Mutation: the pod comes back pointing at the shadow, annotated.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "apps");
    let p = pods
        .create(&PostParams::default(), &env_pod("uses-db", "db"))
        .await
        .unwrap();
    let spec = p.spec.as_ref().unwrap();
    let env_ref = spec.containers[0].env.as_ref().unwrap()[0]
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(env_ref.name, "db-kloak");
    assert_eq!(
        spec.volumes.as_ref().unwrap()[0]
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .as_deref(),
        Some("db-kloak")
    );
    assert_eq!(
        p.metadata.annotations.as_ref().unwrap()["getkloak.io/enabled"],
        "true"
    );

    // An ephemeral container added later is moved onto the shadow too.
    let debug = serde_json::json!({"spec": {"ephemeralContainers": [{"name": "dbg", "image": "debug",
        "envFrom": [{"secretRef": {"name": "db"}}]}]}});
    let p = pods
        .patch_subresource(
            "ephemeralcontainers",
            "uses-db",
            &PatchParams::default(),
            &Patch::Strategic(&debug),
        )
        .await
        .unwrap();
    let eph = &p.spec.unwrap().ephemeral_containers.unwrap()[0];
    assert_eq!(
        eph.env_from.as_ref().unwrap()[0]
            .secret_ref
            .as_ref()
            .unwrap()
            .name,
        "db-kloak"
    );

    // Validation: bad labeled Secrets are refused with the reason.
    let e = err_message(
        apps.create(
            &PostParams::default(),
            &secret("short", true, &[], &[("pw", "s3cr3t!")]),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        e.contains("\"short\"") && e.contains("\"pw\"") && e.contains("minimum is 8"),
        "{e}"
    );
    assert!(!e.contains("s3cr3t!"));
    let e = err_message(
        apps.create(
            &PostParams::default(),
            &secret(
                "badhost",
                true,
                &[("getkloak.io/hosts", "a b")],
                &[("k", &db)],
            ),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        e.contains("getkloak.io/hosts") && e.contains("\"a b\""),
        "{e}"
    );
    let e = err_message(
        apps.create(
            &PostParams::default(),
            &secret(
                "badport",
                true,
                &[("getkloak.io/port", "70000")],
                &[("k", &db)],
            ),
        )
        .await
        .unwrap_err(),
    );
    assert!(e.contains("70000"), "{e}");
    let e = err_message(
        apps.create(
            &PostParams::default(),
            &secret("nohpack", true, &[], &[("k", "~~~~~~~~~~~~")]),
        )
        .await
        .unwrap_err(),
    );
    assert!(e.contains("HPACK"), "{e}");
    // Unlabeled Secrets are none of Kloak's business.
    apps.create(
        &PostParams::default(),
        &secret("unlabeled", false, &[], &[("pw", "x")]),
    )
    .await
    .unwrap();

    // Fail closed: with the controller down, a new enabled Secret has no
    // shadow, and a pod referencing it is denied with the reason.
    ctl.stop();
    let late = random_secret("late-", 20);
    apps.create(
        &PostParams::default(),
        &secret("late", true, &[], &[("token", &late)]),
    )
    .await
    .unwrap();
    let e = err_message(
        pods.create(&PostParams::default(), &env_pod("uses-late", "late"))
            .await
            .unwrap_err(),
    );
    assert!(
        e.contains("\"late\"") && e.contains("\"late-kloak\"") && e.contains("does not exist"),
        "{e}"
    );
    let mut ctl = controller(&kc, &ctl_args, "webhooks-controller-2");
    eventually(
        "the pod to be admitted once the shadow exists",
        T,
        || async {
            pods.create(&PostParams::default(), &env_pod("uses-late", "late"))
                .await
                .ok()
        },
    )
    .await;

    // Scope: a labeled pod in an unlabeled namespace is mutated; an
    // unlabeled one there is not.
    let plain_secrets: Api<Secret> = Api::namespaced(admin.clone(), "plain");
    let pw = random_secret("pl-", 20);
    plain_secrets
        .create(
            &PostParams::default(),
            &secret("cfg", true, &[], &[("token", &pw)]),
        )
        .await
        .unwrap();
    eventually("the cfg shadow", T, || async {
        shadow(&plain_secrets, "cfg").await
    })
    .await;
    let plain_pods: Api<Pod> = Api::namespaced(admin.clone(), "plain");
    let mut labeled = env_pod("labeled", "cfg");
    labeled.metadata.labels = Some(BTreeMap::from([(
        "getkloak.io/enabled".into(),
        "true".into(),
    )]));
    let p = plain_pods
        .create(&PostParams::default(), &labeled)
        .await
        .unwrap();
    assert_eq!(
        p.spec.unwrap().volumes.unwrap()[0]
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .as_deref(),
        Some("cfg-kloak")
    );
    let p = plain_pods
        .create(&PostParams::default(), &env_pod("unlabeled", "cfg"))
        .await
        .unwrap();
    assert_eq!(
        p.spec.unwrap().volumes.unwrap()[0]
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .as_deref(),
        Some("cfg")
    );

    // Rotation: the certificate is replaced before it expires, the caBundle
    // follows, and the API server keeps reaching the webhook.
    let certs: Api<Secret> = Api::namespaced(admin.clone(), "kloak-system");
    let before = certs.get("kloak-webhook-tls").await.unwrap().data.unwrap()["tls.crt"].clone();
    eventually(
        "the certificate to rotate",
        Duration::from_secs(40),
        || async {
            let now = certs.get("kloak-webhook-tls").await.ok()?.data?["tls.crt"].clone();
            (now != before).then_some(())
        },
    )
    .await;
    // The webhook serves the new certificate without a restart.
    let new_cert = certs.get("kloak-webhook-tls").await.unwrap().data.unwrap()["tls.crt"].clone();
    let new_cert = String::from_utf8(new_cert.0).unwrap();
    eventually(
        "the webhook to serve the rotated certificate",
        T,
        || async { (served_certificate(port).as_deref() == Some(new_cert.trim())).then_some(()) },
    )
    .await;
    eventually("a pod admitted after the rotation", T, || async {
        pods.create(
            &PostParams::default(),
            &env_pod(&format!("after-rotation-{}", rand_suffix()), "db"),
        )
        .await
        .ok()
    })
    .await;
    let c = mwcs.get("kloak-test").await.unwrap();
    let bundle = String::from_utf8(
        c.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .clone()
            .unwrap()
            .0,
    )
    .unwrap();
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        2,
        "new and previous CA are trusted"
    );

    ctl.assert_running();
    hook.assert_running();
    mwcs.delete("kloak-test", &DeleteParams::default())
        .await
        .unwrap();
    for log in [ctl.log_text(), hook.log_text()] {
        assert_no_values(&log, &[&db, &late, &pw, "s3cr3t!"]);
    }
}

/// The certificate a TLS server on 127.0.0.1:`port` presents, as PEM.
fn served_certificate(port: u16) -> Option<String> {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
    Some(text[start..end].to_string())
}

fn rand_suffix() -> String {
    random_secret("", 8).to_lowercase()
}

/// A pod on this test's node, already annotated by the webhook, whose one
/// container takes `key` of the shadow `api-kloak`.
fn node_pod(node: &str, name: &str, key: &str) -> Pod {
    let mut p = pod(
        name,
        serde_json::json!({}),
        serde_json::json!({"nodeName": node, "containers": [{"name": "app", "image": "app",
            "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "api-kloak", "key": key}}}]}]}),
    );
    p.metadata.annotations = Some(BTreeMap::from([(
        "getkloak.io/enabled".into(),
        "true".into(),
    )]));
    p
}

/// The pod as the kubelet would report it: running containers with IDs.
async fn set_running(pods: &Api<Pod>, name: &str, containers: &[(&str, String)]) {
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

#[test]
fn a_pod_on_this_host_gets_its_own_secrets_and_no_others() {
    k8s_test(a_pod_on_this_host_gets_its_own_secrets_and_no_others_body());
}

async fn a_pod_on_this_host_gets_its_own_secrets_and_no_others_body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-node").await;
    let admin = cp.admin().await;
    ensure_namespace(&admin, "hostpods", false).await;
    let srv = TlsServer::start();
    let api: Api<Secret> = Api::namespaced(admin.clone(), "hostpods");
    let token = random_secret("tok-", 28);
    let other = random_secret("oth-", 28);
    api.create(
        &PostParams::default(),
        &secret(
            "api",
            true,
            &[("getkloak.io/hosts", "127.0.0.1")],
            &[("token", &token), ("other", &other)],
        ),
    )
    .await
    .unwrap();
    let mut ctl = controller(&kc, &["--no-webhook-cert"], "node-controller");
    let sh = eventually("the shadow", T, || async { shadow(&api, "api").await }).await;
    let ph = placeholders(&sh);

    // Pod "one" references only key token; pod "two" only key other.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "hostpods");
    let mk = |name, key| node_pod(&node_of("node"), name, key);
    let one = pods
        .create(&PostParams::default(), &mk("one", "token"))
        .await
        .unwrap();
    let two = pods
        .create(&PostParams::default(), &mk("two", "other"))
        .await
        .unwrap();
    let mut c1 = FakeContainer::new(one.metadata.uid.as_deref().unwrap(), false);
    let mut c2 = FakeContainer::new(two.metadata.uid.as_deref().unwrap(), true);
    let client = |srv: &TlsServer| kloak_e2e::py_cmd("gated", srv, &[]);
    // Started before the pods are attached: the agent must find their
    // already-loaded libssl.
    let mut a = Gated::new(c1.spawn(&client(&srv), &[("API_TOKEN", &ph["token"])]));
    let mut b = Gated::new(c1.spawn(&client(&srv), &[("API_TOKEN", &ph["other"])]));
    let mut d = Gated::new(c2.spawn(&client(&srv), &[("API_TOKEN", &ph["other"])]));
    let mut e = Gated::new(c2.spawn(&client(&srv), &[("API_TOKEN", &ph["token"])]));
    set_running(&pods, "one", &[("app", c1.container_id())]).await;
    set_running(&pods, "two", &[("app", c2.container_id())]).await;

    // Until attached, placeholders go out unchanged; then the value arrives.
    let sent_value = |g: &mut Gated, value: &str| {
        srv.clear();
        g.send();
        let r = srv.wait_for(1, Duration::from_secs(5));
        count(&r[0], value.as_bytes()) == 2
    };
    let deadline = std::time::Instant::now() + T;
    while !sent_value(&mut a, &token) {
        assert!(
            std::time::Instant::now() < deadline,
            "pod one never got its token:\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while !sent_value(&mut d, &other) {
        assert!(
            std::time::Instant::now() < deadline,
            "pod two never got its key:\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Both pods are attached now. Each learned the other's placeholder and
    // gets nothing for it.
    for (g, p) in [(&mut b, &ph["other"]), (&mut e, &ph["token"])] {
        srv.clear();
        g.send();
        let r = srv.wait_for(1, Duration::from_secs(5));
        assert_eq!(count(&r[0], p.as_bytes()), 2, "placeholder unchanged");
        assert_eq!(
            count(&r[0], token.as_bytes()) + count(&r[0], other.as_bytes()),
            0
        );
    }

    // Rotation to the same length reaches the running pod, no restart.
    let token2 = random_secret("tok-", 28);
    api.patch(
        "api",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"stringData": {"token": token2}})),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + T;
    while !sent_value(&mut a, &token2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated value never arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        placeholders(&shadow(&api, "api").await.unwrap())["token"],
        ph["token"]
    );

    // The pod goes: its container is detached and writes go out unchanged.
    pods.delete("one", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    loop {
        srv.clear();
        a.send();
        let r = srv.wait_for(1, Duration::from_secs(5));
        if count(&r[0], ph["token"].as_bytes()) == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pod one was never detached"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ctl.assert_running();
    assert_no_values(&ctl.log_text(), &[&token, &token2, &other]);
    drop((c1, c2));
    let _ = k8s::cgroup2_root();
}

#[test]
fn a_pod_in_a_cgroup_v1_hierarchy_is_followed_by_pid() {
    k8s_test(a_pod_in_a_cgroup_v1_hierarchy_is_followed_by_pid_body());
}

/// On cgroup v1 the kernel has no cgroup id for the container, so the agent
/// tracks its processes by pid and follows their forks. This host is hybrid:
/// the container exists only in the v1 `pids` hierarchy, as on a v1 node.
async fn a_pod_in_a_cgroup_v1_hierarchy_is_followed_by_pid_body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-v1").await;
    let admin = cp.admin().await;
    ensure_namespace(&admin, "v1pods", false).await;
    let srv = TlsServer::start();
    let api: Api<Secret> = Api::namespaced(admin.clone(), "v1pods");
    let token = random_secret("tok-", 28);
    api.create(
        &PostParams::default(),
        &secret("api", true, &[], &[("token", &token)]),
    )
    .await
    .unwrap();
    let mut ctl = controller(&kc, &["--no-webhook-cert"], "v1-controller");
    let ph =
        placeholders(&eventually("the shadow", T, || async { shadow(&api, "api").await }).await);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "v1pods");
    let p = pods
        .create(
            &PostParams::default(),
            &node_pod(&node_of("v1"), "v1", "token"),
        )
        .await
        .unwrap();
    let mut c = FakeContainer::new_v1(p.metadata.uid.as_deref().unwrap());
    let client = kloak_e2e::py_cmd("gated", &srv, &[]);
    let env = [("API_TOKEN", ph["token"].as_str())];
    let mut a = Gated::new(c.spawn(&client, &env));
    // A shell that forks the client only when told: a process that did not
    // exist when the container was attached.
    let mut forked = vec![
        "sh".to_string(),
        "-c".to_string(),
        "read x; \"$@\"; :".to_string(),
        "sh".to_string(),
    ];
    forked.extend(client.iter().cloned());
    let shell = c.spawn(&forked, &env);
    let shell_pid = shell.id();
    let mut shell_in = shell.stdin.take().unwrap();
    let shell_out = shell.stdout.take().unwrap();
    // The shell must be in the container before it is attached, as a
    // runtime's processes are.
    let procs = c.cgroup.join("cgroup.procs");
    eventually("the shell to join the container", T, || async {
        std::fs::read_to_string(&procs)
            .ok()?
            .lines()
            .any(|l| l.trim() == shell_pid.to_string())
            .then_some(())
    })
    .await;
    set_running(&pods, "v1", &[("app", c.container_id())]).await;

    let deadline = std::time::Instant::now() + T;
    loop {
        srv.clear();
        a.send();
        let r = srv.wait_for(1, Duration::from_secs(5));
        if count(&r[0], token.as_bytes()) == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the v1 container was never attached:\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    use std::io::Write;
    writeln!(shell_in, "fork").unwrap();
    let mut b = Gated::from_pipes(shell_in, shell_out);
    srv.clear();
    b.send();
    let r = srv.wait_for(1, Duration::from_secs(5));
    assert_eq!(
        count(&r[0], token.as_bytes()),
        2,
        "the forked client's write was rewritten"
    );
    ctl.assert_running();
    assert_no_values(&ctl.log_text(), &[&token]);
}

#[test]
fn a_restarted_agent_keeps_serving_open_connections() {
    k8s_test(restart_body(true));
}

/// The same restart without the state file: the old connection's
/// destination is unknown to the new agent, so its placeholder goes out
/// unchanged. This is what shows the test above can fail.
#[test]
fn without_the_state_file_a_restart_loses_open_connections() {
    k8s_test(restart_body(false));
}

async fn restart_body(with_state: bool) {
    const DNS: &str = "127.0.0.155";
    let tag = if with_state { "state" } else { "nostate" };
    let cp = control_plane();
    let kc = cp.seed_kubeconfig(&format!("kloak-{tag}")).await;
    let admin = cp.admin().await;
    let ns = format!("restart-{tag}");
    ensure_namespace(&admin, &ns, false).await;
    let srv = TlsServer::start();
    let _dns = kloak_e2e::DnsServer::start(DNS, &[("allowed.test", "127.0.0.1", 300)]);
    let api: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let token = random_secret("tok-", 30);
    let port = srv.port.to_string();
    api.create(
        &PostParams::default(),
        &secret(
            "api",
            true,
            &[
                ("getkloak.io/hosts", "allowed.test"),
                ("getkloak.io/port", &port),
            ],
            &[("token", &token)],
        ),
    )
    .await
    .unwrap();
    let mut args = vec!["--no-webhook-cert", "--trusted-dns", DNS];
    if !with_state {
        args.push("--no-state");
    }
    let log = format!("{tag}-controller");
    let mut ctl = controller(&kc, &args, &log);
    let ph =
        placeholders(&eventually("the shadow", T, || async { shadow(&api, "api").await }).await);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let p = node_pod(&node_of(tag), "app", "token");
    let p = pods.create(&PostParams::default(), &p).await.unwrap();
    let mut c = FakeContainer::new(p.metadata.uid.as_deref().unwrap(), false);
    let kept = kloak_e2e::py_cmd("kept", &srv, &["--host", "allowed.test", "--dns", DNS]);
    let env = [("API_TOKEN", ph["token"].as_str())];
    set_running(&pods, "app", &[("app", c.container_id())]).await;

    // A fresh process that resolves and connects now gets the value once the
    // pod is attached: the agent is serving.
    let serving = |c: &mut FakeContainer| {
        let mut g = Gated::new(c.spawn(&kept, &env));
        srv.clear();
        g.send();
        let r = srv.wait_for(1, Duration::from_secs(5));
        (count(&r[0], token.as_bytes()) == 2).then_some(g)
    };
    let deadline = std::time::Instant::now() + T;
    let mut a = loop {
        if let Some(g) = serving(&mut c) {
            break g;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never attached:\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // Let the mirror commit what it saw: a 50 ms batch window, then a
    // commit whose fsync shares this VM's disk with etcd's.
    tokio::time::sleep(Duration::from_secs(2)).await;

    ctl.child.kill().unwrap();
    let _ = ctl.child.wait();
    let mut ctl = controller(&kc, &args, &format!("{log}-2"));
    let deadline = std::time::Instant::now() + T;
    while serving(&mut c).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted agent never served:\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The connection opened before the restart, not resolved again.
    srv.clear();
    a.send();
    let r = srv.wait_for(1, Duration::from_secs(5));
    if with_state {
        assert_eq!(
            count(&r[0], token.as_bytes()),
            2,
            "the value arrives on the old connection: {}\n{}",
            String::from_utf8_lossy(&r[0]),
            ctl.log_text()
        );
    } else {
        assert_eq!(count(&r[0], token.as_bytes()), 0);
        assert_eq!(
            count(&r[0], ph["token"].as_bytes()),
            2,
            "the placeholder went out unchanged"
        );
    }
    ctl.assert_running();
    assert_no_values(&ctl.log_text(), &[&token]);
    // The state file never holds the value in clear.
    if with_state {
        let state = control_plane().dir.join(format!("state-{tag}/state.redb"));
        let raw = std::fs::read(&state).expect("the state file exists");
        assert_eq!(count(&raw, token.as_bytes()), 0);
    }
}

#[test]
fn a_secret_deleted_while_the_agent_is_down_is_withdrawn() {
    k8s_test(deleted_while_down_body());
}

async fn deleted_while_down_body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-gone").await;
    let admin = cp.admin().await;
    let ns = "deleted-while-down";
    ensure_namespace(&admin, ns, false).await;
    let srv = TlsServer::start();
    let api: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let gone = random_secret("gone-", 28);
    let kept = random_secret("kept-", 28);
    for (name, value) in [("gone", &gone), ("kept", &kept)] {
        create_local_secret(&api, name, value).await;
    }
    let mut ctl = controller(&kc, &["--no-webhook-cert"], "gone-controller");
    let ph_gone =
        placeholders(&eventually("shadow gone", T, || async { shadow(&api, "gone").await }).await);
    let ph_kept =
        placeholders(&eventually("shadow kept", T, || async { shadow(&api, "kept").await }).await);

    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let mut p = pod(
        "app",
        serde_json::json!({}),
        serde_json::json!({"nodeName": node_of("gone"), "containers": [{"name": "app", "image": "app",
            "env": [
                {"name": "G", "valueFrom": {"secretKeyRef": {"name": "gone-kloak", "key": "token"}}},
                {"name": "K", "valueFrom": {"secretKeyRef": {"name": "kept-kloak", "key": "token"}}}]}]}),
    );
    p.metadata.annotations = Some(BTreeMap::from([(
        "getkloak.io/enabled".into(),
        "true".into(),
    )]));
    let p = pods.create(&PostParams::default(), &p).await.unwrap();
    let mut c = FakeContainer::new(p.metadata.uid.as_deref().unwrap(), true);
    let client = kloak_e2e::py_cmd("gated", &srv, &[]);
    let mut a = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph_gone["token"])]));
    let mut b = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph_kept["token"])]));
    set_running(&pods, "app", &[("app", c.container_id())]).await;
    let sent = |g: &mut Gated| {
        srv.clear();
        g.send();
        srv.wait_for(1, Duration::from_secs(5)).remove(0)
    };
    let deadline = std::time::Instant::now() + T;
    while count(&sent(&mut a), gone.as_bytes()) != 2 || count(&sent(&mut b), kept.as_bytes()) != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "never attached:\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The mirror commits within its batch window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctl.stop();

    // While no agent runs, the Secret goes (its shadow stays: this harness
    // has no garbage collector, and a real one may lag too).
    api.delete("gone", &DeleteParams::default()).await.unwrap();
    let mut ctl = controller(&kc, &["--no-webhook-cert"], "gone-controller-2");
    eventually("the first reconcile", T, || async {
        ctl.log_text()
            .contains("reconciled with the API")
            .then_some(())
    })
    .await;
    // The restart serves what still exists ...
    let r = sent(&mut b);
    assert_eq!(
        count(&r, kept.as_bytes()),
        2,
        "the kept secret is served after the restart:\n{}",
        ctl.log_text()
    );
    // ... and not what the source deleted.
    let r = sent(&mut a);
    assert_eq!(
        count(&r, gone.as_bytes()),
        0,
        "the deleted secret was injected"
    );
    assert_eq!(count(&r, ph_gone["token"].as_bytes()), 2);
    eventually("the orphaned shadow deleted", T, || async {
        api.get_opt("gone-kloak")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    ctl.assert_running();
    let log = ctl.log_text();
    assert_no_values(&log, &[&gone, &kept]);
    ctl.stop();

    // The state file forgot it too: a later restart cannot bring it back.
    let dir = control_plane().dir.join("state-gone");
    let key = kloak_storage::Key::from_file(&dir.join("state.key")).unwrap();
    let (store, _) = kloak_storage::Store::open(&dir.join("state.redb"), key).unwrap();
    let names: Vec<String> = store
        .secrets()
        .unwrap()
        .into_iter()
        .map(|s| s.name.clone())
        // Other tests' Secrets share this API server.
        .filter(|n| n.starts_with(&format!("{ns}/")))
        .collect();
    assert_eq!(names, vec![format!("{ns}/kept/token")]);
}

/// A labeled Secret with one key, `token`, allowed to loopback only.
async fn create_local_secret(api: &Api<Secret>, name: &str, value: &str) {
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

/// Sends from `g` until `value` arrives twice (header and body): the pod is
/// attached and served. Panics with the agent's log after `T`.
async fn until_served(srv: &TlsServer, g: &mut Gated, value: &str, ctl: &Kloak, what: &str) {
    let deadline = std::time::Instant::now() + T;
    loop {
        srv.clear();
        g.send();
        let r = srv.wait_for(1, Duration::from_secs(5));
        if count(&r[0], value.as_bytes()) == 2 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the value never arrived:\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn readyz(ctl: &mut Kloak) -> (u16, serde_json::Value) {
    let (code, body) = kloak_e2e::http_get(ctl.admin_addr(), "/readyz");
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("readyz body {body:?}: {e}"));
    (code, v)
}

async fn until_ready(ctl: &mut Kloak) -> serde_json::Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (code, v) = readyz(ctl);
        if code == 200 {
            assert_eq!(v["ready"], true, "{v}");
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {v}\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_damaged_state_file_is_moved_aside_and_rebuilt_from_the_api() {
    k8s_test(damaged_state_body());
}

async fn damaged_state_body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-damaged").await;
    let admin = cp.admin().await;
    let ns = "damaged-state";
    ensure_namespace(&admin, ns, false).await;
    let srv = TlsServer::start();
    let api: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let token = random_secret("dmg-", 28);
    create_local_secret(&api, "api", &token).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let p = pods
        .create(
            &PostParams::default(),
            &node_pod(&node_of("good"), "app", "token"),
        )
        .await
        .unwrap();
    let mut c = FakeContainer::new(p.metadata.uid.as_deref().unwrap(), false);
    set_running(&pods, "app", &[("app", c.container_id())]).await;

    // A good state file, written by an agent that served this pod.
    let mut ctl = controller(&kc, &["--no-webhook-cert"], "good-controller");
    let ph =
        placeholders(&eventually("the shadow", T, || async { shadow(&api, "api").await }).await);
    let client = kloak_e2e::py_cmd("gated", &srv, &[]);
    let mut g = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph["token"])]));
    until_served(&srv, &mut g, &token, &ctl, "first agent").await;

    // A second agent on the same state file refuses to start and names the
    // one that holds it; the first keeps serving.
    let mut second = controller(&kc, &["--no-webhook-cert"], "good-second");
    let end = std::time::Instant::now() + T;
    let status = loop {
        if let Some(st) = second.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < end,
            "the second agent kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains("in use by another agent") && log.contains(&format!("pid {}", ctl.child.id())),
        "the refusal names the holder:\n{log}"
    );
    ctl.assert_running();
    until_served(&srv, &mut g, &token, &ctl, "first agent, after the refusal").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctl.stop();
    let good = cp.dir.join("state-good");

    type Damage = fn(&std::path::Path);
    let scenarios: [(&str, Damage); 3] = [
        ("corrupt", |d| {
            // The header and first pages overwritten.
            let p = d.join("state.redb");
            let mut b = std::fs::read(&p).unwrap();
            b[..8192].fill(0xA5);
            std::fs::write(&p, b).unwrap();
        }),
        ("truncated", |d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("state.redb"))
                .unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len / 3).unwrap();
        }),
        ("wrongkey", |d| {
            std::fs::write(d.join("state.key"), [0x5Au8; 32]).unwrap();
        }),
    ];
    for (name, damage) in scenarios {
        let dir = cp.dir.join(format!("state-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["state.redb", "state.key"] {
            std::fs::copy(good.join(f), dir.join(f)).unwrap();
        }
        damage(&dir);
        let mut ctl = controller(
            &kc,
            &["--no-webhook-cert", "--node", &node_of("good")],
            &format!("{name}-controller"),
        );
        let v = until_ready(&mut ctl).await;
        assert_eq!(v["state"]["mode"], "file", "{name}: {v}");
        let log = ctl.log_text();
        assert!(
            log.contains("the state file was unusable; rebuilding from the API"),
            "{name}: the log names the problem:\n{log}"
        );
        // Nothing is lost: the damaged file is kept beside the new one.
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.redb.bad-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "{name}: one file moved aside");
        // Rebuilt from the API: the pod is served again.
        until_served(&srv, &mut g, &token, &ctl, name).await;
        ctl.assert_running();
        assert_no_values(&ctl.log_text(), &[&token]);
        ctl.stop();
        // The rebuilt file opens cleanly with the key in use.
        let key = kloak_storage::Key::from_file(&dir.join("state.key")).unwrap();
        let (_, rep, snap) =
            kloak_storage::Store::open_loaded(&dir.join("state.redb"), key).unwrap();
        assert!(rep.moved_aside.is_none(), "{name}: rebuilt file is sound");
        // Other tests' Secrets share this API server.
        let ours = snap
            .secrets
            .iter()
            .filter(|s| s.name.starts_with(&format!("{ns}/")))
            .count();
        assert_eq!(ours, 1, "{name}");
    }
}

/// A tmpfs of a given size, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::process::Command::new("umount").arg(&dir).status();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs at {}", dir.display());
        SmallDisk(dir)
    }

    /// Writes a file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = [0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_turns_the_state_file_off_and_the_agent_keeps_serving() {
    k8s_test(full_disk_body());
}

async fn full_disk_body() {
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-full").await;
    let admin = cp.admin().await;
    let ns = "full-disk";
    ensure_namespace(&admin, ns, false).await;
    let srv = TlsServer::start();
    let api: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let disk = SmallDisk::mount(cp.dir.join("small-disk"), "512k");
    let state = disk.0.join("state.redb").display().to_string();
    let args = ["--no-webhook-cert", "--state", &state];
    let mut ctl = controller(&kc, &args, "full-controller");
    let v = until_ready(&mut ctl).await;
    assert_eq!(v["state"]["mode"], "file", "{v}");

    disk.fill();
    // Every new Secret is a record the mirror must write.
    let mut values = Vec::new();
    for i in 0..150 {
        let v = random_secret("fill-", 40);
        api.create(
            &PostParams::default(),
            &secret(&format!("s{i}"), true, &[], &[("k", &v)]),
        )
        .await
        .unwrap();
        values.push(v);
    }
    let deadline = std::time::Instant::now() + T;
    let v = loop {
        let (code, v) = readyz(&mut ctl);
        if v["state"]["mode"] == "memory" {
            assert_eq!(code, 200, "a degraded mirror keeps the agent ready: {v}");
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror never reported the full disk: {v}\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        v["state"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left on device"),
        "{v}"
    );
    let (_, metrics) = kloak_e2e::http_get(ctl.admin_addr(), "/metrics");
    assert!(metrics.contains("kloak_state_degraded 1"), "{metrics}");

    // Still serving, from memory: a Secret created after the disk filled.
    let token = random_secret("late-", 28);
    create_local_secret(&api, "api", &token).await;
    let ph =
        placeholders(&eventually("the shadow", T, || async { shadow(&api, "api").await }).await);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let p = pods
        .create(
            &PostParams::default(),
            &node_pod(&node_of("full"), "app", "token"),
        )
        .await
        .unwrap();
    let mut c = FakeContainer::new(p.metadata.uid.as_deref().unwrap(), false);
    set_running(&pods, "app", &[("app", c.container_id())]).await;
    let client = kloak_e2e::py_cmd("gated", &srv, &[]);
    let mut g = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph["token"])]));
    until_served(&srv, &mut g, &token, &ctl, "degraded agent").await;
    ctl.assert_running();
    values.push(token.clone());
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    assert_no_values(&ctl.log_text(), &refs);
    assert_no_values(&metrics, &refs);
    ctl.stop();

    // A restart on the still-full disk comes up and serves; it never exits.
    let mut ctl = controller(&kc, &args, "full-controller-2");
    let v = until_ready(&mut ctl).await;
    until_served(&srv, &mut g, &token, &ctl, "restart on a full disk").await;
    ctl.assert_running();
    assert_no_values(&ctl.log_text(), &refs);
    // A full disk is not a damaged file: it stays in place, unused.
    assert_eq!(v["state"]["mode"], "memory", "{v}");
    let aside = std::fs::read_dir(&disk.0)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".bad-"))
        .count();
    assert_eq!(aside, 0, "the state file was moved aside for a full disk");
}

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
    until_served(&srv, &mut g, &token, &ctl, "spans").await;
    // A process of this pod that learned another Secret's placeholder.
    let mut stray = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph_other["token"])]));
    srv.clear();
    stray.send();
    let r = srv.wait_for(1, Duration::from_secs(5));
    assert_eq!(count(&r[0], other.as_bytes()), 0, "not bound: unchanged");

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
    let deadline = std::time::Instant::now() + T;
    loop {
        let (_, m) = kloak_e2e::http_get(ctl.admin_addr(), "/metrics");
        let ok = gauge(&m, r#"kloak_bpf_map_entries{map="secret_map"} "#) >= Some(2.0)
            && gauge(&m, r#"kloak_bpf_map_capacity{map="secret_map"} "#) >= Some(64.0)
            && gauge(&m, r#"kloak_bpf_map_entries{map="tracked_cgroups"} "#) >= Some(1.0)
            && gauge(&m, "kloak_tracked_processes ") >= Some(2.0)
            && gauge(&m, "kloak_ringbuf_lost_events_total ") == Some(0.0)
            && gauge(&m, "kloak_attach_errors_total ").is_some();
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "gauges:\n{m}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The log level changes at runtime: debug lines appear after the PUT.
    let admin_addr = ctl.admin_addr();
    assert!(!ctl.log_text().contains("DEBUG"), "started at info");
    let (code, body) = kloak_e2e::http_request(admin_addr, "PUT", "/logging", "debug,kube=warn");
    assert_eq!(code, 200, "{body}");
    let (code, body) = kloak_e2e::http_request(admin_addr, "PUT", "/logging", "debug,=bad=");
    assert_eq!(code, 400, "a bad filter is refused: {body}");
    assert!(body.contains("not valid"), "{body}");
    until_served(&srv, &mut g, &token, &ctl, "spans, debug").await;
    eventually("debug lines", T, || async {
        ctl.log_text().contains("DEBUG").then_some(())
    })
    .await;
    ctl.assert_running();
    assert_no_values(&ctl.log_text(), &[&token]);
}
