//! A pod on this host: its containers' writes carry the values of the
//! Secrets it references and of no others, with cgroup v2 (both drivers)
//! and cgroup v1.

use std::time::Instant;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kloak_e2e::k8s::{self, FakeContainer, Gated, control_plane, ensure_namespace};
use kloak_e2e::poll::eventually;
use kloak_e2e::{TlsServer, count, random_secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

use crate::fixtures::{
    T, assert_no_values, controller, k8s_test, node_of, node_pod, placeholders, secret, send,
    set_running, shadow, until_received,
};

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
    // One deadline for both pods.
    let deadline = Instant::now() + T;
    until_received(&srv, &mut a, &token, &ctl, T, "pod one to get its token").await;
    let left = deadline.saturating_duration_since(Instant::now());
    until_received(&srv, &mut d, &other, &ctl, left, "pod two to get its key").await;
    // Both pods are attached now. Each learned the other's placeholder and
    // gets nothing for it.
    for (g, p) in [(&mut b, &ph["other"]), (&mut e, &ph["token"])] {
        let r = send(&srv, g);
        assert_eq!(count(&r, p.as_bytes()), 2, "placeholder unchanged");
        assert_eq!(count(&r, token.as_bytes()) + count(&r, other.as_bytes()), 0);
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
    until_received(&srv, &mut a, &token2, &ctl, T, "the rotated value").await;
    assert_eq!(
        placeholders(&shadow(&api, "api").await.unwrap())["token"],
        ph["token"]
    );

    // The pod goes: its container is detached and writes go out unchanged.
    pods.delete("one", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let detached = "pod one to be detached (its placeholder unchanged)";
    until_received(&srv, &mut a, &ph["token"], &ctl, T, detached).await;
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

    let attached = "the v1 container to be attached";
    until_received(&srv, &mut a, &token, &ctl, T, attached).await;
    use std::io::Write;
    writeln!(shell_in, "fork").unwrap();
    let mut b = Gated::from_pipes(shell_in, shell_out);
    assert_eq!(
        count(&send(&srv, &mut b), token.as_bytes()),
        2,
        "the forked client's write was rewritten"
    );
    ctl.assert_running();
    assert_no_values(&ctl.log_text(), &[&token]);
}
