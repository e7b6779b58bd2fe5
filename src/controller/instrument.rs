//! What wraps every reconcile, whatever its kind: a span naming the object, which every log line
//! of the reconcile carries (`kind`, `namespace`, `object`; not `name`, which the JSON log format
//! uses for the span's own name), the reconcile count, and the running part of the queue depth.
//! No reconcile starts before every watch cache holds its first complete list.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{info_span, Instrument};

use super::{Context, Error};

/// `reconcile`, instrumented; pass the result to `Controller::run`.
pub fn instrumented<K, F, Fut>(
    reconcile: F,
) -> impl FnMut(Arc<K>, Arc<Context>) -> BoxFuture<'static, Result<Action, Error>>
where
    K: Resource<DynamicType = ()>,
    F: Fn(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |object, ctx| {
        let kind = K::kind(&()).into_owned();
        let span = info_span!(
            "reconcile",
            kind = %kind,
            namespace = object.meta().namespace.as_deref().unwrap_or_default(),
            object = %object.name_any(),
        );
        let work = reconcile(object, ctx.clone());
        async move {
            // Reconciles read related objects from the caches: none runs on a partial view.
            ctx.caches.synced().await;
            let _running = ctx.metrics.running(&kind);
            let outcome = work.await;
            ctx.metrics.reconciled(&kind);
            outcome
        }
        .instrument(span)
        .boxed()
    }
}
