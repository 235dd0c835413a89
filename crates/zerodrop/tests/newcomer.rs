//! What a newcomer on a fresh machine relies on: the README's two commands, `.ci/run` calling
//! exactly the second, every tool the tests start being installed by `.ci/setup`, and the
//! README's walkthrough needing nothing but the binary and curl.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The fenced commands of the README's "Two commands" section, in order.
fn two_commands() -> Vec<String> {
    let readme = read("README.md");
    let start = readme
        .find("## Two commands")
        .expect("a Two commands section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut out = Vec::new();
    let mut inside = false;
    for line in section.lines() {
        if line.starts_with("```") {
            inside = !inside;
        } else if inside && !line.trim().is_empty() {
            out.push(line.trim().to_string());
        }
    }
    out
}

fn commands(script: &str) -> Vec<String> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn the_readme_names_two_commands_and_ci_runs_exactly_the_second() {
    assert_eq!(
        two_commands(),
        vec!["cargo run --release -- serve", "./test"],
        "README's two commands"
    );
    let ci = commands(&read(".ci/run"));
    assert_eq!(ci.last().map(String::as_str), Some("./test"), "{ci:?}");
    let script = repo().join("test");
    let mode = std::fs::metadata(&script)
        .expect("./test")
        .permissions()
        .mode();
    assert!(mode & 0o111 != 0, "./test is executable");
    let steps = commands(&read("test"));
    assert!(
        steps.iter().any(|l| l == "./.ci/setup"),
        "./test installs what is missing first: {steps:?}"
    );
    assert_eq!(
        steps.last().map(String::as_str),
        Some(r#"exec cargo test --workspace --locked "$@""#)
    );
    let readme = read("README.md");
    assert!(
        readme.contains("rustup") && readme.contains("C compiler"),
        "the toolchain prerequisite is named"
    );
}

#[test]
fn the_walkthrough_needs_no_python() {
    let readme = read("README.md");
    assert!(!readme.contains("python"), "README needs python somewhere");
    assert!(readme.contains("KEY=$(cargo run --release -q -- secrets show api-key)"));
}

/// Every external program a test runs, and the Debian package `.ci/setup` installs it from.
const TOOLS: &[(&str, &str)] = &[
    ("promtool", "prometheus"),
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-server"),
    ("redis-benchmark", "redis-server"),
    ("nginx", "nginx"),
    ("systemd-analyze", "systemd"),
    ("node", "nodejs"),
    ("tsc", "node-typescript"),
    ("openssl", "openssl"),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_tool_the_tests_run_is_installed_by_setup() {
    let setup = read(".ci/setup");
    let mut files = Vec::new();
    sources(&repo().join("crates"), &mut files);
    let mut seen = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for (i, _) in text.match_indices("Command::new(\"") {
            let rest = &text[i + "Command::new(\"".len()..];
            let tool = &rest[..rest.find('"').unwrap_or(0)];
            if tool.is_empty() || tool.starts_with('/') || tool == "sh" || tool == "bash" {
                continue;
            }
            let Some((_, package)) = TOOLS.iter().find(|(t, _)| *t == tool) else {
                panic!(
                    "{} runs `{tool}`: install it in .ci/setup and list it here",
                    f.display()
                );
            };
            assert!(
                setup.contains(&format!("command -v {tool}"))
                    || setup.contains(&format!("command -v {}", package)),
                ".ci/setup checks for {tool}"
            );
            assert!(setup.contains(package), ".ci/setup installs {package}");
            seen.push(tool.to_string());
        }
    }
    assert!(seen.iter().any(|t| t == "redis-server"), "{seen:?}");
    assert!(
        setup.contains("chromium"),
        "the dashboard test needs chromium"
    );
}
