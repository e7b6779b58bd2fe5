//! An S3-compatible server on a local directory, in this process (s3s-fs, the same server the
//! tests run as a program): `workerbundle dev` stores uploads there, and the API and the
//! controllers reach it over HTTP on 127.0.0.1 as they would reach any store.

use std::net::SocketAddr;
use std::path::Path;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tracing::{debug, info};

/// A running store: its endpoint and the keys it accepts.
pub struct LocalS3 {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

/// Serves `root` (each directory a bucket) on 127.0.0.1 until `stop` completes.
pub async fn start(
    root: &Path,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<LocalS3, String> {
    std::fs::create_dir_all(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| format!("S3 store on {}: {e:?}", root.display()))?;
    let access_key = format!("dev{:016x}", fastrand::u64(..));
    let secret_key = format!("{:032x}", fastrand::u128(..));
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(access_key.clone(), secret_key.clone()));
    let service = builder.build();
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| format!("cannot listen for the S3 store: {e}"))?;
    let address = listener.local_addr().map_err(|e| format!("S3 store: {e}"))?;
    info!(%address, root = %root.display(), "S3 store serving");
    tokio::spawn(async move {
        let http = ConnBuilder::new(TokioExecutor::new());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(stop);
        loop {
            let socket = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => socket,
                    Err(e) => {
                        debug!(error = %e, "S3 store: accept failed");
                        continue;
                    }
                },
                () = &mut stop => break,
            };
            let connection = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
        // Open keep-alive connections would hold a graceful stop forever.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), graceful.shutdown()).await;
    });
    Ok(LocalS3 { endpoint: format!("http://{address}"), access_key, secret_key })
}
