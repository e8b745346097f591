//! The real single-node cluster of `e2e/cluster/up.sh`, driven through the
//! real `kubectl` and `helm`; taken down (`down.sh`) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    helm: PathBuf,
    /// How long each phase took, for the report at the end.
    pub phases: Vec<(String, Duration)>,
    started: Instant,
}

fn script(name: &str) -> PathBuf {
    workspace_root().join("e2e/cluster").join(name)
}

fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

impl Cluster {
    /// Brings the cluster up (or finds it up) in `dir`.
    pub fn up(dir: &Path) -> Cluster {
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(script("up.sh"))
            .arg(dir)
            .stderr(Stdio::inherit())
            .output()
            .expect("running e2e/cluster/up.sh");
        let stdout = ok("e2e/cluster/up.sh", out);
        let kubeconfig = stdout
            .lines()
            .find_map(|l| l.strip_prefix("KUBECONFIG="))
            .unwrap_or_else(|| panic!("up.sh printed no KUBECONFIG: {stdout}"))
            .into();
        let helm = Command::new("bash")
            .arg(script("build.sh"))
            .arg("helm")
            .stderr(Stdio::inherit())
            .output()
            .expect("building helm");
        let helm = PathBuf::from(ok("e2e/cluster/build.sh helm", helm).trim()).join("helm");
        let mut c = Cluster {
            kubeconfig,
            dir: dir.to_path_buf(),
            helm,
            phases: Vec::new(),
            started,
        };
        c.phase("cluster up (build, start, images)");
        c
    }

    /// Closes the current phase under `name`.
    pub fn phase(&mut self, name: &str) {
        let now = Instant::now();
        self.phases.push((name.to_string(), now - self.started));
        self.started = now;
    }

    pub fn report(&self) -> String {
        let total: Duration = self.phases.iter().map(|(_, d)| *d).sum();
        let mut s = String::from("cluster e2e phases:\n");
        for (name, d) in &self.phases {
            s.push_str(&format!("  {:>7.1} s  {name}\n", d.as_secs_f64()));
        }
        s.push_str(&format!("  {:>7.1} s  total\n", total.as_secs_f64()));
        s
    }

    pub fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = Command::new(self.dir.join("bin/kubectl"));
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run_with_stdin(c, stdin)
    }

    /// kubectl, which must succeed; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        ok(
            &format!("kubectl {}", args.join(" ")),
            self.kubectl_output(args, None),
        )
    }

    pub fn apply(&self, yaml: &str) -> String {
        ok(
            "kubectl apply",
            self.kubectl_output(&["apply", "-f", "-"], Some(yaml)),
        )
    }

    pub fn helm_output(&self, args: &[&str]) -> Output {
        let mut c = Command::new(&self.helm);
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run_with_stdin(c, None)
    }

    pub fn helm(&self, args: &[&str]) -> String {
        ok(&format!("helm {}", args.join(" ")), self.helm_output(args))
    }

    /// Polls `f` every half second (each poll is a kubectl or helm run)
    /// until it returns Some, or panics naming `what`.
    pub fn eventually<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        crate::poll::eventually_sync(what, timeout, Duration::from_millis(500), f)
    }
}

fn run_with_stdin(mut c: Command, stdin: Option<&str>) -> Output {
    use std::io::Write;
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().expect("starting kubectl/helm");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("KLOAK_KEEP_CLUSTER").is_some() {
            eprintln!(
                "KLOAK_KEEP_CLUSTER set: the cluster in {} stays up",
                self.dir.display()
            );
            return;
        }
        let _ = Command::new("bash")
            .arg(script("down.sh"))
            .arg(&self.dir)
            .status();
    }
}
