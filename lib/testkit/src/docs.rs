//! Documentation generated from the code: a section of a Markdown file between
//! `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->` that a test compares
//! with what the code produces (the metric tables of `docs/operations.md` and `docs/fleet.md`),
//! so the docs cannot drift from the code.
//!
//! A difference fails the test and prints the section to paste; with `EMBER_UPDATE_DOCS=1`
//! the test rewrites the file instead (and passes), like `insta`'s accept step.

use std::path::Path;

/// The environment variable that makes [`check_generated`] rewrite the file.
pub const UPDATE_ENV: &str = "EMBER_UPDATE_DOCS";

/// Panics unless the section `name` of the Markdown file at `path` is exactly `content`
/// (rewrites it under `EMBER_UPDATE_DOCS=1`). Missing markers fail too: the section is the
/// contract, not an optional extra.
pub fn check_generated(path: impl AsRef<Path>, name: &str, content: &str) {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let begin = format!("<!-- BEGIN generated: {name} -->\n");
    let end = format!("<!-- END generated: {name} -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        panic!(
            "{} has no section between `{}` and `{end}`; add the two markers where the \
             generated text belongs:\n{content}",
            path.display(),
            begin.trim_end()
        );
    };
    let start = b + begin.len();
    assert!(
        start <= e,
        "{}: `{end}` comes before its BEGIN",
        path.display()
    );
    if &text[start..e] == content {
        return;
    }
    if std::env::var_os(UPDATE_ENV).is_some_and(|v| v == "1") {
        let updated = format!("{}{content}{}", &text[..start], &text[e..]);
        std::fs::write(path, updated)
            .unwrap_or_else(|err| panic!("cannot rewrite {}: {err}", path.display()));
        return;
    }
    panic!(
        "{} is out of date: its section `{name}` should read (rerun with {UPDATE_ENV}=1 to \
         rewrite it):\n{content}",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_section_passes_and_a_stale_or_missing_one_fails_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.md");
        let doc = "intro\n<!-- BEGIN generated: t -->\nold\n<!-- END generated: t -->\nrest\n";
        std::fs::write(&path, doc).unwrap();
        check_generated(&path, "t", "old\n");
        let stale = std::panic::catch_unwind(|| check_generated(&path, "t", "new\n"));
        let msg = *stale.unwrap_err().downcast::<String>().unwrap();
        assert!(
            msg.contains("out of date") && msg.contains("new\n"),
            "{msg}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), doc);
        let missing = std::panic::catch_unwind(|| check_generated(&path, "other", "x\n"));
        assert!(missing.is_err());
    }
}
