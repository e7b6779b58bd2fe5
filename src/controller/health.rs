//! The controller's HTTP endpoints for Kubernetes probes and Prometheus: `/healthz`, `/readyz` and
//! `/metrics`, on `--health-listen`.
//!
//! `/readyz` is 200 for a replica that can do its job:
//! - the leader (or the only replica, without leader election) once every controller's watch
//!   cache has been filled from its first list;
//! - a follower as soon as it stands by (the CRDs were found before it started to wait): it is
//!   ready to take over, and a follower that never turned ready would stall every rolling update
//!   of a two-replica Deployment (the new pod can only lead after the old one is gone) and leave
//!   followers out of a Service's endpoints, so their metrics would go unscraped.
//!
//! The server starts after the CRDs were found: a replica without them exits at once with a
//! message saying how to install them, so no probe ever waits on that.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tracing::{error, info};

use super::metrics::CONTENT_TYPE;
use super::Context;

/// Where a replica is in its life, as far as readiness goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Deciding its role (reading the lease).
    Starting = 0,
    /// Another replica leads; this one waits to take over.
    StandingBy = 1,
    /// Leading (or alone): its controllers are filling their watch caches.
    Syncing = 2,
    /// Leading (or alone) with every watch cache filled: reconciling.
    Acting = 3,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            1 => Phase::StandingBy,
            2 => Phase::Syncing,
            3 => Phase::Acting,
            _ => Phase::Starting,
        }
    }

    /// The `/readyz` answer in this phase.
    pub fn readiness(self) -> (StatusCode, &'static str) {
        match self {
            Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "not ready: deciding leadership\n"),
            Phase::StandingBy => (StatusCode::OK, "ok: standing by, another replica leads\n"),
            Phase::Syncing => (StatusCode::SERVICE_UNAVAILABLE, "not ready: watch caches are syncing\n"),
            Phase::Acting => (StatusCode::OK, "ok: leading, watch caches synced\n"),
        }
    }
}

/// The phase, shared by the run loop (which moves it on) and the server (which reports it).
#[derive(Debug)]
pub struct Health(AtomicU8);

impl Health {
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.load(Ordering::Relaxed))
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    ctx: Arc<Context>,
}

/// Binds `listen` and serves in the background for the life of the process; returns the phase to
/// move on and the address bound (port 0 picks one).
pub async fn serve(listen: SocketAddr, ctx: Arc<Context>) -> std::io::Result<(Arc<Health>, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let health = Arc::new(Health(AtomicU8::new(Phase::Starting as u8)));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState { health: health.clone(), ctx });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "the health and metrics server stopped");
        }
    });
    info!(%address, "serving /healthz, /readyz and /metrics");
    Ok((health, address))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    state.health.phase().readiness()
}

async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    let ctx = &state.ctx;
    match ctx.metrics.encode(ctx.build.registries.traffic(), ctx.backoff.waiting_by_kind()) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_standing_by_or_acting_on_synced_caches() {
        let health = Health(AtomicU8::new(Phase::Starting as u8));
        assert_eq!(health.phase().readiness().0, StatusCode::SERVICE_UNAVAILABLE);
        for (phase, code) in [
            (Phase::StandingBy, StatusCode::OK),
            (Phase::Syncing, StatusCode::SERVICE_UNAVAILABLE),
            (Phase::Acting, StatusCode::OK),
        ] {
            health.set(phase);
            assert_eq!(health.phase(), phase);
            assert_eq!(phase.readiness().0, code, "{phase:?}");
        }
    }
}
