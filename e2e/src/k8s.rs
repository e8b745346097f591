//! A real kube-apiserver and etcd on loopback for the Kubernetes tests, and
//! the `kloak controller` / `kloak webhook` processes under test.
//!
//! One control plane per test binary, started on first use from a thread
//! that lives as long as the process: etcd and the apiserver carry a parent
//! death signal, so they go when the test process goes, however it goes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::poll::{POLL, eventually_sync};
use crate::{free_port, kloak_bin, workspace_root};

pub struct ControlPlane {
    pub url: String,
    pub dir: PathBuf,
}

/// A control plane dies with its test binary (SIGKILL, so nothing of it can
/// clean up): its directory (etcd's data, ~125 MiB) is removed by the next
/// test binary that starts one.
fn remove_dead_control_planes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("kloak-k8s-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The control plane of this test binary.
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        remove_dead_control_planes();
        let dir = std::env::temp_dir().join(format!("kloak-k8s-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("control plane dir");
        let (port, etcd) = (free_port(), free_port());
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.clone();
        // This thread must outlive every test: the script's death signal
        // fires when the thread that started it ends.
        std::thread::spawn(move || {
            let mut child = Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--", "bash"])
                .arg(workspace_root().join("e2e/k8s-tools/control-plane.sh"))
                .arg("--foreground")
                .arg(&d)
                .args([port.to_string(), etcd.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("starting control-plane.sh");
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            let _ = child.wait();
            loop {
                std::thread::park();
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(900))
            .expect("control plane started (the first run builds kube-apiserver)");
        let url = line
            .trim()
            .strip_prefix("READY ")
            .unwrap_or_else(|| {
                panic!(
                    "control plane failed: {line:?}; see {}/apiserver.log",
                    dir.display()
                )
            })
            .to_string();
        let cp = ControlPlane { url, dir };
        std::fs::write(cp.admin_kubeconfig(), cp.kubeconfig_yaml(None)).unwrap();
        cp
    })
}

impl ControlPlane {
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    fn kubeconfig_yaml(&self, token: Option<&str>) -> String {
        let user = match token {
            Some(t) => serde_json::json!({ "token": t }),
            None => serde_json::json!({
                "client-certificate": self.dir.join("admin.pem"),
                "client-key": self.dir.join("admin.key"),
            }),
        };
        serde_json::json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority": self.dir.join("ca.pem")}}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "u"}}],
        })
        .to_string()
    }

    pub async fn client_for(&self, kubeconfig: &Path) -> kube::Client {
        let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kube config");
        kube::Client::try_from(cfg).expect("kube client")
    }

    pub async fn admin(&self) -> kube::Client {
        self.client_for(&self.admin_kubeconfig()).await
    }

    /// A kubeconfig for ServiceAccount `kloak-system/<sa>`, bound to exactly
    /// the seed's ClusterRole and nothing else.
    pub async fn seed_kubeconfig(&self, sa: &str) -> PathBuf {
        let c = self.admin().await;
        ensure_namespace(&c, "kloak-system", false).await;
        let role: ClusterRole = serde_yaml_like(
            &std::fs::read_to_string(crate::fixtures().join("seed-clusterrole.json")).unwrap(),
        );
        let _ = Api::<ClusterRole>::all(c.clone())
            .create(&PostParams::default(), &role)
            .await;
        let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), "kloak-system");
        let _ = sas
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": sa}})).unwrap(),
            )
            .await;
        let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("kloak-seed-{sa}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kloak-seed"},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": "kloak-system"}],
        }))
        .unwrap();
        let _ = Api::<ClusterRoleBinding>::all(c.clone())
            .create(&PostParams::default(), &binding)
            .await;
        let req: k8s_openapi::api::authentication::v1::TokenRequest =
            serde_json::from_value(serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 7200}
            }))
            .unwrap();
        let tr: k8s_openapi::api::authentication::v1::TokenRequest = sas
            .create_subresource("token", sa, &PostParams::default(), &req)
            .await
            .expect("TokenRequest for the ServiceAccount");
        let token = tr.status.expect("token status").token;
        let path = self.dir.join(format!("{sa}.kubeconfig"));
        std::fs::write(&path, self.kubeconfig_yaml(Some(&token))).unwrap();
        path
    }
}

fn serde_yaml_like<T: serde::de::DeserializeOwned>(json: &str) -> T {
    serde_json::from_str(json).expect("fixture JSON")
}

/// Creates a namespace (labeled for Kloak if `enabled`) and its `default`
/// ServiceAccount, which pods need and no controller-manager makes here.
pub async fn ensure_namespace(c: &kube::Client, name: &str, enabled: bool) {
    let labels = if enabled {
        serde_json::json!({"getkloak.io/enabled": "true"})
    } else {
        serde_json::json!({})
    };
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap();
    let _ = Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await;
    let _ = Api::<ServiceAccount>::namespaced(c.clone(), name)
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap(),
        )
        .await;
}

/// A `kloak` process (controller or webhook); killed on drop. Its stderr
/// goes to a file so tests can check it for leaks.
pub struct Kloak {
    pub child: Child,
    pub log: PathBuf,
}

impl Kloak {
    pub fn start(args: &[&str], kubeconfig: &Path, node: &str, log_name: &str) -> Kloak {
        Kloak::start_with_env(args, kubeconfig, node, log_name, &[])
    }

    pub fn start_with_env(
        args: &[&str],
        kubeconfig: &Path,
        node: &str,
        log_name: &str,
        env: &[(&str, &str)],
    ) -> Kloak {
        let log = control_plane().dir.join(format!("{log_name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let mut c = Command::new(kloak_bin());
        crate::ledger::export_spans(&mut c);
        let child = c
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", node)
            .env(
                "RUST_LOG",
                std::env::var("KLOAK_TEST_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("starting kloak");
        Kloak { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin address in its log, if it has bound one yet.
    fn logged_admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.log_text()
            .lines()
            .find(|l| l.contains("admin server listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
    }

    /// The admin port it bound (it logs the address once listening).
    pub fn admin_addr(&mut self) -> std::net::SocketAddr {
        eventually_sync(
            "an admin address in the log",
            Duration::from_secs(30),
            POLL,
            || {
                if let Some(addr) = self.logged_admin_addr() {
                    return Ok(addr);
                }
                let log = self.log_text();
                self.assert_running();
                Err(log)
            },
        )
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("kloak exited ({st}):\n{}", self.log_text());
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kloak {
    fn drop(&mut self) {
        // For the whole run's leak check: what it served last, and its log.
        if crate::ledger::run_dir().is_some()
            && matches!(self.child.try_wait(), Ok(None))
            && let Some(addr) = self.logged_admin_addr()
            && let Some((200, text)) = crate::try_http_get(addr, "/metrics")
        {
            crate::ledger::keep_metrics("kloak-controller", &text);
        }
        self.stop();
        crate::ledger::keep_log("kloak-controller", &self.log);
    }
}

/// Where cgroup2 is mounted here (/sys/fs/cgroup or, on hybrid hosts,
/// /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split_ascii_whitespace().nth(4)?;
            (post.split_ascii_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mp))
        })
        .min_by_key(|p| p.components().count())
        .expect("a cgroup2 mount")
}

/// A container as a runtime would leave it: a cgroup named the runtime's
/// way, with real processes in it. The directory goes on drop.
pub struct FakeContainer {
    pub id: String,
    pub cgroup: PathBuf,
    top: PathBuf,
    procs: Vec<Child>,
}

impl FakeContainer {
    /// `systemd`: containerd under the systemd driver
    /// (`kubepods.slice/…/cri-containerd-<id>.scope`); otherwise the
    /// cgroupfs driver (`kubepods/besteffort/pod<uid>/<id>`).
    pub fn new(pod_uid: &str, systemd: bool) -> FakeContainer {
        let id: String = (0..64)
            .map(|_| b"0123456789abcdef"[rand::random_range(0..16)] as char)
            .collect();
        let root = cgroup2_root();
        let (top, rel) = if systemd {
            let u = pod_uid.replace('-', "_");
            (
                root.join("kubepods.slice"),
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{id}.scope"
                ),
            )
        } else {
            (
                root.join("kubepods"),
                format!("kubepods/besteffort/pod{pod_uid}/{id}"),
            )
        };
        let cgroup = root.join(rel);
        std::fs::create_dir_all(&cgroup).expect("creating the container cgroup");
        FakeContainer {
            id,
            cgroup,
            top,
            procs: Vec::new(),
        }
    }

    /// A container that exists only in the cgroup v1 `pids` hierarchy
    /// (cgroupfs driver naming), as on a cgroup v1 node.
    pub fn new_v1(pod_uid: &str) -> FakeContainer {
        let id: String = (0..64)
            .map(|_| b"0123456789abcdef"[rand::random_range(0..16)] as char)
            .collect();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let pids = info
            .lines()
            .filter_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let mp = pre.split_ascii_whitespace().nth(4)?;
                let mut f = post.split_ascii_whitespace();
                let (ty, opts) = (f.next()?, f.nth(1)?);
                (ty == "cgroup" && opts.split(',').any(|o| o == "pids")).then(|| PathBuf::from(mp))
            })
            .next()
            .expect("a cgroup v1 pids hierarchy (this host is hybrid)");
        let cgroup = pids.join(format!("kubepods/besteffort/pod{pod_uid}/{id}"));
        std::fs::create_dir_all(&cgroup).expect("creating the v1 container cgroup");
        FakeContainer {
            id,
            cgroup,
            top: pids.join("kubepods"),
            procs: Vec::new(),
        }
    }

    pub fn container_id(&self) -> String {
        format!("containerd://{}", self.id)
    }

    /// Starts `argv` inside the cgroup, with `env`, stdin and stdout piped.
    pub fn spawn(&mut self, argv: &[String], env: &[(&str, &str)]) -> &mut Child {
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
            self.cgroup.display()
        );
        let mut c = Command::new("sh");
        c.arg("-c").arg(script).arg("sh").args(argv);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting a process in the container");
        self.procs.push(child);
        self.procs.last_mut().unwrap()
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        // Deepest first; the shared kubepods levels go once empty.
        let mut d = self.cgroup.clone();
        while d.starts_with(&self.top) {
            if std::fs::remove_dir(&d).is_err() {
                break;
            }
            if !d.pop() {
                break;
            }
        }
    }
}

/// A client process that sends one request per `send()`.
pub struct Gated {
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Gated {
    /// Takes over a process started in `gated` mode, once it says READY.
    pub fn new(child: &mut Child) -> Gated {
        Gated::from_pipes(child.stdin.take().unwrap(), child.stdout.take().unwrap())
    }

    /// The same, for a gated client behind a shell's pipes.
    pub fn from_pipes(stdin: std::process::ChildStdin, stdout: std::process::ChildStdout) -> Gated {
        let mut g = Gated {
            stdin,
            stdout: BufReader::new(stdout),
        };
        g.expect("READY");
        g
    }

    fn expect(&mut self, word: &str) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("client output");
        assert_eq!(line.trim(), word, "client said {line:?}");
    }

    pub fn send(&mut self) {
        use std::io::Write;
        writeln!(self.stdin, "go").expect("client stdin");
        self.stdin.flush().unwrap();
        self.expect("SENT");
    }
}
