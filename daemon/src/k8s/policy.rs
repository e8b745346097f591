//! What a labeled Kubernetes Secret must satisfy to be handled by Kloak. The
//! validating webhook rejects it at the door with these messages; the
//! controller applies the same rules before it publishes a shadow, so a
//! Secret that slipped past (webhook down, label added later) is still
//! refused rather than half served.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret as KubeSecret;
use kloak_bpf::{MAX_SECRET_LEN, MIN_SECRET_LEN, PREFIX_LEN};
use kloak_webhook::{ANN_HOSTS, ANN_PORT, ANN_REQUIRE_WIRE};

use crate::datapath::rules::Rules;
use crate::datapath::secrets::SecretValue;

/// A labeled Secret, checked: its values and where they may go.
pub struct Checked {
    pub values: BTreeMap<String, SecretValue>,
    pub rules: Rules,
    /// The rules as written, for the state file.
    pub hosts: Vec<String>,
    pub ports: Vec<u16>,
    /// Served by the wire backend only.
    pub require_wire: bool,
    pub warnings: Vec<String>,
}

/// Whether a placeholder as long as `value` can have an HPACK Huffman code
/// exactly as long as the value's: then HTTP/2 header values can be swapped.
pub fn hpack_possible(value: &[u8]) -> bool {
    let target = crate::datapath::hpack::huffman_bits(value);
    let prefix = crate::datapath::hpack::huffman_bits(kloak_bpf::PREFIX);
    let n = value.len().saturating_sub(PREFIX_LEN) as u32;
    target
        .checked_sub(prefix)
        .is_some_and(|want| want >= 5 * n && want <= 8 * n)
}

fn annotation<'a>(s: &'a KubeSecret, key: &str) -> Option<&'a str> {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn parse_ports(raw: &str) -> Result<Vec<u16>, String> {
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{ANN_PORT}: {p:?} is not a port in 1-65535"))
        })
        .collect()
}

/// Only the two spellings Kubernetes' own boolean annotations use: a
/// misspelt "yes" must not quietly leave the secret to the pause backend.
fn parse_require_wire(raw: Option<&str>) -> Result<bool, String> {
    match raw.map(str::trim) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(format!(
            "{ANN_REQUIRE_WIRE}: {other:?} is not \"true\" or \"false\""
        )),
    }
}

/// Checks a Secret. Errors name the key or annotation and the rule, never a value.
pub fn check(s: &KubeSecret) -> Result<Checked, String> {
    let mut values = BTreeMap::new();
    for (k, v) in s.data.iter().flatten() {
        values.insert(k.clone(), SecretValue::new(v.0.clone()));
    }
    // At admission the API server may still carry stringData; it wins, as it will on write.
    for (k, v) in s.string_data.iter().flatten() {
        values.insert(k.clone(), SecretValue::new(v.as_bytes().to_vec()));
    }
    if values.is_empty() {
        return Err("it has no data: there is nothing for Kloak to protect".into());
    }
    for (k, v) in &values {
        if v.len() < MIN_SECRET_LEN {
            return Err(format!(
                "key {k:?}: the value is {} bytes; the minimum is {MIN_SECRET_LEN}, since its placeholder is as long as the value and starts with \"kloak:\"",
                v.len()
            ));
        }
        if v.len() > MAX_SECRET_LEN {
            return Err(format!(
                "key {k:?}: the value is {} bytes; the maximum is {MAX_SECRET_LEN}, what one BPF map entry holds",
                v.len()
            ));
        }
        if !hpack_possible(v.expose()) {
            return Err(format!(
                "key {k:?}: no placeholder of this length can have the value's HPACK Huffman length, so it could not be swapped in HTTP/2 headers (the value uses too many rare or too many common characters for its length)"
            ));
        }
    }
    let hosts: Vec<String> = annotation(s, ANN_HOSTS)
        .map(|h| {
            h.split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if annotation(s, ANN_HOSTS).is_some() && hosts.is_empty() {
        return Err(format!("{ANN_HOSTS} is set but names no host"));
    }
    let ports = match annotation(s, ANN_PORT) {
        Some(p) => {
            let ports = parse_ports(p)?;
            if ports.is_empty() {
                return Err(format!("{ANN_PORT} is set but names no port"));
            }
            ports
        }
        None => Vec::new(),
    };
    let rules = Rules::parse(&hosts, &ports).map_err(|e| format!("{ANN_HOSTS}: {e}"))?;
    let require_wire = parse_require_wire(annotation(s, ANN_REQUIRE_WIRE))?;
    let mut warnings = Vec::new();
    if rules.unrestricted() {
        warnings.push(format!(
            "kloak: no {ANN_HOSTS} or {ANN_PORT} annotation: any TLS destination receives these values"
        ));
    }
    Ok(Checked {
        values,
        rules,
        hosts,
        ports,
        require_wire,
        warnings,
    })
}

/// The policy the webhook asks.
pub struct Policy;

impl kloak_webhook::SecretPolicy for Policy {
    fn check(&self, s: &KubeSecret) -> Result<Vec<String>, String> {
        check(s).map(|c| c.warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(data: &[(&str, &[u8])], ann: &[(&str, &str)]) -> KubeSecret {
        let mut s = KubeSecret {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        };
        s.metadata.annotations = Some(
            ann.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        s
    }

    fn err(data: &[(&str, &[u8])], ann: &[(&str, &str)]) -> String {
        match check(&secret(data, ann)) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn lengths_hosts_and_ports_are_checked_and_named() {
        let e = err(&[("token", b"s3cr3t!")], &[]);
        assert!(e.contains("\"token\"") && e.contains("7 bytes"), "{e}");
        assert!(!e.contains("s3cr3t!"));
        let e = err(&[("token", &[b'a'; 129])], &[]);
        assert!(e.contains("maximum is 128"), "{e}");
        let e = err(
            &[("t", b"0123456789")],
            &[(ANN_HOSTS, "api.example.com, bad host")],
        );
        assert!(e.contains("bad host"), "{e}");
        let e = err(&[("t", b"0123456789")], &[(ANN_PORT, "443,99999")]);
        assert!(e.contains("99999"), "{e}");
        let e = err(&[("t", b"0123456789")], &[(ANN_HOSTS, " , ")]);
        assert!(e.contains("names no host"), "{e}");
        let e = err(&[], &[]);
        assert!(e.contains("no data"), "{e}");
    }

    #[test]
    fn values_without_an_hpack_safe_placeholder_are_refused() {
        // Eight-bit Huffman codes throughout ('X' is 8 bits, '~' 13): the
        // value's code is longer than any safe placeholder's can be.
        let e = err(&[("t", b"~~~~~~~~~~~~")], &[]);
        assert!(e.contains("HPACK"), "{e}");
        assert!(hpack_possible(b"sk-live-0123456789abcdef"));
    }

    #[test]
    fn require_wire_takes_true_or_false_and_names_the_annotation_otherwise() {
        let data: &[(&str, &[u8])] = &[("t", b"0123456789")];
        let c = |ann: &[(&str, &str)]| check(&secret(data, ann)).unwrap().require_wire;
        assert!(!c(&[]));
        assert!(c(&[(ANN_REQUIRE_WIRE, "true")]));
        assert!(!c(&[(ANN_REQUIRE_WIRE, "false")]));
        for bad in ["yes", "True", "1", ""] {
            let e = err(data, &[(ANN_REQUIRE_WIRE, bad)]);
            assert!(
                e.contains(ANN_REQUIRE_WIRE) && e.contains(&format!("{bad:?}")),
                "{bad}: {e}"
            );
            assert!(!e.contains("0123456789"), "value leaked: {e}");
        }
    }

    #[test]
    fn good_secrets_pass_with_a_warning_when_unrestricted() {
        let c = check(&secret(&[("t", b"0123456789")], &[])).unwrap();
        assert_eq!(c.warnings.len(), 1);
        let c = check(&secret(
            &[("t", b"0123456789")],
            &[
                (ANN_HOSTS, "api.example.com,*.corp.example"),
                (ANN_PORT, "443"),
            ],
        ))
        .unwrap();
        assert!(c.warnings.is_empty());
        assert!(!c.rules.unrestricted());
    }
}
