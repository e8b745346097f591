#!/usr/bin/env python3
"""Data-path benchmark: added latency per request, measured side by side with
"no agent" in the same run, and the BPF scan cost per KiB.

Writes target/bench/datapath.json and prints a Markdown table.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KLOAK = os.path.join(ROOT, "target/release/kloak")
FIX = os.path.join(ROOT, "e2e/fixtures")
N = int(os.environ.get("BENCH_REQUESTS", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
WARMUP = 50
# BENCH_ONLY=audit,scan runs those sections only and merges them into the
# existing datapath.json.
ONLY = [x for x in os.environ.get("BENCH_ONLY", "").split(",") if x]
# BENCH_BASELINE_KLOAK=PATH: a kloak binary built from an earlier commit; the
# clients section then also runs it ("baseline_*" rows), interleaved round by
# round with the current build, so a change is compared within one run.
BASELINE = os.environ.get("BENCH_BASELINE_KLOAK")


def want(section):
    return not ONLY or section in ONLY


def sh(*a, **kw):
    return subprocess.run(a, check=True, **kw)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def added_ns(runs):
    """Medians of per-operation nanoseconds without and with the agent."""
    base, agent = statistics.median(runs["no_agent"]), statistics.median(runs["agent"])
    return {"no_agent_ns": round(base), "agent_ns": round(agent), "added_ns": round(agent - base)}


def main():
    out_dir = os.path.join(ROOT, "target/bench")
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp()
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
       "-keyout", f"{work}/key.pem", "-out", f"{work}/cert.pem", "-subj", "/CN=localhost", "-days", "1",
       "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", stderr=subprocess.DEVNULL)
    srv = subprocess.Popen(["python3", f"{FIX}/tls_server.py", "--cert", f"{work}/cert.pem", "--key",
                            f"{work}/key.pem", "--record", "/dev/null"], stdout=subprocess.PIPE, text=True)
    port = srv.stdout.readline().split()[1]
    goclient = os.path.join(ROOT, "target/e2e-bin/goclient")
    os.makedirs(os.path.dirname(goclient), exist_ok=True)
    sh("go", "build", "-o", goclient, "main.go", cwd=f"{FIX}/goclient", env={**os.environ, "CGO_ENABLED": "0"})
    value = "sk-bench-" + "v" * 23
    with open(f"{work}/secrets.yaml", "w") as f:
        f.write(f'secrets:\n  - name: bench\n    value: "{value}"\n    env: API_TOKEN\n')
    env = {**os.environ, "API_TOKEN": "kloak:" + "B" * (len(value) - 6)}

    def client_cmd(client, plain, out):
        if client == "go":
            c = [goclient, "-url", f"https://localhost:{port}/bench", "-cacert", f"{work}/cert.pem",
                 "-n", str(N + WARMUP), "-latencies", out]
            return c + (["-plain"] if plain else [])
        c = ["python3", f"{FIX}/py_client.py", "bench", "--port", port, "--cacert", f"{work}/cert.pem",
             "--requests", str(N + WARMUP), "--out", out]
        return c + (["--plain"] if plain else [])

    def measure(client, config):
        out = f"{work}/{client}-{config}.json"
        agent = config.removeprefix("baseline_")
        plain = not agent.startswith("agent_placeholder")
        cmd = client_cmd(client, plain, out)
        stats = f"{work}/stats-{client}-{config}.json"
        if config != "no_agent":
            scrub = "false" if config.endswith("no_scrub") else "true"
            kloak = BASELINE if config.startswith("baseline_") else KLOAK
            cmd = [kloak, "run", "--secrets", f"{work}/secrets.yaml", "--stats-json", stats,
                   "--scrub", scrub, "--"] + cmd
        sh(*cmd, env=env, stdout=subprocess.DEVNULL)
        with open(out) as f:
            lat = json.load(f)[WARMUP:]
        st = None
        if config != "no_agent":
            with open(stats) as f:
                st = json.load(f)
        return lat, st

    results = {"requests_per_run": N, "rounds": ROUNDS, "clients": {}}
    if want("clients"):
        for client in ["go", "python"]:
            lat = {"no_agent": [], "agent_no_placeholder": [], "agent_placeholder": [],
                   "agent_placeholder_no_scrub": []}
            if BASELINE:
                lat.update({"baseline_agent_no_placeholder": [], "baseline_agent_placeholder": []})
            pause = {"batches": 0, "wake_ns": 0, "wait_ns": 0, "patch_ns": 0}
            base_pause = dict(pause)
            for rnd in range(ROUNDS):
                # Interleaved, so drift on the VM hits every configuration
                # alike; every other round backwards, so no configuration
                # always follows the same one.
                order = list(lat) if rnd % 2 == 0 else list(lat)[::-1]
                for config in order:
                    l, st = measure(client, config)
                    lat[config] += l
                    if st and config in ("agent_placeholder", "baseline_agent_placeholder"):
                        a = st["agent"]
                        p = pause if config == "agent_placeholder" else base_pause
                        p["batches"] += a["pause_batches"]
                        p["wake_ns"] += a["wake_ns_total"]
                        p["wait_ns"] += a["stop_wait_ns_total"]
                        p["patch_ns"] += a["patch_ns_total"]
            base_med = statistics.median(lat["no_agent"])
            base_p99 = pct(lat["no_agent"], 0.99)
            r = {}
            for config, xs in lat.items():
                r[config] = {"median_us": round(statistics.median(xs), 1), "p99_us": round(pct(xs, 0.99), 1),
                             "added_median_us": round(statistics.median(xs) - base_med, 1),
                             "added_p99_us": round(pct(xs, 0.99) - base_p99, 1)}
            def breakdown(p):
                b = max(p["batches"], 1)
                return {"wake": round(p["wake_ns"] / b / 1000, 1),
                        "group_stop_wait": round(p["wait_ns"] / b / 1000, 1),
                        "patch_and_continue": round(p["patch_ns"] / b / 1000, 1)}
            r["pause_breakdown_us"] = breakdown(pause)
            if BASELINE:
                r["baseline_pause_breakdown_us"] = breakdown(base_pause)
                r["baseline_binary"] = BASELINE
            results["clients"][client] = r

    if want("http2"):
        # HTTP/2: Go's h2 client against the hyper-h2 server; the placeholder sits
        # Huffman-coded in the authorization header (and plain in the body).
        h2srv = subprocess.Popen(["python3", f"{FIX}/h2_server.py", "--cert", f"{work}/cert.pem", "--key",
                                  f"{work}/key.pem", "--record", "/dev/null", "--raw", "/dev/null"],
                                 stdout=subprocess.PIPE, text=True)
        h2port = h2srv.stdout.readline().split()[1]
        try:
            lat = {"no_agent": [], "agent_placeholder": []}
            for _ in range(ROUNDS):
                for config in lat:
                    out = f"{work}/h2-{config}.json"
                    cmd = [goclient, "-h2", "-url", f"https://localhost:{h2port}/bench", "-cacert", f"{work}/cert.pem",
                           "-n", str(N + WARMUP), "-latencies", out]
                    if config != "no_agent":
                        cmd = [KLOAK, "run", "--secrets", f"{work}/secrets.yaml", "--"] + cmd
                    sh(*cmd, env=env, stdout=subprocess.DEVNULL)
                    with open(out) as f:
                        lat[config] += json.load(f)[WARMUP:]
            base = statistics.median(lat["no_agent"])
            results["http2_go"] = {c: {"median_us": round(statistics.median(x), 1), "p99_us": round(pct(x, 0.99), 1),
                                       "added_median_us": round(statistics.median(x) - base, 1),
                                       "added_p99_us": round(pct(x, 0.99) - pct(lat["no_agent"], 0.99), 1)}
                                   for c, x in lat.items()}
        finally:
            h2srv.kill()

    if want("writes"):
        # Cost of one TLS write without a placeholder: uprobe, scan, scrub
        # uretprobe. Raw writes in a loop, interleaved with and without the agent.
        results["write_without_placeholder"] = {}
        for client in ["python", "go"]:
            per_write = {"no_agent": [], "agent": []}
            for _ in range(ROUNDS * 3):
                for config in per_write:
                    if client == "go":
                        cmd = [goclient, "-url", f"https://localhost:{port}/", "-cacert", f"{work}/cert.pem",
                               "-writes", "20000", "-size", "256"]
                    else:
                        cmd = ["python3", f"{FIX}/py_client.py", "writes", "--port", port, "--cacert",
                               f"{work}/cert.pem", "--requests", "20000", "--size", "256"]
                    if config == "agent":
                        cmd = [KLOAK, "run", "--secrets", f"{work}/secrets.yaml", "--"] + cmd
                    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                    per_write[config].append(float(out.split("NS_PER_WRITE")[1].split()[0]))
            results["write_without_placeholder"][client] = {**added_ns(per_write), "runs": per_write}

    if want("hooks"):
        # The destination hooks: cost per TCP connect and per DNS answer received.
        dns = subprocess.Popen(["dnsmasq", "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                                "--bind-interfaces", "--pid-file=", "--listen-address=127.0.0.153", "--port=53",
                                "--host-record=allowed.test,127.0.0.2,60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        results["destination_hooks"] = {}
        try:
            for op in ["connects", "dnsq"]:
                runs = {"no_agent": [], "agent": []}
                for _ in range(ROUNDS * 2):
                    for config in runs:
                        cmd = ["python3", f"{FIX}/py_client.py", op, "--port", port, "--cacert", f"{work}/cert.pem",
                               "--requests", "3000", "--dns", "127.0.0.153", "--host", "allowed.test"]
                        if config == "agent":
                            cmd = [KLOAK, "run", "--secrets", f"{work}/secrets.yaml", "--trusted-dns", "127.0.0.153",
                                   "--"] + cmd
                        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                        runs[config].append(float(out.split("NS_PER_OP")[1].split()[0]))
                results["destination_hooks"][op] = added_ns(runs)
        finally:
            dns.kill()

    if want("audit"):
        # Audit export and a collector stopped mid-run: the same agent sends a
        # span for every rewrite (and scrub) to a real Jaeger; in "stopped" the
        # collector is killed between the two halves. Rewrite latency of the
        # second half is compared with the same run without export.
        serve = os.path.join(ROOT, "e2e/otel-tools/serve.sh")
        halves = {"no_export": [[], []], "export_live": [[], []], "export_stopped_mid_run": [[], []]}
        for _ in range(ROUNDS):
            for config in halves:
                jdir = tempfile.mkdtemp()
                jenv = dict(l.split("=", 1) for l in
                            subprocess.run(["bash", serve, jdir], check=True, capture_output=True,
                                           text=True).stdout.split())
                with open(f"{jdir}/jaeger.pid") as f:
                    jpid = f.read().strip()
                a, b = f"{work}/half-a.json", f"{work}/half-b.json"
                go = lambda out: " ".join(client_cmd("go", False, out))
                stop = f"kill -9 {jpid}; " if config == "export_stopped_mid_run" else ""
                cmd = [KLOAK, "run", "--secrets", f"{work}/secrets.yaml", "--", "sh", "-c",
                       f"{go(a)} && {stop}{go(b)}"]
                run_env = dict(env)
                if config != "no_export":
                    run_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = jenv["KLOAK_E2E_JAEGER_OTLP"]
                try:
                    sh(*cmd, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                finally:
                    subprocess.run(["kill", "-9", jpid], stderr=subprocess.DEVNULL)
                for i, out in enumerate([a, b]):
                    with open(out) as f:
                        halves[config][i] += json.load(f)[WARMUP:]
        base = [statistics.median(halves["no_export"][i]) for i in range(2)]
        base99 = [pct(halves["no_export"][i], 0.99) for i in range(2)]
        results["audit_export_go"] = {
            c: {half: {"median_us": round(statistics.median(x[i]), 1), "p99_us": round(pct(x[i], 0.99), 1),
                       "added_median_us": round(statistics.median(x[i]) - base[i], 1),
                       "added_p99_us": round(pct(x[i], 0.99) - base99[i], 1)}
                for i, half in enumerate(["first_half", "second_half"])}
            for c, x in halves.items()}

    if want("scan"):
        # BPF scan cost: kernel run-time statistics of the entry program (its
        # tail call included) for writes of growing size without placeholders.
        scan = {}
        with open("/proc/sys/kernel/bpf_stats_enabled", "r+") as f:
            prev = f.read().strip()
            f.seek(0)
            f.write("1")
        try:
            for kib in [1, 4, 16, 64]:
                out = f"{work}/scan.json"
                cmd = [KLOAK, "run", "--secrets", f"{work}/secrets.yaml", "--", "sh", "-c",
                       f"python3 {FIX}/py_client.py bench --plain --size {kib * 1024} --port {port} "
                       f"--cacert {work}/cert.pem --requests 300 --out {out} & "
                       f"sleep 0.7; bpftool prog show --json > {work}/progs.json; wait"]
                sh(*cmd, env=env, stdout=subprocess.DEVNULL)
                with open(f"{work}/progs.json") as f:
                    progs = json.load(f)
                p = [p for p in progs if p.get("name") == "tls_write_enter" and p.get("run_cnt")]
                if p:
                    ns = p[-1]["run_time_ns"] / p[-1]["run_cnt"]
                    scan[f"{kib}KiB"] = {"ns_per_write": round(ns), "ns_per_KiB": round(ns / kib)}
        finally:
            with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
                f.write(prev)
        results["bpf_scan"] = scan
    results["machine"] = {"kernel": os.uname().release, "cpus": os.cpu_count(),
                          "date": time.strftime("%Y-%m-%d")}
    srv.kill()
    path = os.path.join(out_dir, "datapath.json")
    if ONLY and os.path.exists(path):
        with open(path) as f:
            merged = json.load(f)
        merged.update({k: v for k, v in results.items() if v})
        results = merged
    with open(path, "w") as f:
        json.dump(results, f, indent=2)

    print(f"| client | configuration | median µs | p99 µs | added median µs | added p99 µs |")
    print("|---|---|---|---|---|---|")
    for client, r in results.get("clients", {}).items():
        for config in ["no_agent", "agent_no_placeholder", "agent_placeholder", "agent_placeholder_no_scrub",
                       "baseline_agent_no_placeholder", "baseline_agent_placeholder"]:
            if config not in r:
                continue
            x = r[config]
            print(f"| {client} | {config} | {x['median_us']} | {x['p99_us']} | {x['added_median_us']} | {x['added_p99_us']} |")
    for client, r in results.get("clients", {}).items():
        print(client, "pause breakdown (mean µs):", r["pause_breakdown_us"])
        if "baseline_pause_breakdown_us" in r:
            print(client, "baseline pause breakdown (mean µs):", r["baseline_pause_breakdown_us"])
    print("BPF scan:", json.dumps(results.get("bpf_scan")))
    for c, x in results.get("http2_go", {}).items():
        print(f"h2 go {c}: median {x['median_us']} p99 {x['p99_us']} added median {x['added_median_us']} added p99 {x['added_p99_us']}")
    for c, x in results.get("audit_export_go", {}).items():
        for half, y in x.items():
            print(f"audit {c} {half}: median {y['median_us']} p99 {y['p99_us']} "
                  f"added median {y['added_median_us']} added p99 {y['added_p99_us']}")
    for op, w in results.get("destination_hooks", {}).items():
        print(f"{op}: {w['no_agent_ns']} ns -> {w['agent_ns']} ns (+{w['added_ns']} ns)")
    for client, w in results.get("write_without_placeholder", {}).items():
        print(f"{client} write without placeholder: {w['no_agent_ns']} ns -> {w['agent_ns']} ns (+{w['added_ns']} ns)")


if __name__ == "__main__":
    sys.exit(main())
