//! `memory-apiserver`: the in-memory Kubernetes API server as a program, for trying kubectl or a
//! controller against it by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// An in-memory Kubernetes API server over plain HTTP, for tests and experiments.
///
/// Serves discovery, CRUD, watch, patch, server-side apply and CRDs for kubectl and kube-rs
/// clients. Everything lives in memory and is gone when the server stops, unless --data-file
/// keeps it. Prints the URL on stdout, then serves until SIGINT or SIGTERM.
#[derive(Parser)]
#[command(name = "memory-apiserver", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig for this server (cluster, user and current context) to this file.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Default namespace of the kubeconfig's context.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Keep the objects in this file (owner-only), each change written before it is answered, and
    /// load them from it at start.
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Require the bearer token this file holds on every request (the kubeconfig carries it).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("memory-apiserver: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    let address = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("memory-apiserver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let token = match &args.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                eprintln!("memory-apiserver: {} is empty", path.display());
                return std::process::ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("memory-apiserver: cannot read {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // With a token, HTTPS: kubectl sends credentials over TLS only.
    let tls = match token.as_ref().map(|_| memory_apiserver::Tls::generate()).transpose() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("memory-apiserver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let url = match &tls {
        Some(_) => format!("https://{address}"),
        None => format!("http://{address}"),
    };
    if let Some(path) = &args.kubeconfig {
        let access = memory_apiserver::Access {
            token: token.as_deref(),
            ca_pem: tls.as_ref().map(memory_apiserver::Tls::ca_pem),
        };
        if let Err(e) = memory_apiserver::write_kubeconfig(path, &url, &args.namespace, access) {
            eprintln!("memory-apiserver: cannot write {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    println!("{url}");
    let options = memory_apiserver::Options {
        listen: args.listen,
        data_file: args.data_file,
        token,
        tls,
        ..Default::default()
    };
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let signalled = stopping.clone();
    let serve = memory_apiserver::serve(listener, options, async move {
        stop_signal().await;
        signalled.notify_one();
    });
    // Open watches would keep a graceful shutdown waiting forever: give requests a moment, then go.
    let grace = async {
        stopping.notified().await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        Ok(())
    };
    let result = tokio::select! {
        result = serve => result,
        result = grace => result,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memory-apiserver: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
