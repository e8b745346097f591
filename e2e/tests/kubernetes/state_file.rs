//! The state file when things go wrong: held by another agent, damaged
//! (moved aside and rebuilt from the API), or on a full disk (turned off,
//! the agent serving from memory).

use std::future::ready;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kloak_e2e::k8s::{FakeContainer, Gated, control_plane, ensure_namespace};
use kloak_e2e::poll::{eventually, eventually_every};
use kloak_e2e::{TlsServer, random_secret};
use kube::api::{Api, PostParams};

use crate::fixtures::{
    T, assert_no_values, controller, create_local_secret, k8s_test, node_of, node_pod,
    placeholders, readyz, secret, set_running, shadow, until_ready, until_received,
};

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
    until_received(&srv, &mut g, &token, &ctl, T, "the first agent to serve").await;

    // A second agent on the same state file refuses to start and names the
    // one that holds it; the first keeps serving.
    let mut second = controller(&kc, &["--no-webhook-cert"], "good-second");
    let every = Duration::from_millis(100);
    let status = eventually_every("the second agent to exit", T, every, || {
        ready(second.child.try_wait().unwrap())
    })
    .await;
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains("in use by another agent") && log.contains(&format!("pid {}", ctl.child.id())),
        "the refusal names the holder:\n{log}"
    );
    ctl.assert_running();
    let after = "the first agent to serve after the refusal";
    until_received(&srv, &mut g, &token, &ctl, T, after).await;
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
        let rebuilt = format!("{name}: the agent on the rebuilt file to serve");
        until_received(&srv, &mut g, &token, &ctl, T, &rebuilt).await;
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
    let every = Duration::from_millis(200);
    let v = eventually_every("the mirror to report the full disk", T, every, || {
        let (code, v) = readyz(&mut ctl);
        ready(if v["state"]["mode"] == "memory" {
            assert_eq!(code, 200, "a degraded mirror keeps the agent ready: {v}");
            Ok(v)
        } else {
            Err(format!("{v}\n{}", ctl.log_text()))
        })
    })
    .await;
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
    until_received(&srv, &mut g, &token, &ctl, T, "the degraded agent to serve").await;
    ctl.assert_running();
    values.push(token.clone());
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    assert_no_values(&ctl.log_text(), &refs);
    assert_no_values(&metrics, &refs);
    ctl.stop();

    // A restart on the still-full disk comes up and serves; it never exits.
    let mut ctl = controller(&kc, &args, "full-controller-2");
    let v = until_ready(&mut ctl).await;
    let restarted = "the agent restarted on a full disk to serve";
    until_received(&srv, &mut g, &token, &ctl, T, restarted).await;
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
