//! The standalone secrets file, its validation, and placeholder minting.
//!
//! Error messages name the secret and the rule, never the value: a value can
//! only reach the kernel map (in-place backend) or the agent's memory.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use kloak_bpf::{KEY_LEN, MAX_SECRET_LEN, MIN_SECRET_LEN, PREFIX, PREFIX_LEN};
use rand::Rng;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::datapath::rules::Rules;

/// Crockford base32: no I, L, O or U, so placeholders survive being read aloud
/// and never contain characters that need quoting in headers, URLs, JSON or shell.
pub const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("reading secrets file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secrets file {0} is empty")]
    Empty(PathBuf),
    #[error("secrets file {path} is not valid: {reason}")]
    Yaml { path: PathBuf, reason: String },
    #[error("secrets file {0} lists no secrets")]
    NoSecrets(PathBuf),
    #[error("secret #{index}: {rule}")]
    Unnamed { index: usize, rule: String },
    #[error("secret {name:?}: {rule}")]
    Rule { name: String, rule: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    secrets: Option<Vec<SecretSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SecretSpec {
    #[serde(default)]
    name: String,
    value: Option<String>,
    value_from: Option<ValueFrom>,
    env: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    port: Option<Ports>,
    #[serde(default)]
    require_wire: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Ports {
    One(i64),
    Many(Vec<i64>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValueFrom {
    env: Option<String>,
    file: Option<PathBuf>,
}

/// Bytes that must never be printed. Zeroed on drop.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(v: Vec<u8>) -> Self {
        SecretValue(Zeroizing::new(v))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes redacted>)", self.0.len())
    }
}

#[derive(Debug, Clone)]
pub struct Secret {
    /// Stable small id carried by kernel events.
    pub id: u32,
    pub name: String,
    pub env: String,
    pub value: SecretValue,
    pub placeholder: String,
    /// Where the value may go; empty means anywhere.
    pub rules: Rules,
    /// The placeholder's HPACK Huffman code is as long as the value's, so it
    /// can be swapped inside an HTTP/2 header. False when no safe placeholder
    /// can match the value's code length.
    pub hpack_safe: bool,
    /// Only the wire backend may serve it: where the wire cannot, its
    /// placeholder goes out unchanged rather than being paused and patched
    /// into the application's memory.
    pub require_wire: bool,
}

impl Secret {
    /// A secret as the data path holds it, from a placeholder minted earlier
    /// (the controller's shadows, the state file). Whether it can be swapped
    /// inside an HPACK header follows from the two Huffman lengths.
    pub fn new(
        id: u32,
        name: String,
        value: SecretValue,
        placeholder: String,
        rules: Rules,
    ) -> Secret {
        let hpack_safe = crate::datapath::hpack::huffman_bits(placeholder.as_bytes())
            == crate::datapath::hpack::huffman_bits(value.expose());
        Secret {
            id,
            name,
            env: String::new(),
            value,
            placeholder,
            rules,
            hpack_safe,
            require_wire: false,
        }
    }

    /// The same secret, served by the wire backend only (`yes`) or not.
    pub fn with_require_wire(mut self, yes: bool) -> Secret {
        self.require_wire = yes;
        self
    }
}

/// Reads and validates a secrets file, then mints a placeholder per secret.
/// Any error stops everything: the command must not run half configured.
pub fn load(path: &Path) -> Result<Vec<Secret>, SecretsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, &|k| std::env::var_os(k))
}

fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<Vec<Secret>, SecretsError> {
    if text.trim().is_empty() {
        return Err(SecretsError::Empty(path.to_path_buf()));
    }
    let spec: FileSpec = serde_yaml_ng::from_str(text).map_err(|e| SecretsError::Yaml {
        path: path.to_path_buf(),
        reason: redact_quoted(&e.to_string()),
    })?;
    let specs = spec.secrets.unwrap_or_default();
    if specs.is_empty() {
        return Err(SecretsError::NoSecrets(path.to_path_buf()));
    }

    let base = path.parent().unwrap_or(Path::new("."));
    let mut names = HashSet::new();
    let mut envs = HashMap::new();
    let mut out = Vec::with_capacity(specs.len());
    for (index, s) in specs.into_iter().enumerate() {
        if s.name.trim().is_empty() {
            return Err(SecretsError::Unnamed {
                index,
                rule: "every secret needs a non-empty name".into(),
            });
        }
        let rule = |rule: String| SecretsError::Rule {
            name: s.name.clone(),
            rule,
        };
        if !names.insert(s.name.clone()) {
            return Err(rule(
                "the name is used by another secret in this file".into(),
            ));
        }
        let var = s.env.clone().ok_or_else(|| {
            rule("env is required: the variable that receives the placeholder".into())
        })?;
        if !valid_env_name(&var) {
            return Err(rule(format!(
                "env {var:?} is not a valid environment variable name"
            )));
        }
        if let Some(other) = envs.insert(var.clone(), s.name.clone()) {
            return Err(rule(format!(
                "env {var} is already given to secret {other:?}"
            )));
        }
        let value = match (&s.value, &s.value_from) {
            (Some(_), Some(_)) => {
                return Err(rule("give either value or valueFrom, not both".into()));
            }
            (None, None) => return Err(rule("needs value or valueFrom".into())),
            (Some(v), None) => v.as_bytes().to_vec(),
            (None, Some(from)) => match (&from.env, &from.file) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(rule("valueFrom takes exactly one of env or file".into()));
                }
                (Some(k), None) => env(k)
                    .ok_or_else(|| rule(format!("valueFrom.env names {k}, which is not set")))?
                    .into_encoded_bytes(),
                (None, Some(f)) => {
                    let p = if f.is_absolute() {
                        f.clone()
                    } else {
                        base.join(f)
                    };
                    let mut v = std::fs::read(&p)
                        .map_err(|e| rule(format!("valueFrom.file {}: {e}", p.display())))?;
                    // Files written by editors and `echo` end in a newline that is not part of the secret.
                    if v.last() == Some(&b'\n') {
                        v.pop();
                        if v.last() == Some(&b'\r') {
                            v.pop();
                        }
                    }
                    v
                }
            },
        };
        let value = SecretValue::new(value);
        if value.len() < MIN_SECRET_LEN {
            return Err(rule(format!(
                "the value is {} bytes; the minimum is {MIN_SECRET_LEN}, since the placeholder is as long as the value and starts with \"kloak:\"",
                value.len()
            )));
        }
        if value.len() > MAX_SECRET_LEN {
            return Err(rule(format!(
                "the value is {} bytes; the maximum is {MAX_SECRET_LEN}, what one BPF map entry holds",
                value.len()
            )));
        }
        let ports = match s.port {
            None => Vec::new(),
            Some(Ports::One(p)) => vec![p],
            Some(Ports::Many(ps)) => ps,
        };
        let ports = ports
            .into_iter()
            .map(|p| {
                u16::try_from(p)
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| rule(format!("port {p} is outside 1-65535")))
            })
            .collect::<Result<Vec<u16>, _>>()?;
        let rules = Rules::parse(&s.hosts, &ports).map_err(rule)?;
        out.push(Secret {
            id: index as u32 + 1,
            name: s.name,
            env: var,
            value,
            placeholder: String::new(),
            rules,
            hpack_safe: false,
            require_wire: s.require_wire,
        });
    }
    let mut minted = Minted::default();
    for s in &mut out {
        let (p, hpack_safe) = minted.mint_for(s.value.expose());
        s.placeholder = p;
        s.hpack_safe = hpack_safe;
    }
    Ok(out)
}

fn valid_env_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
}

/// serde's messages quote the offending scalar, which may be a secret typed
/// into the wrong field. Keep the position and the rule, drop the quoted text.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut in_quote = false;
    for c in msg.chars() {
        if c == '"' {
            if !in_quote {
                out.push_str("\"…");
            } else {
                out.push('"');
            }
            in_quote = !in_quote;
        } else if !in_quote {
            out.push(c);
        }
    }
    out
}

/// Placeholders minted so far. A new one never shares a map key with, nor is
/// a prefix of, an earlier one, so the kernel's match is unambiguous.
#[derive(Default)]
pub struct Minted {
    keys: HashSet<[u8; KEY_LEN]>,
    /// Ordered, so prefix checks are a range lookup rather than a scan:
    /// a controller checks thousands of placeholders on every pass.
    all: std::collections::BTreeSet<Vec<u8>>,
}

impl Minted {
    /// A placeholder for `value`: as long as it, and where possible with an
    /// HPACK Huffman code exactly as long as the value's (the bool says so),
    /// using characters beyond Crockford's where that takes them.
    pub fn mint_for(&mut self, value: &[u8]) -> (String, bool) {
        let target = crate::datapath::hpack::huffman_bits(value);
        loop {
            let mut p = self.random(value.len());
            let hpack_safe = crate::datapath::hpack::tune(&mut p[PREFIX_LEN..], target).is_some();
            if self.accept(&p) {
                return (String::from_utf8(p).expect("ASCII"), hpack_safe);
            }
        }
    }

    fn random(&self, len: usize) -> Vec<u8> {
        assert!(
            (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&len),
            "validated before minting"
        );
        let mut rng = rand::rng();
        let mut p = PREFIX.to_vec();
        p.extend((PREFIX_LEN..len).map(|_| CROCKFORD[rng.random_range(0..CROCKFORD.len())]));
        p
    }

    /// Whether `p` clashes with a registered placeholder: same map key, or
    /// one a prefix of the other.
    pub fn clashes(&self, p: &[u8]) -> bool {
        let Some(key) = kloak_bpf::placeholder_key(p) else {
            return true;
        };
        self.keys.contains(&key)
            || self
                .all
                .range(p.to_vec()..)
                .next()
                .is_some_and(|o| o.starts_with(p))
            || (MIN_SECRET_LEN..p.len()).any(|l| self.all.contains(&p[..l]))
    }

    /// Registers an existing placeholder; false if it clashes.
    pub fn accept(&mut self, p: &[u8]) -> bool {
        if self.clashes(p) {
            return false;
        }
        self.keys
            .insert(kloak_bpf::placeholder_key(p).expect("checked by clashes"));
        self.all.insert(p.to_vec());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(y: &str) -> Result<Vec<Secret>, SecretsError> {
        parse(Path::new("/tmp/s.yaml"), y, &|k| {
            (k == "FROM_ENV").then(|| "env-value-123".into())
        })
    }

    #[test]
    fn placeholder_has_prefix_alphabet_and_length() {
        let s = parse_str("secrets:\n  - name: a\n    value: \"0123456789abcdef\"\n    env: A\n")
            .unwrap();
        let p = &s[0].placeholder;
        assert_eq!(p.len(), 16);
        assert!(p.starts_with("kloak:"));
        assert!(
            p[6..]
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert!(s[0].hpack_safe);
        assert_eq!(
            crate::datapath::hpack::huffman_bits(p.as_bytes()),
            crate::datapath::hpack::huffman_bits(b"0123456789abcdef")
        );
    }

    #[test]
    fn value_from_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "file-value-456\n").unwrap();
        let y = format!(
            "secrets:\n  - name: a\n    valueFrom: {{env: FROM_ENV}}\n    env: A\n  - name: b\n    valueFrom: {{file: {}}}\n    env: B\n",
            dir.path().join("tok").display()
        );
        let s = parse_str(&y).unwrap();
        assert_eq!(s[0].value.expose(), b"env-value-123");
        assert_eq!(s[1].value.expose(), b"file-value-456");
    }

    #[test]
    fn errors_name_the_secret_and_rule_but_not_the_value() {
        let cases = [
            (
                "secrets:\n  - name: short\n    value: \"abc\"\n    env: A\n",
                "short",
                "minimum is 8",
            ),
            (
                &format!(
                    "secrets:\n  - name: long\n    value: \"{}\"\n    env: A\n",
                    "x".repeat(129)
                ),
                "long",
                "maximum is 128",
            ),
            (
                "secrets:\n  - name: d\n    value: \"aaaaaaaaaa\"\n    env: A\n  - name: d\n    value: \"bbbbbbbbbb\"\n    env: B\n",
                "\"d\"",
                "name is used",
            ),
            (
                "secrets:\n  - name: e\n    value: \"aaaaaaaaaa\"\n    env: 1X\n",
                "\"e\"",
                "valid environment",
            ),
            (
                "secrets:\n  - name: p\n    value: \"aaaaaaaaaa\"\n    env: A\n    port: 70000\n",
                "\"p\"",
                "outside",
            ),
            (
                "secrets:\n  - name: m\n    valueFrom: {env: NOPE}\n    env: A\n",
                "\"m\"",
                "not set",
            ),
        ];
        for (y, name, rule) in cases {
            let e = parse_str(y).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
            assert!(e.contains(rule), "{e}");
            assert!(
                !e.contains("aaaaaaaaaa") && !e.contains("xxxxxxxxx"),
                "value leaked: {e}"
            );
        }
    }

    #[test]
    fn empty_and_bad_yaml_are_named() {
        assert!(matches!(parse_str("  \n"), Err(SecretsError::Empty(_))));
        assert!(matches!(
            parse_str("secrets: []"),
            Err(SecretsError::NoSecrets(_))
        ));
        let e = parse_str("secrets:\n  - name: x\n    value: \"super-secret-value\"\n    env: A\n    port: \"super-secret-value\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid"), "{e}");
        assert!(!e.contains("super-secret-value"), "value leaked: {e}");
    }

    #[test]
    fn minted_placeholders_never_clash_even_when_short() {
        let mut m = Minted::default();
        let ps: Vec<String> = (0..600)
            .map(|i| m.mint_for(&vec![b'v'; 8 + i % 3]).0)
            .collect();
        for (i, a) in ps.iter().enumerate() {
            for b in &ps[i + 1..] {
                assert!(!a.starts_with(b.as_str()) && !b.starts_with(a.as_str()));
            }
        }
    }

    #[test]
    fn hosts_and_one_or_many_ports_become_rules() {
        let s = parse_str(
            "secrets:\n  - name: a\n    value: \"0123456789\"\n    env: A\n    hosts: [allowed.test, \"*.svc.test\", 10.0.0.0/8]\n    port: 443\n  - name: b\n    value: \"0123456789\"\n    env: B\n    port: [443, 8443]\n",
        )
        .unwrap();
        assert!(s[0].rules.allows("10.1.2.3:443".parse().unwrap(), &[]));
        assert!(!s[0].rules.allows("10.1.2.3:8443".parse().unwrap(), &[]));
        assert!(s[1].rules.allows("1.1.1.1:8443".parse().unwrap(), &[]));
        for (y, rule) in [
            ("hosts: [\"bad host\"]", "not a DNS name"),
            ("port: [443, 0]", "outside 1-65535"),
            ("port: 70000", "outside 1-65535"),
        ] {
            let e = parse_str(&format!(
                "secrets:\n  - name: r\n    value: \"aaaaaaaaaa\"\n    env: A\n    {y}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("\"r\"") && e.contains(rule), "{e}");
        }
    }

    #[test]
    fn require_wire_is_opt_in_and_must_be_a_boolean() {
        let s = parse_str(
            "secrets:\n  - name: a\n    value: \"0123456789\"\n    env: A\n    requireWire: true\n  - name: b\n    value: \"0123456789\"\n    env: B\n  - name: c\n    value: \"0123456789\"\n    env: C\n    requireWire: false\n",
        )
        .unwrap();
        let flags: Vec<bool> = s.iter().map(|s| s.require_wire).collect();
        assert_eq!(flags, [true, false, false]);
        for bad in ["\"yes\"", "1", "[true]"] {
            let e = parse_str(&format!(
                "secrets:\n  - name: r\n    value: \"super-secret-value\"\n    env: A\n    requireWire: {bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("not valid") && e.contains("requireWire"),
                "{bad}: {e}"
            );
            assert!(!e.contains("super-secret-value"), "value leaked: {e}");
        }
        // Spelled as the file's other keys are: a snake_case key is refused.
        let e = parse_str(
            "secrets:\n  - name: r\n    value: \"0123456789\"\n    env: A\n    require_wire: true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("require_wire"), "{e}");
    }

    #[test]
    fn debug_output_redacts_values() {
        let v = SecretValue::new(b"hunter2hunter2".to_vec());
        assert!(!format!("{v:?}").contains("hunter2"));
    }
}
