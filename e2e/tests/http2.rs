//! HTTP/2: header values are HPACK Huffman-coded, so the placeholder is
//! swapped bit for bit inside the coded string. The server's strict HPACK
//! decoder (hyper-h2) must read the real value, and a second decoder (the
//! `hpack` crate) must accept every captured header block. Root only.

use std::time::Duration;

use kloak_e2e::*;

const T: Duration = Duration::from_secs(90);

/// Every header block in a client's plaintext (preface, then frames),
/// decoded in order with one decoder, as the server's would be.
fn decode_header_blocks(raw: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert!(raw.starts_with(PREFACE), "not an HTTP/2 client preface");
    let mut decoder = hpack::Decoder::new();
    let mut blocks = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut i = PREFACE.len();
    while i + 9 <= raw.len() {
        let len =
            (usize::from(raw[i]) << 16) | (usize::from(raw[i + 1]) << 8) | usize::from(raw[i + 2]);
        let (kind, flags) = (raw[i + 3], raw[i + 4]);
        let payload = &raw[i + 9..i + 9 + len];
        i += 9 + len;
        let fragment = match kind {
            0x1 => {
                // HEADERS: strip padding and priority.
                let mut p = payload;
                let pad = if flags & 0x8 != 0 {
                    let n = usize::from(p[0]);
                    p = &p[1..];
                    n
                } else {
                    0
                };
                if flags & 0x20 != 0 {
                    p = &p[5..];
                }
                &p[..p.len() - pad]
            }
            0x9 => payload, // CONTINUATION
            _ => continue,
        };
        pending.extend_from_slice(fragment);
        if flags & 0x4 != 0 {
            let headers = decoder
                .decode(&pending)
                .unwrap_or_else(|e| panic!("a strict HPACK decoder refused a header block: {e:?}"));
            blocks.push(headers);
            pending.clear();
        }
    }
    blocks
}

fn h2_client_sends_the_real_value(client: &str) {
    let srv = H2Server::start();
    let value = random_secret(&format!("h2-{client}-"), 32);
    let s = Secrets::write(&[("api-token", &value, "API_TOKEN")]);
    let ca = srv.cacert().display().to_string();
    let url = format!("https://localhost:{}/h2", srv.port);
    let cmd = match client {
        "curl" => format!(
            "curl -sS --http2 --cacert {ca} -H \"Authorization: Bearer $API_TOKEN\" -d \"token=$API_TOKEN\" {url}"
        ),
        "go" => format!("{} -h2 -url {url} -cacert {ca} -n 2", go_client().display()),
        other => panic!("no client {other}"),
    };
    let run = run_kloak(&s, &[], &["sh", "-c", &cmd], T);
    assert!(run.output.status.success(), "{client}: {}", run.stderr());
    let records = srv.records();
    assert!(!records.is_empty(), "{client}: nothing arrived");
    let expected = format!("Bearer {value}");
    for r in &records {
        assert!(
            r.get("error").is_none(),
            "{client}: the server's HPACK decoder failed: {r}"
        );
        assert_eq!(
            r["headers"]["authorization"],
            expected.as_str(),
            "{client}: decoded header"
        );
        assert!(
            r["body"].as_str().unwrap().contains(&value),
            "{client}: body"
        );
    }
    let blocks = decode_header_blocks(&srv.raw());
    let auth: Vec<&Vec<u8>> = blocks
        .iter()
        .flatten()
        .filter(|(n, _)| n == b"authorization")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(auth.len(), records.len());
    assert!(
        auth.iter().all(|v| v[..] == *expected.as_bytes()),
        "{client}: second decoder disagrees"
    );
    run.assert_no_leak(&value);
}

/// Go's own h2 server decodes the same requests: its view of the header.
fn go_server_decodes_the_real_value(client: &str) {
    let bin = workspace_root().join("target/e2e-bin/h2goserver");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    let st = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg("main.go")
        .current_dir(fixtures().join("h2goserver"))
        .env("CGO_ENABLED", "0")
        .status()
        .expect("go runs");
    assert!(st.success());
    let certs = TempDir::new().unwrap();
    make_certificates(certs.path(), &["127.0.0.1"]);
    let d = certs.path();
    let record = d.join("go-h2.jsonl");
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("-cert")
        .arg(d.join("cert.pem"))
        .arg("-key")
        .arg(d.join("key.pem"))
        .arg("-record")
        .arg(&record);
    let (mut server, port) = spawn_listening(&mut cmd, "Go's h2 server");
    let value = random_secret(&format!("goh2-{client}-"), 32);
    let s = Secrets::write(&[("api-token", &value, "API_TOKEN")]);
    let ca = d.join("ca.pem").display().to_string();
    let url = format!("https://localhost:{port}/go-server");
    let cmd = match client {
        "curl" => format!(
            "curl -sS --http2 --cacert {ca} -H \"Authorization: Bearer $API_TOKEN\" -d \"token=$API_TOKEN\" {url}"
        ),
        _ => format!("{} -h2 -url {url} -cacert {ca} -n 2", go_client().display()),
    };
    let run = run_kloak(&s, &[], &["sh", "-c", &cmd], T);
    let _ = server.kill();
    let _ = server.wait();
    assert!(run.output.status.success(), "{client}: {}", run.stderr());
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(!text.is_empty(), "{client}: nothing reached Go's server");
    for l in text.lines() {
        let r: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(r["proto"], "HTTP/2.0");
        assert_eq!(
            r["authorization"],
            format!("Bearer {value}").as_str(),
            "{client}"
        );
        assert!(r["body"].as_str().unwrap().contains(&value));
    }
}

#[test]
fn go_http2_server_decodes_the_real_value_from_curl_and_go() {
    let Some(_g) = root_test() else { return };
    go_server_decodes_the_real_value("curl");
    go_server_decodes_the_real_value("go");
}

#[test]
fn curl_http2_authorization_header_arrives_real() {
    let Some(_g) = root_test() else { return };
    h2_client_sends_the_real_value("curl");
}

#[test]
fn go_http2_authorization_header_arrives_real() {
    let Some(_g) = root_test() else { return };
    h2_client_sends_the_real_value("go");
}

#[test]
fn a_grpc_call_carries_the_real_value_in_its_metadata() {
    let Some(_g) = root_test() else { return };
    let bin = workspace_root().join("target/e2e-bin/grpcclient");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    let st = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(fixtures().join("grpcclient"))
        .env("CGO_ENABLED", "0")
        .status()
        .expect("go runs");
    assert!(
        st.success(),
        "building the gRPC client failed (Go module proxy reachable?)"
    );
    let srv = H2Server::start();
    let value = random_secret("grpc-", 40);
    let s = Secrets::write(&[("api-token", &value, "API_TOKEN")]);
    let addr = format!("localhost:{}", srv.port);
    let ca = srv.cacert().display().to_string();
    let run = run_kloak(
        &s,
        &[],
        &[bin.to_str().unwrap(), "-addr", &addr, "-cacert", &ca],
        T,
    );
    assert!(run.output.status.success(), "{}", run.stderr());
    assert!(
        run.stdout().contains("SERVING"),
        "the call completed: {}",
        run.stdout()
    );
    let r = &srv.records()[0];
    assert_eq!(r["headers"][":path"], "/grpc.health.v1.Health/Check");
    assert_eq!(
        r["headers"]["authorization"],
        format!("Bearer {value}").as_str()
    );
    let blocks = decode_header_blocks(&srv.raw());
    assert!(
        blocks
            .iter()
            .flatten()
            .any(|(n, v)| n == b"authorization" && v[..] == *format!("Bearer {value}").as_bytes())
    );
    run.assert_no_leak(&value);
}
