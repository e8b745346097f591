//! Shadows: a labeled Secret's copy with placeholders for values, kept in
//! step with its Secret by one controller, and by several at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kloak_e2e::k8s::{Kloak, control_plane, ensure_namespace};
use kloak_e2e::poll::eventually;
use kloak_e2e::{hpack_friendly_secret, random_secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

use crate::fixtures::{T, assert_no_values, controller, k8s_test, placeholders, secret, shadow};

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
