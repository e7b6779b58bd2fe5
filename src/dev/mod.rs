//! `workerbundle dev`: the whole platform in one process, no cluster, no Docker, no root.
//!
//! - the in-memory API server as the control plane (its objects kept under `--data`);
//! - an S3-compatible store on a local directory (s3s-fs, served on 127.0.0.1);
//! - the Cloudflare-compatible API that `wrangler deploy` talks to;
//! - the controllers, building into an OCI image layout under `--data` (or a registry);
//! - a local runner that plays the kubelet for the bundles' Deployments.
//!
//! stdout carries what scripts read: `export CLOUDFLARE_...=` lines, then one `serving
//! ACCOUNT/SCRIPT on http://127.0.0.1:PORT` line per worker as it starts or changes. Logs go to
//! stderr. SIGINT or SIGTERM stops everything, every workerd included.

mod front_door;
mod identity;
mod lock;
mod ports;
mod process;
mod runner;
mod s3;
mod unpack;

pub use ports::PortRange;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tracing::info;

use crate::api::{ApiOptions, Placement, TokenSource};
use crate::build::BuildContext;
use crate::controller::{self, RunOptions, Settings};
use crate::image::reference::ImageRef;
use crate::registry::Registries;
use crate::source::S3Options;
use crate::startup_check::StartupChecker;

/// The bucket uploads go to.
pub const BUCKET: &str = "workers";
/// The namespace every account's objects live in.
pub const NAMESPACE: &str = "workers";

#[derive(Clone, Debug)]
pub struct DevOptions {
    /// Where everything is kept; a fresh temporary directory (removed at exit) when `None`.
    pub data: Option<PathBuf>,
    /// The API's address.
    pub listen: SocketAddr,
    /// The workerd base image; else the one assembled from the pinned archives into `--data`.
    pub base_image: Option<ImageRef>,
    /// Push images to `HOST[:PORT]/PATH/<account>` instead of the layout under `--data`.
    pub repository_prefix: Option<String>,
    /// Where the base image's package archives are (see `base-image`).
    pub archives: PathBuf,
    pub source_date_epoch: i64,
    /// Ports handed to new workers (each keeps its port for good).
    pub worker_ports: PortRange,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{0}")]
    Setup(String),
    #[error("the control plane: {0}")]
    Kube(#[from] kube::Error),
    #[error("the controllers stopped: {0}")]
    Controller(#[from] controller::RunError),
    #[error("the API stopped: {0}")]
    Api(#[from] crate::api::ServeError),
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(options: DevOptions, registries: Registries) -> Result<(), DevError> {
    let setup = |message: String| DevError::Setup(message);
    let temporary = match &options.data {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("workerbundle-dev-")
                .tempdir()
                .map_err(|e| setup(format!("cannot make a data directory: {e}")))?,
        ),
    };
    let data = match (&options.data, &temporary) {
        (Some(dir), _) => dir.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => return Err(setup("no data directory".into())),
    };
    std::fs::create_dir_all(&data).map_err(|e| setup(format!("cannot create {}: {e}", data.display())))?;
    let data = data.canonicalize().map_err(|e| setup(format!("{}: {e}", data.display())))?;
    // Before anything else, so that a second dev, or a port in use, stops here, changing nothing:
    // the data directory, then every port dev serves.
    let _lock = lock::lock(&data).map_err(setup)?;
    let ports = ports::PortTable::load(&data.join("ports.json"), options.worker_ports).map_err(setup)?;
    let bound = ports.bind_all().map_err(setup)?;
    let api_listener = std::net::TcpListener::bind(options.listen)
        .map_err(|e| setup(format!("cannot listen on {} (--listen): {e}", options.listen)))?;
    info!(data = %data.display(), "workerbundle dev starting");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    // The base image first: everything else is quick, this may take seconds the first time.
    let base = match &options.base_image {
        Some(base) => base.clone(),
        None => ensure_base(&data, &options).map_err(setup)?,
    };

    // The base image's own workerd loads each upload alone before it is stored (the start-up
    // check): the same binary the bundles run.
    let registries = Arc::new(registries);
    let workerd = base_workerd(&base, &data, &registries).await.map_err(setup)?;
    let startup_check = Some(StartupChecker::new(workerd, crate::startup_check::DEFAULT_TIMEOUT));

    // The control plane and the store.
    let control_plane =
        start_control_plane(&data.join("control-plane.json"), stopped()).await.map_err(setup)?;
    // So that kubectl (and benchmarks) can watch what the controllers do.
    // It holds the control plane's token: owner-only, like the data file.
    let kubeconfig = data.join("kubeconfig");
    let access = memory_apiserver::Access {
        token: Some(&control_plane.token),
        ca_pem: Some(control_plane.tls.ca_pem()),
    };
    memory_apiserver::write_kubeconfig(&kubeconfig, &control_plane.url, NAMESPACE, access)
        .map_err(|e| setup(format!("cannot write {}: {e}", kubeconfig.display())))?;
    info!("kubectl --kubeconfig {} get workerdeployments,workerbundles,deployments", kubeconfig.display());
    let client = control_plane.client.clone();
    install(&client).await?;
    let store = s3::start(&data.join("s3"), stopped()).await.map_err(setup)?;
    std::fs::create_dir_all(data.join("s3").join(BUCKET))
        .map_err(|e| setup(format!("cannot create the bucket: {e}")))?;
    let s3_options = S3Options {
        endpoint: Some(store.endpoint.clone()),
        static_credentials: Some((store.access_key.clone(), store.secret_key.clone())),
        ..S3Options::default()
    };
    let identity = identity::load_or_create(&data).map_err(setup)?;

    // The controllers.
    // Dev owns these layouts, and sweeps them of blobs no image references (see the runner).
    let layouts = options.repository_prefix.is_none().then(|| data.join("images"));
    let repository_prefix =
        options.repository_prefix.clone().unwrap_or_else(|| format!("oci:{}", data.join("images").display()));
    let run_options = RunOptions {
        namespace: None,
        concurrency: controller::Concurrency::default(),
        settings: Settings {
            repository_prefix: Some(repository_prefix),
            source_date_epoch: options.source_date_epoch,
            base_image: Some(base),
            // Workers run as local processes here: there is no pod network to police.
            network_policies: false,
            startup_check: startup_check.clone(),
        },
        health_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        leader_election: None,
    };
    let build = BuildContext {
        registries: registries.clone(),
        sources: crate::source::Sources::new(s3_options.clone()),
        // A redeploy that changes one module of a big worker deflates only its changed blocks.
        block_cache: crate::image::block_cache::BlockCache::open_or_warn(&data.join("blocks")).map(Arc::new),
    };
    let controllers = tokio::spawn(controller::run_with(client.clone(), run_options, build, stopped()));

    // The API; the exports once it listens.
    let api_options = ApiOptions {
        listen: options.listen,
        bucket: BUCKET.into(),
        tokens: TokenSource::File(identity.tokens_file.clone()),
        placement: Placement::Shared(NAMESPACE.into()),
        limits: Default::default(),
        s3: s3_options,
        startup_check,
    };
    let account = identity.account.clone();
    let token = identity.token.clone();
    let api = tokio::spawn(crate::api::serve_on(
        api_options,
        api_listener,
        client.clone(),
        stopped(),
        move |address| {
            // Scripts read these lines (`eval "$(... | head -3)"`): keep their shape.
            println!("export CLOUDFLARE_API_BASE_URL=http://{address}/client/v4");
            println!("export CLOUDFLARE_API_TOKEN={token}");
            println!("export CLOUDFLARE_ACCOUNT_ID={account}");
        },
    ));

    // The runner.
    let (runner, notices) =
        runner::Runner::new(client.clone(), registries, data.join("run"), layouts, ports, bound)
            .map_err(setup)?;
    let runner = tokio::spawn(runner.run(notices, stopped()));

    crate::shutdown_signal().await;
    info!("stopping");
    let _ = stop_tx.send(true);
    let (controllers, api, _) = tokio::join!(controllers, api, runner);
    drop(control_plane);
    if let Ok(result) = controllers {
        result?;
    }
    if let Ok(result) = api {
        result?;
    }
    info!("stopped");
    Ok(())
}

/// The base image in `DATA/base`, assembled from the pinned archives the first time.
fn ensure_base(data: &Path, options: &DevOptions) -> Result<ImageRef, String> {
    let dir = data.join("base");
    let reference = ImageRef::Layout { dir: dir.clone(), tag: Some("workerd".into()) };
    if dir.join("index.json").exists() {
        return Ok(reference);
    }
    eprintln!("assembling the workerd base image into {} (once; a few seconds)", dir.display());
    let recipe = crate::base_image::Recipe::parse(crate::base_image::BUILTIN_RECIPE)?;
    crate::base_image::build_base_image(
        &recipe,
        &options.archives,
        &dir,
        "workerd",
        options.source_date_epoch,
    )
    .map_err(|e| {
        format!("{e} (fetch the archives with base-images/workerd/fetch.py, or give --base-image)")
    })?;
    Ok(reference)
}

/// The workerd binary of the base image, unpacked under `DATA/workerd` (once per base digest;
/// apart from `DATA/run`, which the runner prunes).
async fn base_workerd(base: &ImageRef, data: &Path, registries: &Registries) -> Result<PathBuf, String> {
    let resolved = crate::build::read_base(base, registries).await.map_err(|e| e.to_string())?;
    let pinned = resolved.pinned();
    let image = pinned.strip_prefix("docker://").unwrap_or(&pinned);
    let unpacked =
        unpack::unpack(image, &data.join("workerd"), registries).await.map_err(|e| e.to_string())?;
    let workerd = unpacked.rootfs.join("usr/local/bin/workerd");
    if !workerd.is_file() {
        return Err(format!("the base image {base} has no /usr/local/bin/workerd"));
    }
    Ok(workerd)
}

/// The in-memory API server, in this process, and a client of it.
struct ControlPlane {
    client: Client,
    url: String,
    /// The bearer token the server requires, new at each start.
    token: String,
    /// The server's TLS identity (new at each start): clients trust its CA.
    tls: memory_apiserver::Tls,
}

/// Serves the in-memory API server on loopback, over TLS and requiring a token, both made here,
/// and keeps its objects (every Secret among them) in `data_file`, each change on disk before it
/// is answered. Other local users can reach the port and could read the data directory: the token
/// shuts the one, and making the directory owner-only (the file is already) shuts the other.
async fn start_control_plane(
    data_file: &Path,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<ControlPlane, String> {
    if let Some(dir) = data_file.parent() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private: {e}", dir.display()))?;
    }
    // 122 random bits from the operating system's generator.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let tls = memory_apiserver::Tls::generate().map_err(|e| format!("control plane: {e}"))?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| format!("cannot listen for the control plane: {e}"))?;
    let address = listener.local_addr().map_err(|e| format!("control plane: {e}"))?;
    let options = memory_apiserver::Options {
        data_file: Some(data_file.to_path_buf()),
        token: Some(token.clone()),
        tls: Some(tls.clone()),
        ..Default::default()
    };
    tokio::spawn(async move {
        if let Err(e) = memory_apiserver::serve(listener, options, stop).await {
            tracing::error!(error = %e, "the control plane stopped");
        }
    });
    let url = format!("https://{address}");
    let mut config = kube::Config::new(url.parse().map_err(|e| format!("control plane URL: {e}"))?);
    config.root_cert = Some(vec![tls.ca_der().to_vec()]);
    config.auth_info.token = Some(token.clone().into());
    let client = Client::try_from(config).map_err(|e| format!("control plane client: {e}"))?;
    info!(%address, "control plane serving");
    Ok(ControlPlane { client, url, token, tls })
}

/// The CRDs and the accounts' namespace.
async fn install(client: &Client) -> Result<(), kube::Error> {
    let params = PatchParams::apply("workerbundle-dev").force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::crd::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &params, &Patch::Apply(&crd)).await?;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace =
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}});
    namespaces.patch(NAMESPACE, &params, &Patch::Apply(&namespace)).await?;
    Ok(())
}
