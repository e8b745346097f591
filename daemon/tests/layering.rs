//! The daemon's folders stay layered and its modules free of import
//! cycles: `cmd` → {`k8s`, `node`} → `datapath` → `state`. Read from the
//! sources (test modules aside), so a new `use crate::…` that breaks the
//! order fails here, not in a reviewer's head.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn layer(folder: &str) -> u8 {
    match folder {
        "state" => 0,
        "datapath" => 1,
        "k8s" | "node" => 2,
        "cmd" => 3,
        other => panic!("daemon/src/{other} is in no layer: add it to this test"),
    }
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Module path → the modules of this crate it names (outside its tests).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&root, &mut files);
    let module_exists = |m: &str| {
        let rel = m.replace("::", "/");
        root.join(format!("{rel}.rs")).exists() || root.join(&rel).join("mod.rs").exists()
    };
    let mut g = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        let me = parts.join("::");
        let src = std::fs::read_to_string(&f).unwrap();
        let src = src.split("#[cfg(test)]").next().unwrap();
        let mut deps = BTreeSet::new();
        for (i, _) in src.match_indices("crate::") {
            let path: String = src[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_' || *c == ':')
                .collect();
            let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            if let Some(m) = (1..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|m| module_exists(m))
                && m != me
            {
                deps.insert(m);
            }
        }
        g.insert(me, deps);
    }
    g
}

#[test]
fn folders_depend_only_on_those_below_them() {
    let g = graph();
    assert!(g.len() > 20, "too few modules read: {g:?}");
    let mut bad = Vec::new();
    for (m, deps) in &g {
        let top = m.split("::").next().unwrap();
        for d in deps {
            let dtop = d.split("::").next().unwrap();
            if dtop != top && layer(dtop) >= layer(top) {
                bad.push(format!("{m} → {d}"));
            }
        }
    }
    assert!(bad.is_empty(), "imports against the layering: {bad:#?}");
}

#[test]
fn no_module_imports_itself_through_others() {
    let g = graph();
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if !done.insert(m.to_string()) {
            return None;
        }
        stack.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, d, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(c) = visit(&g, m, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", c.join(" → "));
        }
    }
}
