//! Shared application state.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bus::{Bus, Channel};
use db::Db;
use db::orgs::VersionedSettings;
use domain::OrgId;
use domain::events::{Envelope, Event};

use crate::error::ApiResult;

pub struct AppState {
    pub db: Db,
    pub bus: Bus,
    pub verifier: auth::Verifier,
    pub cancel_grace: Duration,
    /// See [`crate::Config::lease_on_create`].
    pub lease_on_create: Option<Duration>,
    /// Writes busy orgs' single-job creates together.
    pub creates: crate::creates::CreateWriter,
    /// Leases granted on create (the scheduler counts its own).
    pub leases_on_create: prometheus::IntCounter,
    /// When each org last created jobs through this replica.
    last_create: Mutex<HashMap<OrgId, Instant>>,
    /// Orgs whose row is known to exist (created on first use).
    known_orgs: Mutex<HashSet<OrgId>>,
    /// Org settings as last read, for creates: a create checks inside its
    /// own transaction that they are still current (no extra round trip)
    /// and reads them again when they are not, so a change made through
    /// any replica applies to the next create.
    settings: Mutex<HashMap<OrgId, VersionedSettings>>,
}

/// Orgs whose settings (and last create) are kept; past this the cache
/// starts over.
const MAX_CACHED_SETTINGS: usize = 10_000;

/// An org that created jobs this recently is busy: its next job goes to the
/// scheduler, which leases a busy org's jobs in batches, rather than being
/// leased by its create. One dispatch per job costs more than the scheduler
/// hop saves under load: at 500 and 1,000 jobs/s of single creates the
/// created -> completed p99 rose by a quarter to a half with every create
/// trying (`scripts/bench.sh steady`), while at 100 jobs/s (10 ms apart)
/// leasing on create still cut the created -> assigned p50 by 0.8 ms.
pub const BUSY_ORG_WINDOW: Duration = Duration::from_millis(5);

impl AppState {
    pub fn new(
        db: Db,
        bus: Bus,
        verifier: auth::Verifier,
        cancel_grace: Duration,
        lease_on_create: Option<Duration>,
        registry: &prometheus::Registry,
    ) -> Self {
        let leases_on_create = prometheus::IntCounter::new(
            "job_api_leases_on_create_total",
            "Jobs leased by their own create (the org was idle)",
        )
        .expect("metric");
        if let Err(error) = registry.register(Box::new(leases_on_create.clone())) {
            tracing::warn!(error = %error, "metric not registered");
        }
        Self {
            creates: crate::creates::CreateWriter::start(
                db.clone(),
                bus.clone(),
                leases_on_create.clone(),
            ),
            db,
            bus,
            verifier,
            cancel_grace,
            lease_on_create,
            leases_on_create,
            last_create: Mutex::new(HashMap::new()),
            known_orgs: Mutex::new(HashSet::new()),
            settings: Mutex::new(HashMap::new()),
        }
    }

    /// The ack timeout to lease this create's job with (see
    /// [`crate::Config::lease_on_create`]), or `None` when the org created
    /// jobs within [`BUSY_ORG_WINDOW`]; notes this create either way.
    pub fn lease_on_create(&self, org: &OrgId) -> Option<Duration> {
        let ack_timeout = self.lease_on_create?;
        let now = Instant::now();
        let mut last = self.last_create.lock().ok()?;
        if last.len() >= MAX_CACHED_SETTINGS {
            last.clear();
        }
        let previous = last.insert(org.clone(), now);
        previous
            .is_none_or(|at| now.duration_since(at) >= BUSY_ORG_WINDOW)
            .then_some(ack_timeout)
    }

    /// The org's settings as last read, if any.
    pub fn cached_settings(&self, org: &OrgId) -> Option<VersionedSettings> {
        self.settings.lock().ok()?.get(org).cloned()
    }

    /// Reads the org's settings and keeps them for the next create.
    pub async fn read_settings(
        &self,
        conn: &mut db::PgConn,
        org: &OrgId,
    ) -> ApiResult<VersionedSettings> {
        let read = db::orgs::versioned_settings(conn, org).await?;
        if let Ok(mut cache) = self.settings.lock() {
            if cache.len() >= MAX_CACHED_SETTINGS {
                cache.clear();
            }
            cache.insert(org.clone(), read.clone());
        }
        Ok(read)
    }

    /// Drops this replica's copy after a change (others find out at their
    /// next create).
    pub fn forget_settings(&self, org: &OrgId) {
        if let Ok(mut cache) = self.settings.lock() {
            cache.remove(org);
        }
    }

    /// Creates the org's row on first use (membership itself is the token's).
    pub async fn ensure_org(&self, org: &OrgId, name: Option<&str>) -> ApiResult<()> {
        if self
            .known_orgs
            .lock()
            .map(|set| set.contains(org))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let mut conn = self.db.conn().await?;
        db::orgs::ensure_org(&mut conn, org, name).await?;
        if let Ok(mut set) = self.known_orgs.lock() {
            set.insert(org.clone());
        }
        Ok(())
    }

    /// Publishes after commit; a lost message is repaired by the sweeps.
    pub async fn publish(
        &self,
        channel: Channel,
        org: &OrgId,
        event: Event,
        request_id: Option<&str>,
    ) {
        let envelope = Envelope::new(org.clone(), event)
            .with_request_id(request_id.map(str::to_owned))
            .with_trace(telemetry::current_trace_context());
        if matches!(envelope.event, Event::JobStatusChanged { .. }) {
            self.bus.job_status_changed(&envelope).await;
        } else {
            self.bus.publish_best_effort(&channel, &envelope).await;
        }
    }
}
