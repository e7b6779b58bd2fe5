//! Knowing whether a registry takes connections, before it has answered anything.
//!
//! A fresh `build` sends its first requests side by side (the tag's GET and the upload sessions'
//! POSTs). Sent blindly, a registry that is down would get every one of them and their retries;
//! sent only after the GET's answer, they cost the push a round trip. So the POSTs wait for the
//! GET's connection instead: a layer over the HTTP client's connector says when the first
//! connection to the registry was made, or failed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tower_layer::Layer;
use tower_service::Service;

/// What the first connection attempt gave: `None` until one ends, then whether the registry took
/// it (`true` stays once any connection was made).
#[derive(Clone, Debug)]
pub struct ConnectionWatch {
    state: Arc<watch::Sender<Option<bool>>>,
}

impl ConnectionWatch {
    pub fn new() -> Self {
        ConnectionWatch { state: Arc::new(watch::channel(None).0) }
    }

    /// Waits for the end of the first connection attempt: whether the registry takes connections.
    pub async fn first_connection(&self) -> bool {
        let mut state = self.state.subscribe();
        let outcome = state.wait_for(Option::is_some).await.map(|s| *s);
        matches!(outcome, Ok(Some(true)))
    }

    fn connected(&self, made: bool) {
        self.state.send_if_modified(|state| match (*state, made) {
            (Some(true), _) | (Some(false), false) => false,
            _ => {
                *state = Some(made);
                true
            }
        });
    }
}

impl Default for ConnectionWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for ConnectionWatch {
    type Service = Watched<S>;

    fn layer(&self, inner: S) -> Watched<S> {
        Watched { inner, watch: self.clone() }
    }
}

/// The connector, reporting each attempt's outcome to its [`ConnectionWatch`].
#[derive(Clone, Debug)]
pub struct Watched<S> {
    inner: S,
    watch: ConnectionWatch,
}

impl<S, R> Service<R> for Watched<S>
where
    S: Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let connecting = self.inner.call(request);
        let watch = self.watch.clone();
        Box::pin(async move {
            let outcome = connecting.await;
            watch.connected(outcome.is_ok());
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_outcome_is_told_and_a_made_connection_stays_told() {
        let watch = ConnectionWatch::new();
        let waiting = tokio::spawn({
            let watch = watch.clone();
            async move { watch.first_connection().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "told before any attempt ended");
        watch.connected(false);
        assert!(!waiting.await.unwrap());
        watch.connected(true);
        assert!(watch.first_connection().await);
        watch.connected(false);
        assert!(watch.first_connection().await, "a later refusal does not undo a made connection");
    }
}
