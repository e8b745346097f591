//! Admission webhooks called by the API server over TLS: pods moved onto
//! shadows, bad Secrets refused, fail-closed without a controller, and the
//! serving certificate rotated under load.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kloak_e2e::k8s::{Kloak, control_plane, ensure_namespace};
use kloak_e2e::poll::eventually;
use kloak_e2e::random_secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

use crate::fixtures::{T, assert_no_values, controller, k8s_test, pod, secret, shadow};

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
            &secret(
                "badwire",
                true,
                &[("getkloak.io/require-wire", "yes")],
                &[("k", &db)],
            ),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        e.contains("getkloak.io/require-wire") && e.contains("\"yes\""),
        "{e}"
    );
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
