//! An agent restarted: with its state file it keeps serving connections
//! opened before, without it it cannot, and what was deleted while it was
//! down is withdrawn.

use std::future::ready;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kloak_e2e::k8s::{FakeContainer, Gated, control_plane, ensure_namespace};
use kloak_e2e::poll::{eventually, eventually_every};
use kloak_e2e::{TlsServer, count, random_secret};
use kube::api::{Api, DeleteParams, PostParams};

use crate::fixtures::{
    T, annotated_pod, assert_no_values, controller, create_local_secret, k8s_test, node_of,
    node_pod, placeholders, secret, send, set_running, shadow,
};

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
        (count(&send(&srv, &mut g), token.as_bytes()) == 2).then_some(g)
    };
    // Every poll starts a client: a slower pace.
    let every = Duration::from_millis(300);
    let mut a = eventually_every("the pod to be attached", T, every, || {
        ready(serving(&mut c).ok_or_else(|| ctl.log_text()))
    })
    .await;
    // Let the mirror commit what it saw: a 50 ms batch window, then a
    // commit whose fsync shares this VM's disk with etcd's.
    tokio::time::sleep(Duration::from_secs(2)).await;

    ctl.child.kill().unwrap();
    let _ = ctl.child.wait();
    let mut ctl = controller(&kc, &args, &format!("{log}-2"));
    eventually_every("the restarted agent to serve", T, every, || {
        ready(serving(&mut c).map(drop).ok_or_else(|| ctl.log_text()))
    })
    .await;
    // The connection opened before the restart, not resolved again.
    let r = send(&srv, &mut a);
    if with_state {
        assert_eq!(
            count(&r, token.as_bytes()),
            2,
            "the value arrives on the old connection: {}\n{}",
            String::from_utf8_lossy(&r),
            ctl.log_text()
        );
    } else {
        assert_eq!(count(&r, token.as_bytes()), 0);
        assert_eq!(
            count(&r, ph["token"].as_bytes()),
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
    let p = annotated_pod(
        &node_of("gone"),
        "app",
        &[("G", "gone-kloak", "token"), ("K", "kept-kloak", "token")],
    );
    let p = pods.create(&PostParams::default(), &p).await.unwrap();
    let mut c = FakeContainer::new(p.metadata.uid.as_deref().unwrap(), true);
    let client = kloak_e2e::py_cmd("gated", &srv, &[]);
    let mut a = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph_gone["token"])]));
    let mut b = Gated::new(c.spawn(&client, &[("API_TOKEN", &ph_kept["token"])]));
    set_running(&pods, "app", &[("app", c.container_id())]).await;
    let every = Duration::from_millis(200);
    eventually_every("the pod to be served both values", T, every, || {
        let both = count(&send(&srv, &mut a), gone.as_bytes()) == 2
            && count(&send(&srv, &mut b), kept.as_bytes()) == 2;
        ready(if both { Ok(()) } else { Err(ctl.log_text()) })
    })
    .await;
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
    let r = send(&srv, &mut b);
    assert_eq!(
        count(&r, kept.as_bytes()),
        2,
        "the kept secret is served after the restart:\n{}",
        ctl.log_text()
    );
    // ... and not what the source deleted.
    let r = send(&srv, &mut a);
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
