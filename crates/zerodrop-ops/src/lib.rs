//! The operator's toolkit: the command-line tools of SPEC §8, as one clap [`OpsCommand`]
//! that the `zerodrop` binary flattens into its subcommands.
//!
//! Every tool talks to zerodrop only over the wire, through `zerodrop-client`, exactly as
//! an operator's machine would; none links the server. Each prints a readable summary and
//! writes a JSON report under `.output/reliability/` (see docs/operations.md).

pub mod canary;
pub mod capacity;
pub mod common;
pub mod dashboard;
pub mod drill;
pub mod gameday;
pub mod gate;
pub mod instance;
pub mod probe;
pub mod proxy;
pub mod redis;
pub mod report;
pub mod slo;
pub mod snapshot;
pub mod verify;

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand, Clone, Debug)]
pub enum OpsCommand {
    /// One synthetic session end to end (publish, WebSocket and SSE receive, disconnect,
    /// resume, checkpoints); exit 1 names the failed step.
    Probe(probe::ProbeArgs),
    /// Load with many clients and forced disconnects; latency, error rates, resume success,
    /// lost/duplicated/out-of-order events.
    Drill(drill::DrillArgs),
    /// A drill judged against an SLO file (or a scale milestone); exit 1 names every breach.
    Gate(gate::GateArgs),
    /// The same drill on a control and a candidate, interleaved; fails when the candidate is
    /// worse beyond the SLO file's canary tolerances.
    Canary(canary::CanaryArgs),
    /// Drills on instances this tool starts, with faults injected (restart, drain, kill -9,
    /// network cut, store outage); reports whether zero-drop held for each.
    Gameday(gameday::GamedayArgs),
    /// Turns the JSON reports into one self-contained HTML page.
    Dashboard(dashboard::DashboardArgs),
    /// Instances needed for an expected peak, from measured capacity, at 70 % headroom.
    Capacity(capacity::CapacityArgs),
    /// The admin reliability snapshot, readable.
    Snapshot(snapshot::SnapshotArgs),
    /// Whether instances serve the same log of a stream (epoch, bounds, count, hash);
    /// `--recompute` also checks each hash against its events. Exit 1 on divergence.
    Verify(verify::VerifyArgs),
}

/// Runs one tool. Tools return `ExitCode::FAILURE` for a failed verdict and `Err` for a
/// failure to run at all (the binary prints it and exits 1 as well).
pub async fn run(cmd: OpsCommand) -> anyhow::Result<ExitCode> {
    // Every drill client is a socket: allow as many as the hard limit does.
    if let Err(e) = common::raise_nofile_limit() {
        eprintln!("warning: could not raise the open-file limit (RLIMIT_NOFILE): {e}");
    }
    match cmd {
        OpsCommand::Probe(a) => probe::run(a).await,
        OpsCommand::Drill(a) => drill::run(a).await,
        OpsCommand::Gate(a) => gate::run(a).await,
        OpsCommand::Canary(a) => canary::run(a).await,
        OpsCommand::Gameday(a) => gameday::run(a).await,
        OpsCommand::Dashboard(a) => dashboard::run(a).await,
        OpsCommand::Capacity(a) => capacity::run(a).await,
        OpsCommand::Snapshot(a) => snapshot::run(a).await,
        OpsCommand::Verify(a) => verify::run(a).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: super::OpsCommand,
    }

    #[test]
    fn the_cli_is_consistent_and_parses_spec_examples() {
        Cli::command().debug_assert();
        for line in [
            "x probe --url http://127.0.0.1:7700",
            "x drill --url http://127.0.0.1:7700 --profile burst --scenarios ws_fanout,resume",
            "x gate --profile quick --slo slo.json",
            "x gate --milestone m1_1k --token-pool-file tokens.txt",
            "x canary --control-url http://127.0.0.1:1 --candidate-url http://127.0.0.1:2 --profile quick",
            "x gameday --profiles burst,soak",
            "x dashboard",
            "x capacity --expected-peak-streams 50000",
            "x snapshot --url http://127.0.0.1:7700",
            "x verify --stream room:1 --url http://127.0.0.1:1 --peer http://127.0.0.1:2 --peer http://127.0.0.1:3 --recompute",
            "x drill --profile standard --minutes 5 --limit 800 --rate max",
        ] {
            let r = Cli::try_parse_from(line.split(' '));
            assert!(r.is_ok(), "{line}: {:?}", r.err());
        }
        assert!(Cli::try_parse_from(["x", "drill", "--scenarios", "nope"]).is_err());
    }

    /// SPEC §8: every tool takes `--url`.
    #[test]
    fn every_subcommand_takes_url() {
        let cmd = Cli::command();
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "probe",
                "drill",
                "gate",
                "canary",
                "gameday",
                "dashboard",
                "capacity",
                "snapshot",
                "verify"
            ]
        );
        for name in &names {
            let mut line = vec!["x", name.as_str(), "--url", "http://127.0.0.1:7700"];
            match name.as_str() {
                "capacity" => line.extend(["--expected-peak-streams", "50000"]),
                "canary" => line.extend(["--candidate-url", "http://127.0.0.1:2"]),
                "verify" => line.extend(["--stream", "room:1"]),
                _ => {}
            }
            let r = Cli::try_parse_from(&line);
            assert!(r.is_ok(), "{line:?}: {:?}", r.err());
        }
        // canary's --url is the control unless --control-url names one.
        let control = |more: &[&str]| -> String {
            let mut line = vec!["x", "canary", "--candidate-url", "http://127.0.0.1:2"];
            line.extend(more);
            match Cli::try_parse_from(&line) {
                Ok(Cli {
                    cmd: super::OpsCommand::Canary(c),
                }) => c.control_url().to_string(),
                other => panic!("{line:?}: {:?}", other.err()),
            }
        };
        assert_eq!(
            control(&["--url", "http://127.0.0.1:1"]),
            "http://127.0.0.1:1"
        );
        assert_eq!(control(&[]), "http://127.0.0.1:7700", "the SPEC default");
        assert_eq!(
            control(&[
                "--url",
                "http://127.0.0.1:1",
                "--control-url",
                "http://127.0.0.1:3"
            ]),
            "http://127.0.0.1:3"
        );
    }
}
