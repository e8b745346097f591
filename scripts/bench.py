#!/usr/bin/env python3
"""Data-path benchmark: added latency per request, measured side by side with
"no agent" in the same run, and the BPF scan cost per KiB.

Writes target/bench/datapath.json and prints a Markdown table.
"""
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KLOAK = os.path.join(ROOT, "target/release/kloak")
FIX = os.path.join(ROOT, "e2e/fixtures")
N = int(os.environ.get("BENCH_REQUESTS", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
WARMUP = 50
# BENCH_ONLY=audit,scan runs those sections only and merges them into the
# existing datapath.json. Sections: clients, http2, writes, hooks, audit, scan,
# wire (pause vs wire vs an nginx proxy; also written to target/bench/wire.json).
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


def cgroup2_root():
    with open("/proc/mounts") as f:
        for line in f:
            mnt, typ = line.split()[1:3]
            if typ == "cgroup2":
                return mnt
    raise SystemExit("bench.py: no cgroup2 mount")


def into_cgroup(cg):
    """A preexec_fn: the child joins `cg` before it execs, so all its CPU is counted there."""
    def join():
        with open(f"{cg}/cgroup.procs", "w") as f:
            f.write("0")
    return join


def agent_memory(pid):
    """VmRSS and VmHWM (KiB) of a process, and the memlock of the BPF maps it holds, each map once."""
    m = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                m[k] = int(v.split()[0])
    maps = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
            maps[int(info["map_id"])] = int(info["memlock"])
        except (OSError, KeyError, ValueError):
            continue
    return {"vm_rss_kib": m.get("VmRSS"), "vm_hwm_kib": m.get("VmHWM"), "bpf_maps": len(maps),
            "bpf_map_memlock_bytes": sum(maps.values()), "map_ids": maps}


def map_names(ids):
    """memlock by map name (from bpftool, when present) for the map ids given."""
    try:
        shown = json.loads(subprocess.run(["bpftool", "map", "show", "--json"], capture_output=True,
                                          text=True).stdout)
    except (OSError, ValueError):
        return None
    names = {m["id"]: m.get("name", str(m["id"])) for m in shown}
    return {names.get(i, str(i)): b for i, b in sorted(ids.items(), key=lambda kv: -kv[1])}


def sample_memory(pid, into):
    """Samples `pid` every 0.25 s until it exits, keeping the last reading taken while all
    its maps were open (VmHWM is the peak); names the maps when their count changes."""
    stop = threading.Event()

    def loop():
        while not stop.wait(0.25):
            try:
                m = agent_memory(pid)
            except OSError:
                return
            if m["bpf_maps"] >= into.get("bpf_maps", 0):
                if m["bpf_maps"] > into.get("bpf_maps", 0):
                    into["bpf_map_memlock_by_name"] = map_names(m["map_ids"])
                into.update(m)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return lambda: (stop.set(), t.join())


def check_record(path, n, header, body, what):
    """Every request the server recorded since the last check must carry `header` after
    "Authorization: Bearer " and `body` after "token=" in its body; the record is then emptied."""
    with open(path) as f:
        raws = [base64.b64decode(json.loads(line)["raw"]) for line in f]
    open(path, "w").close()
    bad = 0
    for r in raws:
        head, _, rest = r.partition(b"\r\n\r\n")
        h = re.search(rb"\r\nauthorization: bearer ([^\r]*)", head, re.I)
        b = re.search(rb"token=([^&]*)", rest)
        if (h.group(1).decode() if h else None) != header or (b.group(1).decode() if b else None) != body:
            bad += 1
    if len(raws) != n or bad:
        raise SystemExit(f"bench.py: {what}: the server recorded {len(raws)} requests (expected {n}), "
                         f"{bad} of them without the expected header/body value: a broken path is not measured")


def served_by(st):
    """Which backend wrote the placeholders of a run, from kloak's --stats-json counters."""
    a, b = st["agent"], st["bpf"]
    wire, paused = a["wire_armed"], a["rewrites"] - a["wire_armed"]
    if not a["rewrites"]:
        return "none"
    if not paused:
        return "wire"
    if not wire:
        return "pause" + (f" ({b['wire_fallbacks']} wire fallbacks)" if b["wire_fallbacks"] else "")
    return f"mixed: wire {wire}, pause {paused}"


NGINX_CONF = """user www-data;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream kloak_bench {{
        server 127.0.0.1:{port};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{nport} ssl;
        server_name localhost;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        keepalive_requests 1000000;
        location / {{
            proxy_pass https://kloak_bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {value}";
            proxy_ssl_session_reuse on;
            proxy_ssl_server_name on;
            proxy_ssl_name localhost;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {upstream_ca};
        }}
    }}
}}
"""


def wire_section(work, goclient, value, env):
    """Issue 15: `kloak run --mode pause`, `--mode wire` and an nginx TLS proxy that adds the
    header, each interleaved round by round with no agent: added latency (header only, header
    and body), CPU per request, throughput of 8 keep-alive clients, the agent's memory, and
    which backend served each configuration's writes. Every request the server records is
    checked for the real value."""
    cg_root = os.path.join(cgroup2_root(), f"kloak-bench-{os.getpid()}")
    cgs = {k: os.path.join(cg_root, k) for k in ("agent", "proxy", "server")}
    for d in [cg_root, *cgs.values()]:
        os.makedirs(d, exist_ok=True)
    stat_files = ",".join(f"{d}/cpu.stat" for d in cgs.values())
    record = f"{work}/wire-record.jsonl"
    open(record, "w").close()
    srv = subprocess.Popen(["python3", f"{FIX}/tls_server.py", "--cert", f"{work}/cert.pem", "--key",
                            f"{work}/key.pem", "--record", record], stdout=subprocess.PIPE, text=True,
                           preexec_fn=into_cgroup(cgs["server"]))
    port = srv.stdout.readline().split()[1]
    placeholder = env["API_TOKEN"]
    x = "x" * len(value)
    ngx, nport = None, None
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    try:
        if nginx:
            # nginx terminates the client's TLS with its own certificate (the
            # client trusts it) and proxies over TLS to the same server.
            ndir = f"{work}/nginx"
            os.makedirs(ndir)
            sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
               "-keyout", f"{ndir}/key.pem", "-out", f"{ndir}/cert.pem", "-subj", "/CN=localhost", "-days", "1",
               "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", stderr=subprocess.DEVNULL)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                nport = str(s.getsockname()[1])
            with open(f"{ndir}/nginx.conf", "w") as f:
                f.write(NGINX_CONF.format(dir=ndir, port=port, nport=nport, value=value,
                                          upstream_ca=f"{work}/cert.pem"))
            ngx = subprocess.Popen([nginx, "-p", ndir, "-c", f"{ndir}/nginx.conf", "-g", "daemon off;"],
                                   preexec_fn=into_cgroup(cgs["proxy"]))
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", int(nport)), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                raise SystemExit("bench.py: nginx did not listen")
        else:
            print("bench.py: nginx not installed (scripts/bench.sh installs nginx-light): no nginx rows",
                  file=sys.stderr)

        def client_cmd(client, config, payload, n, cpu_out=None, workers=None, per=None):
            """The client's command line. `payload`: "header" (the placeholder in the
            Authorization header only) or "header_body" (also in the body). Behind nginx the
            client sends no Authorization header and no placeholder: nginx adds the header."""
            proxied = config == "nginx"
            p, ca = (nport, f"{work}/nginx/cert.pem") if proxied else (port, f"{work}/cert.pem")
            if client == "go":
                c = [goclient, "-url", f"https://localhost:{p}/bench", "-cacert", ca]
                if workers:
                    c += ["-c", str(workers), "-n", str(per), "-warmup", str(WARMUP // 10)]
                else:
                    c += ["-n", str(n), "-latencies", f"{work}/lat.json", "-cpu-out", cpu_out,
                          "-cpu-after", str(WARMUP), "-cpu-stat", stat_files]
                return c + (["-header-only"] if payload == "header" else []) + (["-no-auth"] if proxied else [])
            c = ["python3", f"{FIX}/py_client.py", "threads" if workers else "bench", "--port", p, "--cacert", ca]
            if workers:
                c += ["--threads", str(workers), "--requests", str(per), "--warmup", str(WARMUP // 10)]
            else:
                c += ["--requests", str(n), "--out", f"{work}/lat.json", "--cpu-out", cpu_out,
                      "--cpu-after", str(WARMUP), "--cpu-stat", stat_files]
            return c + (["--header-only"] if payload == "header" else []) + (["--no-auth"] if proxied else [])

        def run(cmd, config, what, n, payload):
            """One run of `cmd` under `config`; checks what the server received."""
            stats = f"{work}/wire-stats.json"
            mem = {}
            if config in ("pause", "wire"):
                cmd = [KLOAK, "run", "--mode", config, "--secrets", f"{work}/secrets.yaml", "--stats-json", stats,
                       "--"] + cmd
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=into_cgroup(cgs["agent"]) if config in ("pause", "wire") else None)
            done = sample_memory(p.pid, mem) if config in ("pause", "wire") else lambda: None
            out, _ = p.communicate()
            done()
            mem.pop("map_ids", None)
            if p.returncode:
                raise SystemExit(f"bench.py: {what}: exit code {p.returncode}")
            if config == "no_agent":
                expect = (placeholder, placeholder if payload == "header_body" else x)
            else:
                expect = (value, value if payload == "header_body" else x)
            check_record(record, n, *expect, what)
            st = None
            if config in ("pause", "wire"):
                with open(stats) as f:
                    st = json.load(f)
            return out, st, mem

        configs = ["no_agent", "pause", "wire"] + (["nginx"] if ngx else [])
        clients = ["go", "python"]
        # Latency and CPU: nginx can add a header, not replace a placeholder in
        # a body, so it is compared on header-only requests.
        lat_keys = [(c, pl, cfg) for c in clients for pl in ("header", "header_body") for cfg in configs
                    if not (cfg == "nginx" and pl == "header_body")]
        tput_keys = [(c, cfg) for c in clients for cfg in configs]
        lat = {k: [] for k in lat_keys}
        cpu = {k: {"requests": 0, "client_user_us": 0, "client_sys_us": 0, "agent_us": 0, "proxy_us": 0,
                   "server_us": 0} for k in lat_keys}
        counters = {}
        memory = {}
        rps = {k: [] for k in tput_keys}
        per = max(N // 2, 10)

        def add_stats(key, st):
            acc = counters.setdefault(key, {"backend": st["backend"], "agent": {}, "bpf": {}})
            for part in ("agent", "bpf"):
                for k, v in st[part].items():
                    acc[part][k] = acc[part].get(k, 0) + v

        for rnd in range(ROUNDS):
            # Every configuration once per round, next to its no-agent baseline;
            # every other round backwards.
            tasks = [("lat", k) for k in lat_keys] + [("tput", k) for k in tput_keys]
            for kind, key in tasks if rnd % 2 == 0 else tasks[::-1]:
                if kind == "lat":
                    client, payload, config = key
                    cpu_out = f"{work}/cpu.json"
                    what = f"{client} {payload} {config} (round {rnd + 1})"
                    _, st, mem = run(client_cmd(client, config, payload, N + WARMUP, cpu_out), config, what,
                                     N + WARMUP, payload)
                    with open(f"{work}/lat.json") as f:
                        lat[key] += json.load(f)[WARMUP:]
                    with open(cpu_out) as f:
                        c = json.load(f)
                    s0, s1 = c["start"], c["end"]
                    d = lambda cg: (s1["cgroups"].get(f"{cgs[cg]}/cpu.stat", 0)
                                    - s0["cgroups"].get(f"{cgs[cg]}/cpu.stat", 0))
                    acc = cpu[key]
                    acc["requests"] += N
                    acc["client_user_us"] += s1["user_us"] - s0["user_us"]
                    acc["client_sys_us"] += s1["sys_us"] - s0["sys_us"]
                    acc["agent_us"] += d("agent")
                    acc["proxy_us"] += d("proxy")
                    acc["server_us"] += d("server")
                else:
                    client, config = key
                    workers = 8
                    what = f"{client} throughput {config} (round {rnd + 1})"
                    cmd = client_cmd(client, config, "header_body", 0, workers=workers, per=per)
                    if config == "nginx":
                        cmd.append("-plain" if client == "go" else "--plain")
                    out, st, mem = run(cmd, config, what, workers * (per + WARMUP // 10),
                                       "header" if config == "nginx" else "header_body")
                    rps[key].append(float(out.split("RPS")[1].split()[0]))
                if st:
                    add_stats(key, st)
                if mem:
                    m = memory.setdefault(key, {})
                    for k, v in mem.items():
                        m[k] = v if isinstance(v, dict) or v is None else max(m.get(k) or 0, v)

        res = {"requests_per_run": N, "rounds": ROUNDS, "throughput_requests_per_worker": per,
               "nginx": nginx and subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip()}
        for client in clients:
            r = res[client] = {}
            for payload in ("header", "header_body"):
                base = lat[(client, payload, "no_agent")]
                bcpu = cpu[(client, payload, "no_agent")]
                base_client = (bcpu["client_user_us"] + bcpu["client_sys_us"]) / bcpu["requests"]
                base_sys = bcpu["client_sys_us"] / bcpu["requests"]
                base_server = bcpu["server_us"] / bcpu["requests"]
                r[payload] = {}
                for config in configs:
                    key = (client, payload, config)
                    if key not in lat:
                        r[payload][config] = "n/a: nginx adds a header; it cannot replace a placeholder in a body"
                        continue
                    xs, c = lat[key], cpu[key]
                    per_req = lambda k: c[k] / c["requests"]
                    client_added = per_req("client_user_us") + per_req("client_sys_us") - base_client
                    own = per_req("proxy_us" if config == "nginx" else "agent_us") if config != "no_agent" else 0
                    e = {"median_us": round(statistics.median(xs), 1), "p99_us": round(pct(xs, 0.99), 1),
                         "added_median_us": round(statistics.median(xs) - statistics.median(base), 1),
                         "added_p99_us": round(pct(xs, 0.99) - pct(base, 0.99), 1),
                         "cpu_us_per_request": {
                             "agent_or_proxy": round(own, 1),
                             "client_added": round(client_added, 1),
                             "client_sys_added": round(per_req("client_sys_us") - base_sys, 1),
                             "total": round(own + client_added, 1),
                             "server_added": round(per_req("server_us") - base_server, 1),
                             "client_user": round(per_req("client_user_us"), 1),
                             "client_sys": round(per_req("client_sys_us"), 1)}}
                    if key in counters:
                        e["served_by"] = served_by(counters[key])
                        e["stats"] = counters[key]
                    elif config == "nginx":
                        e["served_by"] = "nginx"
                    if key in memory:
                        e["memory"] = memory[key]
                    r[payload][config] = e
        t = res["throughput_8_clients"] = {}
        for client in clients:
            base = statistics.median(rps[(client, "no_agent")])
            t[client] = {}
            for config in configs:
                key = (client, config)
                e = {"rps_median": round(statistics.median(rps[key]), 1), "rps_runs": rps[key],
                     "ratio_to_no_agent": round(statistics.median(rps[key]) / base, 3)}
                if key in counters:
                    e["served_by"] = served_by(counters[key])
                    e["stats"] = counters[key]
                elif config == "nginx":
                    e["served_by"] = "nginx"
                if key in memory:
                    e["memory"] = memory[key]
                t[client][config] = e
        if ngx:
            # nginx's own memory, master and workers, after every run.
            with open(f"{cgs['proxy']}/cgroup.procs") as f:
                pids = f.read().split()
            mems = [agent_memory(p) for p in pids]
            res["nginx_memory"] = {"processes": len(pids),
                                   "vm_rss_kib": sum(m["vm_rss_kib"] or 0 for m in mems),
                                   "vm_hwm_kib": sum(m["vm_hwm_kib"] or 0 for m in mems)}
        return res
    finally:
        if ngx:
            ngx.terminate()
            ngx.wait()
        srv.kill()
        srv.wait()
        for d in [*cgs.values(), cg_root]:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.1)


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
    if want("wire"):
        results["wire"] = wire_section(work, goclient, value, env)
        with open(os.path.join(out_dir, "wire.json"), "w") as f:
            json.dump(results["wire"], f, indent=2)
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
    if want("wire") and "wire" in results:
        print_wire(results["wire"])


def print_wire(w):
    print(f"\nwire section: {w['rounds']} rounds x {w['requests_per_run']} requests")
    print("| client | placeholder in | configuration | served by | median µs | p99 µs | added median µs "
          "| added p99 µs | CPU µs/req (agent or proxy + client added) | agent RSS / peak KiB | BPF maps KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for client in ("go", "python"):
        for payload, r in w.get(client, {}).items():
            for config, x in r.items():
                if isinstance(x, str):
                    print(f"| {client} | {payload} | {config} | {x} | | | | | | | |")
                    continue
                c, m = x["cpu_us_per_request"], x.get("memory", {})
                maps = m.get("bpf_map_memlock_bytes")
                print(f"| {client} | {payload} | {config} | {x.get('served_by', '—')} | {x['median_us']} "
                      f"| {x['p99_us']} | {x['added_median_us']} | {x['added_p99_us']} "
                      f"| {c['total']} ({c['agent_or_proxy']} + {c['client_added']}) "
                      f"| {m.get('vm_rss_kib', '—')} / {m.get('vm_hwm_kib', '—')} "
                      f"| {round(maps / 1024) if maps else '—'} |")
    print("\n| client | configuration | served by | requests/s (8 keep-alive clients) | of no agent |")
    print("|---|---|---|---|---|")
    for client, r in w.get("throughput_8_clients", {}).items():
        for config, x in r.items():
            print(f"| {client} | {config} | {x.get('served_by', '—')} | {x['rps_median']} | "
                  f"{x['ratio_to_no_agent']:.1%} |")
    if "nginx_memory" in w:
        print("nginx memory:", w["nginx_memory"])


if __name__ == "__main__":
    sys.exit(main())
