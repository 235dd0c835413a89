//! The fuzz targets: every parser that reads what a client, an operator or an identity
//! provider hands zerodrop, each as one function over arbitrary bytes that panics only when
//! an invariant breaks.
//!
//! Two things run them. `fuzz/` (outside the workspace, libFuzzer through `cargo fuzz`) calls
//! each from a `fuzz_target!` for the long, coverage-guided runs (`fuzz/run-all.sh`,
//! figures in docs/reliability.md). This crate's own test (`tests/smoke.rs`) runs each over
//! its seed corpus (`fuzz/seeds/<target>/`) and a bounded number of deterministic mutations
//! ([`mutate`]), so CI keeps the targets compiling and their invariants true.
//!
//! Every target asserts more than "does not panic": what parses re-encodes to something that
//! parses to the same value, what verifies re-signs to a token that verifies to the same
//! claims, what a config file sets passes `validate`, what the depth limit accepts every
//! client can read. A panic in the code under test is a bug there (it must answer with a
//! typed error); a failed assertion here is a broken invariant.
//!
//! Must not: be a dependency of anything that ships (it is a test tool, like the testkit).

pub mod mutate;
pub mod seeds;
pub mod targets;

/// A fuzz target: its name (the file in `fuzz/fuzz_targets/` and the seed directory) and
/// its body.
#[derive(Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target (`fuzz/fuzz_targets/<name>.rs` calls [`targets`]`::<name>`).
pub const TARGETS: &[Target] = &[
    Target {
        name: "client_frame",
        run: targets::client_frame,
    },
    Target {
        name: "client_binary_frame",
        run: targets::client_binary_frame,
    },
    Target {
        name: "resume_token",
        run: targets::resume_token,
    },
    Target {
        name: "connect_token",
        run: targets::connect_token,
    },
    Target {
        name: "jwks",
        run: targets::jwks,
    },
    Target {
        name: "last_event_id",
        run: targets::last_event_id,
    },
    Target {
        name: "config_toml",
        run: targets::config_toml,
    },
    Target {
        name: "publish_body",
        run: targets::publish_body,
    },
];
