//! Every fuzz target over its committed seeds and a few thousand deterministic mutations of
//! them: the targets' code stays valid, and their invariants hold on more than the seeds.
//! The long, coverage-guided runs are `fuzz/run-all.sh` (docs/reliability.md).

use zerodrop_fuzzing::{TARGETS, mutate, seeds};

/// Mutated inputs per target: seconds in a debug build, all targets together.
const MUTATIONS: usize = 3_000;

#[test]
fn every_target_holds_its_invariants_on_its_seeds_and_their_mutations() {
    for (i, t) in TARGETS.iter().enumerate() {
        let corpus = seeds::read(t.name)
            .unwrap_or_else(|e| panic!("fuzz/seeds/{}: {e} (write_seeds makes them)", t.name));
        assert!(!corpus.is_empty(), "no seeds for {}", t.name);
        let ran = mutate::run(t.run, &corpus, MUTATIONS, 0x5eed + i as u64);
        assert_eq!(ran, corpus.len() + MUTATIONS);
    }
}

/// Inputs on which a target once failed, by target: each stays a test.
const FINDINGS: &[(&str, &[u8])] = &[
    // A number beyond a double was stored, and no client could read it back (now refused
    // by `check_data`: INVALID_REQUEST).
    ("publish_body", b"{\"data\": 1e3092}"),
    // A lone surrogate escape in a key is JSON that serde_json refuses to read (JavaScript
    // reads it): stored as sent, an exception the target's invariant now names.
    ("publish_body", br#"{"data":{"deep\ud800":[{"x":"y"}]}}"#),
    ("publish_body", br#"{"data":["\udc00", "\ud800\u0041"]}"#),
    // A key given twice: the parsed object keeps the last value, so the text nests deeper
    // than the value (an invariant of the target that was too strict; refused as data).
    ("publish_body", br#"{"data": { "":{},"":0}}"#),
    // A `ping` without `t` is written `"t":null`; both echo `null` (an invariant of the
    // target that was too strict, kept as a test of the echo).
    ("client_frame", b"{\"type\":\"ping\"}"),
];

#[test]
fn past_findings_stay_fixed() {
    for (name, input) in FINDINGS {
        let t = TARGETS.iter().find(|t| t.name == *name).expect("a target");
        (t.run)(input);
    }
    let refused = zerodrop_server::app::check_data("1e3092", 65_536).unwrap_err();
    assert_eq!(refused.code, zerodrop_core::ErrorCode::InvalidRequest);
}

#[test]
fn the_committed_seeds_are_the_generated_ones() {
    for (name, generated) in seeds::generate() {
        let mut on_disk = seeds::read(name).unwrap_or_default();
        let mut generated = generated;
        on_disk.sort();
        generated.sort();
        generated.dedup();
        assert_eq!(
            on_disk, generated,
            "fuzz/seeds/{name} differs from seeds::generate(): run \
             `cargo test -p zerodrop-fuzzing -- --ignored write_seeds`"
        );
    }
}

#[test]
fn every_target_has_its_seeds() {
    let generated: Vec<&str> = seeds::generate().iter().map(|(n, _)| *n).collect();
    let targets: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(generated, targets);
}

/// Writes `fuzz/seeds/<target>/<n>` from [`seeds::generate`] (replacing what is there).
#[test]
#[ignore = "writes the committed seed corpus"]
fn write_seeds() {
    for (name, mut corpus) in seeds::generate() {
        corpus.sort();
        corpus.dedup();
        let dir = seeds::dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("seed dir");
        for (i, s) in corpus.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("seed file");
        }
    }
}

/// The public entries the targets call, on inputs whose answers are known.
#[test]
fn the_entries_the_targets_call_answer_as_documented() {
    use axum::http::HeaderValue;
    use zerodrop_core::{Epoch, Seq};
    use zerodrop_server::config::{Config, StoreChoice};

    // Config::from_toml: the example config is the defaults; a bad value or key is refused.
    let example = Config::from_toml(include_str!("../../../deploy/zerodrop.toml")).unwrap();
    assert_eq!(example.store, StoreChoice::Sqlite);
    assert_eq!(example.max_frame_bytes, 131_072);
    let upstreams = Config::from_toml("[upstreams.app]\nprimary = \"http://10.0.0.5:9000\"\n");
    assert!(upstreams.unwrap().guard.upstreams.contains_key("app"));
    let small = Config::from_toml("max_frame_bytes = 1023").unwrap_err();
    assert!(
        format!("{small:#}").contains("max_frame_bytes"),
        "{small:#}"
    );
    assert!(Config::from_toml("no_such_setting = 1").is_err());
    assert!(Config::from_toml("listen = 7").is_err());

    // sse::last_event_id.
    let lei = |s: &str| zerodrop_server::sse::last_event_id(&HeaderValue::from_str(s).unwrap());
    assert_eq!(lei(" 7 ").unwrap(), Some((None, Seq(7))));
    assert_eq!(
        lei("ab-1:42").unwrap(),
        Some((Some(Epoch::parse("ab-1").unwrap()), Seq(42)))
    );
    assert_eq!(lei("").unwrap(), None);
    for bad in ["x", ":5", "a:b:5", "-1", "e:18446744073709551616"] {
        assert!(lei(bad).is_err(), "{bad}");
    }

    // http::v1::publish_data keeps the data's text as sent.
    let data = zerodrop_server::http::v1::publish_data(br#"{"data": [1, 2]}"#).unwrap();
    assert_eq!(data.get(), "[1, 2]");
    assert!(zerodrop_server::http::v1::publish_data(br#"{"data":1,"data":2}"#).is_err());
    assert!(zerodrop_server::http::v1::publish_data(b"{}").is_err());

    // ws::parse_frame: the depth limit before the parser.
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let frame = |n| format!(r#"{{"type":"publish","stream":"s","data":{}}}"#, deep(n));
    assert!(zerodrop_server::ws::parse_frame(&frame(64)).is_ok());
    let refused = zerodrop_server::ws::parse_frame(&frame(65)).unwrap_err();
    assert!(
        refused.message.contains("levels deep"),
        "{}",
        refused.message
    );
}
