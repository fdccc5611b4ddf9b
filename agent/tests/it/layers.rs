//! The agent's modules form a one-way stack of layers (the table is mirrored in a comment in
//! `agent/src/lib.rs`): a module may use only modules of lower layers, never its own layer or
//! above. This test reads every file under `agent/src`, finds each reference to another
//! top-level module (`crate::x` in `use` lines, `use crate::{a, b::c}` groups and paths in
//! code; comments and string literals are ignored; `super::` chains that climb out to the
//! crate root count too), and fails naming the file, the line, the reference and both layers.
//! A new top-level module must be added to [`LAYERS`] before it can be used.

use std::path::{Path, PathBuf};

/// Lowest layer first. The one authoritative copy of the table.
const LAYERS: &[&[&str]] = &[
    // Host TLS files (loopback, key permissions, PEM, expiry) and systemd notifications: no
    // crate imports at all.
    &["tls_files", "notify", "profile"],
    // Counters; the raw config file and every validated `*Settings` (TLS included).
    &["metrics", "config"],
    &["source"],
    &["queue"],
    &["tls"],
    &["inference"],
    &["ota"],
    &["uplink"],
    &["writer"],
    &["runtime"],
    // The command line (main.rs's body, shared with the fleet's demo build).
    &["cli"],
];

/// Files that are not a layer of their own: the library root declares the modules, and the
/// binary (`main.rs`, its own crate) sits above all of them.
const ROOTS: &[&str] = &["lib.rs", "main.rs"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// One reference from a file to a top-level module.
#[derive(Debug, PartialEq)]
struct Reference {
    line: usize,
    /// As written, e.g. `crate::tls` or `crate::{.., tls, ..}`.
    text: String,
    module: String,
}

#[test]
fn modules_only_import_from_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 10,
        "found only {} files under {}",
        files.len(),
        src.display()
    );
    let mut violations = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let text = std::fs::read_to_string(file).expect("read source");
        violations.extend(check_file(rel, &text));
    }
    assert!(
        violations.is_empty(),
        "imports against the layer table:\n{}",
        violations.join("\n")
    );
}

/// The violations in one file, `rel` being its path under `agent/src`.
fn check_file(rel: &Path, text: &str) -> Vec<String> {
    let shown = Path::new("agent/src").join(rel).display().to_string();
    let parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    if parts.len() == 1 && ROOTS.contains(&parts[0].as_str()) {
        return Vec::new();
    }
    let own = parts[0].trim_end_matches(".rs").to_string();
    let Some(own_layer) = layer_of(&own) else {
        return vec![format!(
            "{shown}: the module `{own}` is not in the layer table: add it to LAYERS in agent/tests/it/layers.rs (and the comment in agent/src/lib.rs)"
        )];
    };
    let mut out = Vec::new();
    for r in references(&code_only(text), module_depth(&parts)) {
        if r.module == own {
            continue;
        }
        match layer_of(&r.module) {
            None => out.push(format!(
                "{shown}:{}: `{}` names `{}`, which is not in the layer table",
                r.line, r.text, r.module
            )),
            Some(l) if l >= own_layer => out.push(format!(
                "{shown}:{}: `{}`: `{own}` (layer {own_layer}) imports `{}` (layer {l}); a module may only import from layers below its own: move the item down, or pass it in",
                r.line, r.text, r.module
            )),
            Some(_) => {}
        }
    }
    out
}

/// The scanner itself: a test that never fails guards nothing.
#[test]
fn the_scanner_finds_every_form_of_reference() {
    let text = r##"
use crate::config::Settings; // crate::ota in a comment
use crate::{metrics::{self, Metrics}, queue, tls::x};
/* block crate::uplink /* nested crate::writer */ still comment */
fn f() -> u64 {
    let s = "crate::runtime in a string";
    let r = r#"crate::runtime in a raw "string""#;
    let c = '"';
    let l: &'static str = "x";
    crate ::source::now_us() + crate::inference::X
}
/// crate::ota in a doc comment
fn g() { super::super::writer::run(); super::Inner; }
"##;
    let found: Vec<(usize, String)> = references(&code_only(text), 2)
        .into_iter()
        .map(|r| (r.line, r.module))
        .collect();
    let want: Vec<(usize, String)> = [
        (2, "config"),
        (3, "metrics"),
        (3, "queue"),
        (3, "tls"),
        (10, "source"),
        (10, "inference"),
        (13, "writer"),
    ]
    .into_iter()
    .map(|(l, m)| (l, m.to_string()))
    .collect();
    assert_eq!(found, want);
}

/// An upward import, a same-layer import and an unknown module are reported; a downward
/// import is not.
#[test]
fn imports_against_the_table_are_refused() {
    let v = check_file(
        Path::new("config.rs"),
        "use crate::tls_files::is_loopback;\nfn f() { crate::runtime::run(); }\nuse crate::metrics::Metrics;\n",
    );
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(
        v[0].starts_with("agent/src/config.rs:2: `crate::runtime`: `config` (layer 1) imports `runtime` (layer 9)"),
        "{}",
        v[0]
    );
    assert!(
        v[1].contains("`config` (layer 1) imports `metrics` (layer 1)"),
        "{}",
        v[1]
    );
    let v = check_file(
        Path::new("queue/read.rs"),
        "use super::super::writer::run;\n",
    );
    assert!(
        v[0].contains("`queue` (layer 3) imports `writer` (layer 8)"),
        "{v:?}"
    );
    let v = check_file(Path::new("gadget.rs"), "");
    assert!(v[0].contains("`gadget` is not in the layer table"), "{v:?}");
    assert!(
        check_file(
            Path::new("runtime.rs"),
            "use crate::{config, queue::Queue};"
        )
        .is_empty()
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// How many `super::` steps lead from a file's module to the crate root: `tls.rs` and
/// `queue/mod.rs` are one module deep, `queue/read.rs` two.
fn module_depth(parts: &[String]) -> usize {
    match parts.last().map(String::as_str) {
        Some("mod.rs") => parts.len() - 1,
        _ => parts.len(),
    }
}

/// The source with comments and the contents of string and character literals blanked out
/// (newlines kept, so line numbers stay right).
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
            && matches!(c.get(i + 1), Some('"') | Some('#'))
        {
            // A raw string r"..." / r#"..."#, or an identifier starting with r.
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            out.push(' ');
            i += 1;
            while i <= j {
                out.push(' ');
                i += 1;
            }
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' {
            // A character literal ('x', '\n', '\''), or a lifetime ('a), which stays.
            let end = if c.get(i + 1) == Some(&'\\') {
                (i + 2..c.len()).find(|&k| c[k] == '\'' && k > i + 2)
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    for _ in i..=e {
                        out.push(' ');
                    }
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Every top-level module named through `crate::` (or `super::` chains reaching the root from a
/// file `depth` modules deep), in order.
fn references(code: &str, depth: usize) -> Vec<Reference> {
    let c: Vec<char> = code.chars().collect();
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let line_at = |pos: usize| c[..pos].iter().filter(|&&ch| ch == '\n').count() + 1;
    let skip_ws = |mut k: usize| {
        while k < c.len() && c[k].is_whitespace() {
            k += 1;
        }
        k
    };
    let word_at = |k: usize| -> String { c[k..].iter().take_while(|&&ch| ident(ch)).collect() };
    let path_sep = |k: usize| -> Option<usize> {
        let k = skip_ws(k);
        (c.get(k) == Some(&':') && c.get(k + 1) == Some(&':')).then(|| skip_ws(k + 2))
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if !ident(c[i]) || (i > 0 && (ident(c[i - 1]) || c[i - 1] == '$')) {
            i += 1;
            continue;
        }
        let word = word_at(i);
        let start = i;
        i += word.len();
        // Where the path below the crate root continues, if this word starts one, and the
        // path's prefix as written.
        let (rest, prefix) = match word.as_str() {
            "crate" => (path_sep(i), "crate".to_string()),
            "super" => {
                let mut steps = 1;
                let mut k = path_sep(i);
                while let Some(p) = k {
                    if word_at(p) != "super" {
                        break;
                    }
                    steps += 1;
                    i = p + 5;
                    k = path_sep(i);
                }
                let prefix = vec!["super"; steps].join("::");
                (if steps == depth { k } else { None }, prefix)
            }
            _ => (None, String::new()),
        };
        let Some(p) = rest else { continue };
        let line = line_at(start);
        if c.get(p) == Some(&'{') {
            // A group: the first segment of each comma-separated item at depth one.
            let mut k = p + 1;
            let mut level = 1;
            let mut expect_item = true;
            while k < c.len() && level > 0 {
                match c[k] {
                    '{' => level += 1,
                    '}' => level -= 1,
                    ',' if level == 1 => expect_item = true,
                    ch if ident(ch) && level == 1 && expect_item => {
                        let m = word_at(k);
                        k += m.len();
                        expect_item = false;
                        if m != "self" {
                            out.push(Reference {
                                line: line_at(k),
                                text: format!("{prefix}::{{.., {m}, ..}}"),
                                module: m,
                            });
                        }
                        continue;
                    }
                    _ => {}
                }
                k += 1;
            }
            i = k;
        } else if c.get(p).is_some_and(|&ch| ident(ch)) {
            let m = word_at(p);
            out.push(Reference {
                line,
                text: format!("{prefix}::{m}"),
                module: m,
            });
            i = p;
        }
    }
    out
}
