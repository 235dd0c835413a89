//! Profiles and scenarios: what a drill runs, how many clients, how fast.

use std::time::Duration;

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Scenario {
    /// HTTP publishers only; judged on publish latency and statuses; every acknowledged
    /// event is checked in the log afterwards.
    #[value(name = "publish")]
    Publish,
    /// WebSocket subscribers receiving live events.
    #[value(name = "ws_fanout")]
    WsFanout,
    /// SSE subscribers that drop now and then and come back with `Last-Event-ID`.
    #[value(name = "sse_fanout")]
    SseFanout,
    /// WebSocket clients that drop abruptly at random and resume with their token.
    #[value(name = "resume")]
    Resume,
    /// WebSocket clients that all drop at once mid-run and resume together.
    #[value(name = "reconnect_storm")]
    ReconnectStorm,
    /// HTTP senders posting webhooks to `POST /v1/webhooks/{source}`, some of them twice
    /// (after the first answer, or at the same time), retrying like a provider; every
    /// accepted message id is looked up in the source's stream afterwards (once, no more).
    #[value(name = "webhook")]
    Webhook,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Publish,
        Scenario::WsFanout,
        Scenario::SseFanout,
        Scenario::Resume,
        Scenario::ReconnectStorm,
        Scenario::Webhook,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Scenario::Publish => "publish",
            Scenario::WsFanout => "ws_fanout",
            Scenario::SseFanout => "sse_fanout",
            Scenario::Resume => "resume",
            Scenario::ReconnectStorm => "reconnect_storm",
            Scenario::Webhook => "webhook",
        }
    }

    pub fn from_id(id: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.id() == id)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// ≈ 15 s, 120 clients, moderate rates: a smoke test before and after a change.
    Quick,
    /// ≈ 30 s of peak load: 4× the clients and rates of quick.
    Burst,
    /// ≈ 2 min (`--minutes`), 2× quick's clients at quick's rates.
    Soak,
    /// soak with `--minutes M --limit L` (L concurrent clients).
    Standard,
}

impl Profile {
    pub fn id(self) -> &'static str {
        match self {
            Profile::Quick => "quick",
            Profile::Burst => "burst",
            Profile::Soak => "soak",
            Profile::Standard => "standard",
        }
    }
}

/// How the clients of one scenario behave.
#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    Steady,
    /// Drop at a random moment within this range, again and again.
    DropEvery(Duration, Duration),
    /// Everyone drops at this fraction of the run.
    StormAt(f64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScenarioPlan {
    pub scenario: Scenario,
    pub streams: usize,
    pub clients: usize,
    pub publishers: usize,
    /// Events/s per publisher; `None` = as fast as answers come (one request in flight).
    pub rate: Option<f64>,
    pub behaviour: Behaviour,
    /// Named in `--scenarios` (not just part of the default set): a scenario that could not
    /// run is then a breach, not a note.
    pub requested: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub profile: Profile,
    pub duration: Duration,
    pub scenarios: Vec<ScenarioPlan>,
}

impl Plan {
    pub fn clients(&self) -> usize {
        self.scenarios.iter().map(|s| s.clients).sum()
    }
}

/// Overrides from the command line.
#[derive(Clone, Debug, Default)]
pub struct PlanOverrides {
    pub duration: Option<Duration>,
    /// Total concurrent clients, spread over the scenarios in the profile's proportions.
    pub limit: Option<usize>,
    /// `Some(None)` = max.
    pub rate: Option<Option<f64>>,
    pub scenarios: Vec<Scenario>,
    /// Publishers per scenario.
    pub publishers: Option<usize>,
}

fn base(s: Scenario) -> ScenarioPlan {
    let (streams, clients, publishers, rate, behaviour) = match s {
        Scenario::Publish => (2, 0, 4, 50.0, Behaviour::Steady),
        Scenario::WsFanout => (2, 40, 2, 50.0, Behaviour::Steady),
        Scenario::SseFanout => (1, 10, 1, 20.0, Behaviour::DropEvery(secs(3.0), secs(6.0))),
        Scenario::Resume => (2, 20, 2, 20.0, Behaviour::DropEvery(secs(1.5), secs(4.0))),
        Scenario::ReconnectStorm => (1, 50, 1, 20.0, Behaviour::StormAt(0.5)),
        // The stream is the source's, configured on the server: the drill makes none.
        Scenario::Webhook => (0, 0, 2, 20.0, Behaviour::Steady),
    };
    ScenarioPlan {
        scenario: s,
        streams,
        clients,
        publishers,
        rate: Some(rate),
        behaviour,
        requested: false,
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

pub fn plan(profile: Profile, o: &PlanOverrides) -> Plan {
    let (duration, client_factor, rate_factor) = match profile {
        Profile::Quick => (15.0, 1.0, 1.0),
        Profile::Burst => (30.0, 4.0, 4.0),
        Profile::Soak | Profile::Standard => (120.0, 2.0, 1.0),
    };
    let chosen: Vec<Scenario> = if o.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        Scenario::ALL
            .into_iter()
            .filter(|s| o.scenarios.contains(s))
            .collect()
    };
    let mut scenarios: Vec<ScenarioPlan> = chosen
        .into_iter()
        .map(|s| {
            let mut p = base(s);
            p.requested = o.scenarios.contains(&s);
            p.clients = (p.clients as f64 * client_factor).round() as usize;
            p.rate = p.rate.map(|r| r * rate_factor);
            p
        })
        .collect();
    if let Some(limit) = o.limit {
        let total: usize = scenarios.iter().map(|s| s.clients).sum();
        if total > 0 {
            let f = limit as f64 / total as f64;
            for s in scenarios.iter_mut().filter(|s| s.clients > 0) {
                s.clients = ((s.clients as f64 * f).round() as usize).max(1);
            }
        }
    }
    if let Some(r) = o.rate {
        for s in &mut scenarios {
            s.rate = r;
        }
    }
    if let Some(p) = o.publishers {
        for s in &mut scenarios {
            s.publishers = p.max(1);
        }
    }
    Plan {
        profile,
        duration: o.duration.unwrap_or(secs(duration)),
        scenarios,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_scale_clients_and_time() {
        let q = plan(Profile::Quick, &PlanOverrides::default());
        assert_eq!(q.duration, Duration::from_secs(15));
        assert_eq!(q.scenarios.len(), 6);
        assert!(q.scenarios.iter().all(|s| !s.requested));
        assert_eq!(q.clients(), 120);
        let b = plan(Profile::Burst, &PlanOverrides::default());
        assert_eq!(b.clients(), 480);
        assert!(
            b.clients() < 1000,
            "stays under the server's default connection limit"
        );
        let s = plan(
            Profile::Standard,
            &PlanOverrides {
                limit: Some(600),
                duration: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        );
        assert!((590..=610).contains(&s.clients()), "{}", s.clients());
        assert_eq!(s.duration, Duration::from_secs(60));
    }

    #[test]
    fn scenario_selection_and_rate_override() {
        let p = plan(
            Profile::Quick,
            &PlanOverrides {
                scenarios: vec![Scenario::Resume, Scenario::Publish],
                rate: Some(None),
                ..Default::default()
            },
        );
        let ids: Vec<_> = p.scenarios.iter().map(|s| s.scenario.id()).collect();
        assert_eq!(ids, ["publish", "resume"]);
        assert!(p.scenarios.iter().all(|s| s.rate.is_none()));
        assert!(p.scenarios.iter().all(|s| s.requested));
        assert_eq!(
            Scenario::from_id("reconnect_storm"),
            Some(Scenario::ReconnectStorm)
        );
        assert_eq!(Scenario::from_id("webhook"), Some(Scenario::Webhook));
        assert_eq!(Scenario::from_id("webhooks"), None);
    }
}
