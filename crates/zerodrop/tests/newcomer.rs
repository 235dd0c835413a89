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
    ("npm", "npm"),
    ("tsc", "node-typescript"),
    ("openssl", "openssl"),
    ("ip", "iproute2"),
    ("nft", "nftables"),
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

/// The body of the README's first fenced block of `lang`.
fn readme_block(lang: &str) -> String {
    let readme = read("README.md");
    let fence = format!("```{lang}\n");
    let start = readme.find(&fence).map(|i| i + fence.len());
    let start = start.unwrap_or_else(|| panic!("README has a {lang} block"));
    let end = start + readme[start..].find("```\n").expect("the block ends");
    readme[start..end].to_string()
}

/// The README's Rust snippet is a whole program that compiles (it is the `readme` example of
/// the SDK, built by `cargo test`), starts at the first event like the browser snippet, and
/// comes with the dependency lines it needs.
#[test]
fn the_readme_rust_snippet_is_the_compiled_example_with_its_dependencies() {
    let snippet = readme_block("rust");
    let example = read("crates/zerodrop-client/examples/readme.rs");
    assert!(
        example.ends_with(&snippet),
        "crates/zerodrop-client/examples/readme.rs must end with the README's Rust snippet"
    );
    assert!(snippet.contains("after: Some(0)"), "{snippet}");
    assert!(readme_block("js").contains("{ after: 0 }"));
    let deps = readme_block("toml");
    let sdk = deps
        .lines()
        .find(|l| l.starts_with("zerodrop-client"))
        .expect("a zerodrop-client dependency line");
    assert!(sdk.contains("crates/zerodrop-client\""), "{sdk}");
    let tokio = deps
        .lines()
        .find(|l| l.starts_with("tokio"))
        .expect("a tokio dependency line");
    // `#[tokio::main]` needs both.
    assert!(
        tokio.contains("\"rt-multi-thread\"") && tokio.contains("\"macros\""),
        "{tokio}"
    );
    assert!(snippet.contains("#[tokio::main]"));
}

/// The docs type a bare `zerodrop …` only after saying how to put it on the PATH.
#[test]
fn bare_zerodrop_commands_come_after_the_install_step() {
    const SUBCOMMANDS: &[&str] = &[
        "serve",
        "probe",
        "drill",
        "gate",
        "canary",
        "gameday",
        "dashboard",
        "capacity",
        "snapshot",
        "verify",
        "check-config",
        "secrets",
        "token",
        "healthcheck",
    ];
    let install = "cargo install --path crates/zerodrop --locked";
    for doc in ["README.md", "docs/operations.md", "docs/deployment.md"] {
        let text = read(doc);
        let first_bare = SUBCOMMANDS
            .iter()
            .filter_map(|c| text.find(&format!("zerodrop {c}")))
            .min()
            .unwrap_or(usize::MAX);
        let installed = text.find(install);
        assert!(
            installed.is_some_and(|i| i < first_bare),
            "{doc}: `{install}` comes before the first bare `zerodrop` command: {:?}",
            text.get(first_bare..first_bare + 40)
        );
    }
}
