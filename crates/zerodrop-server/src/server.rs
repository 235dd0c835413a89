//! Start-up and shutdown: secrets, store, hub, the store's durability level (refused below
//! `--require-durability`), listener, background tasks.
//!
//! Shutdown is explicit: a drain first (clients are handed to other instances with fresh
//! resume tokens), then the listener stops, then the store's writer finishes what it has
//! queued. Nothing acknowledged is ever in flight when the process exits.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zerodrop_core::{Event, Seq, SessionId, StreamId};
use zerodrop_store::{
    LiveSink, MemoryStore, RedisOptions, RedisStore, SqliteOptions, SqliteStore, Store, Synchronous,
};

use crate::app::App;
use crate::auth::Auth;
use crate::config::{Config, StoreChoice, SyncChoice};
use crate::live::{Hub, HubLimits};
use crate::metrics::Metrics;
use crate::secrets::{self, SecretsSource};

pub const DB_FILE: &str = "zerodrop.db";

/// A server that is accepting connections.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
    sqlite: Option<Arc<SqliteStore>>,
}

impl Running {
    /// Drains over `grace` (clients get `reconnect` frames), then stops and closes the store.
    pub async fn shutdown(self, grace: Duration) -> anyhow::Result<()> {
        drain_for(&self.app, "shutdown", grace).await;
        let _ = self.stop.send(true);
        self.app.flush_acks(None).await;
        let r = self.task.await.context("server task panicked")?;
        if let Some(s) = &self.sqlite {
            let s = s.clone();
            tokio::task::spawn_blocking(move || s.close()).await.ok();
        }
        r
    }

    /// The SQLite store, when it is the one in use.
    pub fn sqlite(&self) -> Option<&Arc<SqliteStore>> {
        self.sqlite.as_ref()
    }

    /// Stops at once without draining (tests that simulate a crash use a process instead).
    pub async fn stop_now(self) -> anyhow::Result<()> {
        self.shutdown(Duration::ZERO).await
    }
}

/// Starts draining, waits until no connection remains or `grace` passes, then closes the
/// rest.
pub async fn drain_for(app: &App, reason: &str, grace: Duration) {
    let spread = grace.saturating_sub(Duration::from_secs(1)).max(grace / 2);
    app.start_drain(reason, spread);
    let deadline = tokio::time::Instant::now() + grace;
    while app.conns.current() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.complete_drain();
    // Each closing socket waits (bounded) for its client's close frame, so that nothing still
    // queued for the client is lost to a reset.
    let closing = tokio::time::Instant::now() + crate::ws::CLOSE_HANDSHAKE + Duration::from_secs(1);
    while app.conns.current() > 0 && tokio::time::Instant::now() < closing {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn listen(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            ": another process (another zerodrop?) holds it; choose another address with \
             --listen or ZERODROP_LISTEN"
        } else {
            ""
        };
        anyhow::anyhow!("cannot listen on {addr}: {e}{hint}")
    })?;
    // tokio's default backlog (128) overflows in a reconnect storm; each overflow costs the
    // client a 1 s SYN retransmit.
    socket.listen(4096)?;
    Ok(tokio::net::TcpListener::from_std(socket.into())?)
}

fn instance_id(cfg: &Config) -> String {
    cfg.instance_id
        .clone()
        .unwrap_or_else(|| format!("zd-{}", hex::encode(zerodrop_core::random_bytes::<3>())))
}

/// What the store reports, routed: the log's growth to the hub, session holder notices to
/// the app (which does not exist yet when the store is opened, hence the late binding).
struct Sink {
    hub: Arc<Hub>,
    app: OnceLock<Weak<App>>,
}

impl LiveSink for Sink {
    fn committed(&self, events: &[Arc<Event>]) {
        self.hub.committed(events);
    }

    fn trimmed(&self, stream: &StreamId, first_seq: Seq, count: u64) {
        self.hub.trimmed(stream, first_seq, count);
    }

    fn reset(&self) {
        self.hub.reset();
    }

    fn presence_changed(&self, stream: &StreamId) {
        self.hub.presence_changed(stream);
    }

    fn recreated(&self, stream: &StreamId) {
        self.hub.recreated(stream);
    }

    fn closed(&self, stream: &StreamId, last_seq: Seq) {
        self.hub.closed(stream, last_seq);
    }

    fn missed(&self, stream: &StreamId) {
        self.hub.missed(stream);
    }

    fn session_held(&self, id: &SessionId, holder: &str) {
        if let Some(app) = self.app.get().and_then(Weak::upgrade) {
            app.session_held(id, holder);
        }
    }
}

/// Builds the application: secrets, store, hub.
pub async fn build(cfg: Config) -> anyhow::Result<(Arc<App>, Option<Arc<SqliteStore>>)> {
    secrets::create_private_dir(&cfg.data_dir)?;
    let (secrets, source) = secrets::load_or_generate(&cfg.data_dir, &cfg.secrets)?;
    match &source {
        SecretsSource::Environment => tracing::info!("secrets from the environment"),
        SecretsSource::File { path, generated } if !generated.is_empty() => tracing::info!(
            path = %path.display(),
            generated = ?generated,
            "generated secrets (mode 0600); clients need the api key and JWT secret from this file"
        ),
        SecretsSource::File { path, .. } => {
            tracing::info!(path = %path.display(), "secrets from file")
        }
    }
    let metrics = Arc::new(Metrics::new());
    let limits = HubLimits {
        ring_events: cfg.live_ring_events,
        ..HubLimits::default()
    };
    let hub = Arc::new(Hub::new(limits, metrics.clone()));
    let routed = Arc::new(Sink {
        hub: hub.clone(),
        app: OnceLock::new(),
    });
    let sink: Arc<dyn LiveSink> = routed.clone();
    let mut sqlite = None;
    let store: Arc<dyn Store> = match cfg.store {
        StoreChoice::Memory => Arc::new(MemoryStore::with_rules(
            zerodrop_core::RetentionRules::new(cfg.retention, cfg.retention_patterns()),
            cfg.idempotency_ttl_sec * 1000,
            sink,
            cfg.clock.clone(),
        )),
        StoreChoice::Sqlite => {
            let mut opts = SqliteOptions::new(cfg.data_dir.join(DB_FILE));
            opts.retention = cfg.retention;
            opts.retention_patterns = cfg.retention_patterns();
            opts.idempotency_ttl_ms = cfg.idempotency_ttl_sec * 1000;
            opts.clock = cfg.clock.clone();
            opts.synchronous = match cfg.sqlite_synchronous {
                SyncChoice::Full => Synchronous::Full,
                SyncChoice::Normal => Synchronous::Normal,
            };
            let s = tokio::task::spawn_blocking(move || SqliteStore::open(opts, sink))
                .await
                .context("opening the database panicked")?
                .map_err(|e| anyhow::anyhow!("cannot open the database: {e}"))?;
            let s = Arc::new(s);
            sqlite = Some(s.clone());
            s
        }
        StoreChoice::Redis => {
            let mut opts = RedisOptions::new(&cfg.redis_url);
            opts.retention = cfg.retention;
            opts.retention_patterns = cfg.retention_patterns();
            opts.idempotency_ttl_ms = cfg.idempotency_ttl_sec * 1000;
            opts.wait_replicas = cfg.redis_wait_replicas;
            opts.clock = cfg.clock.clone();
            let s = RedisStore::connect(opts, sink)
                .await
                // Not the URL itself: it may carry a password.
                .map_err(|e| anyhow::anyhow!("cannot use the redis store (--redis-url): {e}"))?;
            if !s.live_connected() {
                tracing::warn!(
                    "redis is not reachable yet; the instance starts not ready and recovers by itself"
                );
            }
            if matches!(&source, SecretsSource::File { generated, .. } if !generated.is_empty()) {
                tracing::warn!(
                    "with --store redis every instance needs the same secrets: copy secrets.json \
                     to the other instances' data dirs or set the ZERODROP_* secret variables"
                );
            }
            Arc::new(s)
        }
    };
    // A shared store feeds the hub the streams it has topics for.
    hub.follow(&store);
    let jwks = match &cfg.jwks_url {
        Some(url) => Some(Arc::new(
            crate::jwks::Jwks::open(url, Duration::from_secs(cfg.jwks_refresh_min_sec)).await?,
        )),
        None => None,
    };
    let auth = Auth::with_rules(
        &secrets,
        crate::auth::TokenRules {
            jwks,
            issuer: cfg.jwt_issuer.clone(),
            audience: cfg.jwt_audience.clone(),
            clock: Some(cfg.clock.clone()),
        },
    );
    let guard = crate::guard::Guard::new(cfg.guard.clone(), metrics.clone(), cfg.clock.clone())?;
    let app = Arc::new(App::new(
        cfg.clone(),
        instance_id(&cfg),
        store,
        hub,
        metrics,
        auth,
        guard,
    ));
    let _ = routed.app.set(Arc::downgrade(&app));
    durability_at_start(&app).await?;
    // Revocations are in force before the first connection is accepted.
    app.reload_orders().await;
    Ok((app, sqlite))
}

/// Reads the store's durability level before the instance serves. A level below
/// `--require-durability` refuses the start, naming the level and the setting to change;
/// one that is neither fsync- nor replica-durable is a warning. A Redis that has not answered
/// yet cannot be read: the instance starts not ready (as it does without the requirement) and
/// the health loop reads the level once Redis answers.
async fn durability_at_start(app: &App) -> anyhow::Result<()> {
    let d = app.read_durability().await;
    let level = d.level();
    if d.unreachable() {
        tracing::warn!(
            setting = %d.cause(),
            "the store's durability level cannot be read until the store answers; it is read \
             then, and counts as {level} until it is"
        );
        return Ok(());
    }
    if let Some(want) = app.required_durability()
        && level < want
    {
        anyhow::bail!(
            "the store's durability level is {level} ({}), below --require-durability {want}: {}",
            d.cause(),
            d.how_to_reach(want).unwrap_or_default()
        );
    }
    app.announce_durability(&d);
    Ok(())
}

/// Builds and starts serving; returns once the listener accepts connections.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let listener = listen(cfg.listen)?;
    let addr = listener.local_addr()?;
    let (app, sqlite) = build(cfg).await?;
    let (stop, stop_rx) = watch::channel(false);
    spawn_background(app.clone(), stop_rx.clone());
    crate::guard::worker::spawn(app.clone(), stop_rx.clone());
    crate::guard::worker::spawn_circuit_gauges(app.clone(), stop_rx.clone());
    if let Some(s) = &sqlite {
        spawn_sqlite_check(
            s.clone(),
            app.cfg.sqlite_check_interval_sec,
            stop_rx.clone(),
        );
    }
    let router = crate::http::router(app.clone());
    let limits = crate::conn::ConnLimits::from_config(&app.cfg);
    let metrics = app.metrics.clone();
    let task = tokio::spawn(async move {
        crate::conn::serve(listener, router, limits, metrics, stop_rx).await;
        Ok(())
    });
    tracing::info!(
        %addr,
        store = app.store_kind().as_str(),
        durability = app.durability().level().as_str(),
        data_dir = %app.cfg.data_dir.display(),
        instance = %app.instance,
        "listening"
    );
    Ok(Running {
        addr,
        app,
        stop,
        task,
        sqlite,
    })
}

/// Runs `work` every `period` until the server stops.
fn every<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, mut work: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            work().await;
        }
    });
}

/// The scheduled `PRAGMA quick_check` (the first one a period after start: the start-up check
/// just ran). A damaged file latches the store (it logs why and what to do); later checks stop.
fn spawn_sqlite_check(store: Arc<SqliteStore>, period_sec: u64, mut stop: watch::Receiver<bool>) {
    if period_sec == 0 {
        return;
    }
    let period = Duration::from_secs(period_sec);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        while !store.corrupt() {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = store.check().await {
                tracing::debug!(error = %e, "scheduled database check");
            }
        }
    });
}

fn spawn_background(app: Arc<App>, stop: watch::Receiver<bool>) {
    // Store health: readiness, `store_up`, and one log line per transition; the durability
    // level read again every `durability_recheck` and as soon as the store is back.
    let a = app.clone();
    every(Duration::from_secs(1), stop.clone(), move || {
        let app = a.clone();
        async move {
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), app.store_ping()).await,
                Ok(Ok(()))
            );
            let was = app.store_up.swap(ok, Ordering::Relaxed);
            app.metrics.store_up(ok);
            if was && !ok {
                tracing::error!(
                    store = app.store_kind().as_str(),
                    "store unreachable; publishes answer 503 STORE_UNAVAILABLE, readiness is 503"
                );
            } else if !was && ok {
                tracing::warn!(store = app.store_kind().as_str(), "store reachable again");
            }
            if ok {
                app.recheck_durability(!was).await;
            }
        }
    });
    // Drops counted under connected sessions are remembered in the sessions, so that a later
    // resume does not count them again.
    if let Some(mut marks) = app.hub.take_drop_marks() {
        let (app, mut stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    m = marks.recv() => m,
                    _ = stop.wait_for(|s| *s) => None,
                };
                let Some(m) = m else { return };
                app.record_drop_mark(&m).await;
            }
        });
    }
    // JWKS keys that were rotated out stop working within `jwks::PERIOD`.
    if let Some(jwks) = app.auth.jwks() {
        every(Duration::from_secs(30), stop.clone(), move || {
            let jwks = jwks.clone();
            async move { jwks.read_if_stale().await }
        });
    }
    // Revocations and disconnect orders made on other instances sharing the store.
    let a = app.clone();
    every(crate::app::revocation::POLL, stop.clone(), move || {
        let app = a.clone();
        async move { app.poll_orders().await }
    });
    // Presence: members held here renewed, lapsed members (of any instance) swept, and the
    // gauges read from the store.
    if app.cfg.presence_anywhere() {
        let (beat, sweep) = app.presence_periods();
        let a = app.clone();
        every(beat, stop.clone(), move || {
            let app = a.clone();
            async move { app.presence_beat().await }
        });
        let a = app.clone();
        every(sweep, stop.clone(), move || {
            let app = a.clone();
            async move { app.presence_sweep().await }
        });
        let a = app.clone();
        every(Duration::from_secs(5), stop.clone(), move || {
            let app = a.clone();
            async move { app.presence_census().await }
        });
        // Occupancy webhooks: the presence logs pumped into the job queue, in order.
        if app.presence_hooks_on() {
            let a = app.clone();
            every(Duration::from_millis(100), stop.clone(), move || {
                let app = a.clone();
                async move { app.presence_pump().await }
            });
        }
    }
    // Written-behind WebSocket acks, once a second, in one batch.
    let a = app.clone();
    every(Duration::from_secs(1), stop.clone(), move || {
        let app = a.clone();
        async move { app.flush_acks(None).await }
    });
    // Housekeeping: idle topics, histogram upkeep, rate-limit keys back to a full burst.
    every(Duration::from_secs(5), stop, move || {
        let app = app.clone();
        async move {
            app.hub.sweep();
            app.metrics.upkeep();
            crate::guard::worker::upkeep(&app).await;
            if let Some(l) = &app.limits {
                l.retain_recent();
            }
            if let Some(l) = &app.new_streams {
                l.retain_recent();
            }
        }
    });
}
