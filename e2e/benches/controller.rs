//! Controller benchmark against a real kube-apiserver and etcd: time from a
//! Secret's creation to its shadow existing and its placeholder being in the
//! kernel's secret_map, and the controller's memory with 1,000 enabled
//! Secrets. Baselines come from the same run: the API server's own watch
//! delivery of the new Secret, and the controller's RSS with no Secrets.
//!
//! `sudo scripts/bench.sh` runs it; it writes target/bench/controller.json.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kloak_e2e::k8s::{Kloak, control_plane, ensure_namespace};
use kloak_e2e::{hpack_friendly_secret, workspace_root};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use libbpf_rs::MapCore;

const LATENCY_SAMPLES: usize = 50;
const MANY: usize = 1000;

fn secret(name: &str, value: &str) -> Secret {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"getkloak.io/enabled": "true"},
            "annotations": {"getkloak.io/hosts": "api.example.com"}},
        "stringData": {"token": value},
    }))
    .unwrap()
}

/// The agent's secret_map (there is one agent on the node during the bench).
fn secret_map() -> libbpf_rs::MapHandle {
    for info in libbpf_rs::query::MapInfoIter::default() {
        if info.name.to_str() == Some("secret_map")
            && let Ok(m) = libbpf_rs::MapHandle::from_map_id(info.id)
        {
            return m;
        }
    }
    panic!("no secret_map: is the controller's data path up?");
}

/// The map key of a placeholder: its first 8 characters after `kloak:`.
fn map_key(placeholder: &[u8]) -> [u8; 8] {
    let mut k = [0u8; 8];
    let r = &placeholder[6..];
    let n = r.len().min(8);
    k[..n].copy_from_slice(&r[..n]);
    k
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[((xs.len() as f64 * p) as usize).min(xs.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the controller benchmark loads BPF programs: run as root"
    );
    let cp = control_plane();
    let kc = cp.seed_kubeconfig("kloak-bench").await;
    let admin = cp.admin().await;
    ensure_namespace(&admin, "bench", false).await;
    let api: Api<Secret> = Api::namespaced(admin.clone(), "bench");
    let ctl = Kloak::start(
        &[
            "controller",
            "--no-webhook-cert",
            "--resync-secs",
            "5",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &kc,
        "node-bench",
        "bench-controller",
    );
    let pid = ctl.child.id();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_kib(pid);
    let map = secret_map();

    // First sight of every object in the namespace, by name.
    let seen: Arc<Mutex<HashMap<String, (Instant, Secret)>>> = Arc::default();
    let s2 = seen.clone();
    let watch_api = api.clone();
    tokio::spawn(async move {
        let mut w = watcher(watch_api, watcher::Config::default()).boxed();
        while let Some(ev) = w.next().await {
            if let Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) = ev {
                let name = s.metadata.name.clone().unwrap_or_default();
                s2.lock()
                    .unwrap()
                    .entry(name)
                    .or_insert((Instant::now(), s));
            }
        }
    });
    let wait_seen = |name: String| {
        let seen = seen.clone();
        async move {
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(v) = seen.lock().unwrap().get(&name).cloned() {
                    return v;
                }
                assert!(Instant::now() < end, "{name} never appeared");
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
    };

    let (mut watch_ms, mut shadow_ms, mut map_ms) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..LATENCY_SAMPLES {
        let name = format!("lat{i}");
        let t0 = Instant::now();
        api.create(
            &PostParams::default(),
            &secret(&name, &hpack_friendly_secret(32)),
        )
        .await
        .unwrap();
        let (t_orig, _) = wait_seen(name.clone()).await;
        let (t_shadow, sh) = wait_seen(format!("{name}-kloak")).await;
        let p = sh.data.unwrap()["token"].0.clone();
        let key = map_key(&p);
        let end = Instant::now() + Duration::from_secs(10);
        while map
            .lookup(&key, libbpf_rs::MapFlags::ANY)
            .ok()
            .flatten()
            .is_none()
        {
            assert!(Instant::now() < end, "placeholder never reached the map");
            std::thread::sleep(Duration::from_micros(200));
        }
        let t_map = Instant::now();
        watch_ms.push((t_orig - t0).as_secs_f64() * 1e3);
        shadow_ms.push((t_shadow - t0).as_secs_f64() * 1e3);
        map_ms.push((t_map - t0).as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Memory with 1,000 enabled Secrets, once all are in the map.
    let started = Instant::now();
    let mut tasks = futures::stream::iter(0..MANY)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &secret(&format!("many{i}"), &hpack_friendly_secret(32)),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(16);
    while tasks.next().await.is_some() {}
    let end = Instant::now() + Duration::from_secs(120);
    let total = LATENCY_SAMPLES + MANY;
    loop {
        let n = map.keys().count();
        if n >= total {
            break;
        }
        assert!(
            Instant::now() < end,
            "only {n} of {total} placeholders reached the map"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_in = started.elapsed();
    // Two full resyncs with everything loaded.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let loaded = rss_kib(pid);

    let mut w = watch_ms.clone();
    let mut s = shadow_ms.clone();
    let mut m = map_ms.clone();
    let j = serde_json::json!({
        "latency_ms": {
            "samples": LATENCY_SAMPLES,
            "apiserver_watch_baseline": {"median": pct(&mut w, 0.5), "p90": pct(&mut w, 0.9)},
            "shadow_visible": {"median": pct(&mut s, 0.5), "p90": pct(&mut s, 0.9)},
            "in_secret_map": {"median": pct(&mut m, 0.5), "p90": pct(&mut m, 0.9)},
        },
        "memory_kib": {
            "idle_rss": idle.0,
            "secrets": total,
            "loaded_rss": loaded.0,
            "peak_rss": loaded.1,
        },
        "bulk": {"secrets": MANY, "all_in_map_s": all_in.as_secs_f64()},
    });
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("controller.json"),
        serde_json::to_vec_pretty(&j).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&j).unwrap());
    drop(ctl);
}
