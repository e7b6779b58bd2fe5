//! The `workerbundle` command line: parse, call the library, print.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use workerbundle::api::{self, ApiOptions, Limits as ApiLimits, Placement, TokenSource};
use workerbundle::base_image::{self, ControllerRecipe, Recipe, BUILTIN_CONTROLLER_RECIPE, BUILTIN_RECIPE};
use workerbundle::build::{build, BuildContext, BuildRequest};
use workerbundle::controller::{self, RunOptions, Settings};
use workerbundle::image::block_cache::BlockCache;
use workerbundle::image::reference::ImageRef;
use workerbundle::registry::pull::delete_image;
use workerbundle::registry::{Registries, RegistryOptions, RegistryRef};
use workerbundle::self_image::{self, Destination};
use workerbundle::source::s3::{S3Limits, S3Options};
use workerbundle::source::WorkerInput;
use workerbundle::startup_check::{self, StartupChecker};

#[derive(Parser)]
#[command(
    name = "workerbundle",
    version,
    about = "Cloudflare-style Workers in, one deterministic workerd container image out."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How to reach registries (for docker:// references).
#[derive(clap::Args, Clone, Default)]
struct RegistryArgs {
    /// Credentials for every registry, USER:PASS. Example: --creds ci:s3cret
    #[arg(long, value_name = "USER:PASS")]
    creds: Option<String>,
    /// A docker config.json (or a Kubernetes .dockerconfigjson) to take credentials from.
    /// Default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json.
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// Talk plain HTTP to registries on this machine (127.0.0.1, ::1, localhost); refused for
    /// any other host.
    #[arg(long)]
    insecure: bool,
    /// Pace the requests to each registry to at most N per second, evenly spaced (retries and
    /// token requests count). 0: as fast as the registry answers. Example:
    /// --registry-requests-per-second 50
    #[arg(long, value_name = "N", default_value_t = 0)]
    registry_requests_per_second: u32,
}

/// Where S3 worker sources are read from.
#[derive(clap::Args, Clone)]
struct S3Args {
    /// An S3-compatible endpoint (path-style addressing). Default: AWS_ENDPOINT_URL, else AWS S3.
    /// Credentials come from the standard chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the
    /// profile (AWS_PROFILE), web identity. Example: --s3-endpoint http://127.0.0.1:8014
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Region. Default: AWS_REGION or the profile's, else us-east-1.
    #[arg(long, value_name = "REGION")]
    s3_region: Option<String>,
    /// Most objects one worker source may hold.
    #[arg(long, value_name = "N", default_value_t = S3Limits::default().max_objects)]
    s3_max_objects: usize,
    /// Largest object, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = S3Limits::default().max_object_bytes)]
    s3_max_object_bytes: u64,
    /// Largest total of one worker source, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = S3Limits::default().max_total_bytes)]
    s3_max_total_bytes: u64,
}

impl S3Args {
    fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            limits: S3Limits {
                max_objects: self.s3_max_objects,
                max_object_bytes: self.s3_max_object_bytes,
                max_total_bytes: self.s3_max_total_bytes,
            },
            ..S3Options::default()
        }
    }
}

impl RegistryArgs {
    fn registries(&self) -> Registries {
        Registries::new(RegistryOptions {
            creds: self.creds.clone(),
            authfile: self.authfile.clone(),
            insecure: self.insecure,
            requests_per_second: self.registry_requests_per_second,
            ..Default::default()
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Build workers into one workerd image over a base image.
    ///
    /// Each worker is a set of modules (a directory, or objects in S3) plus an optional
    /// metadata.json in Cloudflare's upload format (main_module, compatibility_date,
    /// compatibility_flags, bindings of type plain_text, json and secret_text). Each worker gets
    /// its own layer; a small top-level layer holds the workerd config. The same inputs always
    /// give the same image digest, which is printed as the last line of stdout.
    ///
    /// Example:
    ///   workerbundle build --base oci:base:workerd \
    ///     --worker hello=testdata/workers/hello --worker secret=testdata/workers/secret@9000 \
    ///     --output oci:out:latest
    ///   workerbundle build --base docker://127.0.0.1:5000/workerd-base:1 --insecure \
    ///     --worker hello=testdata/workers/hello --output docker://127.0.0.1:5000/acct/app:v2
    #[command(verbatim_doc_comment)]
    Build {
        /// Base image with workerd: oci:DIR[:TAG] (an OCI image layout; the tag may be left out
        /// when the layout holds one image) or docker://HOST[:PORT]/REPO:TAG|@DIGEST.
        /// Example: --base oci:base:workerd
        #[arg(long, value_name = "REF", value_parser = ImageRef::parse)]
        base: ImageRef,
        /// A worker: NAME=SOURCE[@PORT]. SOURCE is a directory, s3://BUCKET/PREFIX/ (every object
        /// under the prefix) or s3://BUCKET/KEY (one module). NAME is a DNS-1123 label; ports
        /// default to 8080, 8081, ... in the order given. Repeat for more workers.
        /// Example: --worker api=./api@8080 --worker auth=s3://workers/1234/auth/v3/
        #[arg(long = "worker", value_name = "NAME=SOURCE[@PORT]", required = true, value_parser = WorkerInput::parse)]
        workers: Vec<WorkerInput>,
        /// Prefix of the environment variables that carry a worker's secrets: NAME=PREFIX. The
        /// default for worker my-api is MY_API_, so secret KEY is read from MY_API_KEY.
        /// Example: --env-prefix api=API_
        #[arg(long = "env-prefix", value_name = "NAME=PREFIX", value_parser = parse_env_prefix)]
        env_prefixes: Vec<(String, String)>,
        /// Where to write the image: oci:DIR:TAG (a new directory is created whole or not at all;
        /// an existing layout gains the tag) or docker://HOST[:PORT]/REPO:TAG (only blobs the
        /// registry lacks are sent; the tag moves last). Example: --output oci:out:latest
        #[arg(long, value_name = "REF", value_parser = ImageRef::parse)]
        output: ImageRef,
        /// Value of org.opencontainers.image.base.name. Default: the base's tag for a layout, the
        /// reference (HOST/REPO:TAG) for a registry.
        #[arg(long, value_name = "NAME")]
        base_name: Option<String>,
        /// Timestamp for every file, the config's `created` and the created annotation, in seconds
        /// since the epoch.
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0, value_name = "SECONDS")]
        source_date_epoch: i64,
        /// Where the deflated blocks of worker layers are kept between builds, so that a build
        /// which changes one module of a worker deflates only the blocks whose bytes changed; and
        /// what the last push to each repository left there, so that a push within the hour
        /// after it need not ask the registry. The image is the same with or without it. Kept
        /// under 512 MiB (least recently used entries go first). Default:
        /// $XDG_CACHE_HOME/workerbundle/blocks, else ~/.cache/workerbundle/blocks.
        #[arg(long, env = "WORKERBUNDLE_CACHE_DIR", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Deflate every block and ask the registry what the repository holds; neither read nor
        /// write the cache.
        #[arg(long)]
        no_cache: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        s3: Box<S3Args>,
    },
    /// Delete an image from a registry by digest (registries delete by digest, not by tag).
    ///
    /// Example:
    ///   workerbundle delete docker://127.0.0.1:5000/acct/app@sha256:... --insecure
    #[command(verbatim_doc_comment)]
    Delete {
        /// docker://HOST[:PORT]/REPO@sha256:...
        #[arg(value_name = "REF", value_parser = ImageRef::parse)]
        image: ImageRef,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Assemble the workerd base image from pinned package archives (no Docker, no network).
    ///
    /// Reads the npm tarball of workerd and the Debian packages of glibc and CA certificates from
    /// the archive cache (fill it with base-images/workerd/fetch.py), checks each against the
    /// sha256 pinned in the recipe, and writes a two-layer image. Prints the manifest digest last.
    ///
    /// Example:
    ///   python3 base-images/workerd/fetch.py && workerbundle base-image --output oci:base:workerd
    #[command(verbatim_doc_comment)]
    BaseImage {
        /// Where to write the image: oci:DIR:TAG.
        #[arg(long, value_name = "REF", value_parser = ImageRef::parse)]
        output: ImageRef,
        /// Directory holding the package archives. Default: $WORKERBUNDLE_ARCHIVES, else
        /// ~/.cache/workerbundle/archives.
        #[arg(long, value_name = "DIR")]
        archives: Option<PathBuf>,
        /// A recipe other than the built-in base-images/workerd/recipe.json.
        #[arg(long, value_name = "FILE")]
        recipe: Option<PathBuf>,
        /// Timestamp for every file and the config, in seconds since the epoch.
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0, value_name = "SECONDS")]
        source_date_epoch: i64,
    },
    /// Build workerbundle's own image (the controller's) with its own builder: no Docker.
    ///
    /// Two layers: the runtime of the workerd base image (glibc and CA certificates, the same
    /// pinned Debian archives) plus libgcc_s and liblzma, then the workerbundle binary at
    /// /usr/local/bin/workerbundle. The image runs as 65532:65532 with the entrypoint
    /// `workerbundle run` (a Deployment's args add its flags), a /tmp for an emptyDir under a
    /// read-only root, and is labelled with this version. The binary is this one, or --binary;
    /// it is checked to find every library it links against in the image. The same binary,
    /// archives and SOURCE_DATE_EPOCH give the same digest, printed as the last line of stdout.
    ///
    /// Fill the archive cache first (scripts/setup does):
    ///   python3 base-images/workerd/fetch.py --recipe base-images/controller/recipe.json
    ///
    /// Example:
    ///   workerbundle self-image --output docker://registry.example.com/workerbundle:0.1.0
    ///   workerbundle self-image --binary target/release/workerbundle --output oci:out/controller:0.1.0
    #[command(verbatim_doc_comment)]
    SelfImage {
        /// Where to write the image: oci:DIR:TAG (a new directory is created whole or not at all;
        /// an existing layout gains the tag) or docker://HOST[:PORT]/REPO:TAG. Checked before
        /// anything is assembled.
        #[arg(long, value_name = "REF", value_parser = ImageRef::parse)]
        output: ImageRef,
        /// The workerbundle binary to put in the image (a build of this same version: the image is
        /// labelled with it). Default: the running executable.
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
        /// Directory holding the package archives. Default: $WORKERBUNDLE_ARCHIVES, else
        /// ~/.cache/workerbundle/archives.
        #[arg(long, value_name = "DIR")]
        archives: Option<PathBuf>,
        /// A recipe other than the built-in base-images/controller/recipe.json.
        #[arg(long, value_name = "FILE")]
        recipe: Option<PathBuf>,
        /// Timestamp for every file, the config's `created` and the created annotation, in seconds
        /// since the epoch.
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0, value_name = "SECONDS")]
        source_date_epoch: i64,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Print the CustomResourceDefinitions of workerbundle.dev/v1alpha1 as YAML.
    ///
    /// The same YAML is checked in as deploy/crds.yaml.
    ///
    /// Example:
    ///   workerbundle crd | kubectl apply -f -
    #[command(verbatim_doc_comment)]
    Crd,
    /// Run the controller: WorkerDeployment → WorkerRelease (worker layer built and pushed),
    /// WorkerAccount → WorkerBundle, and WorkerBundle → one image → a Deployment and Service.
    ///
    /// Connects with KUBECONFIG (or ~/.kube/config), else the in-cluster service account, and
    /// checks that the CRDs are installed. Each WorkerRelease's scripts are read from S3, its
    /// worker's layer is built and pushed to the account's repository: the WorkerAccount's
    /// spec.repository, else --repository-prefix/<account>. Each WorkerBundle's image (the base,
    /// its workers' layers and a small config layer) is pushed there too and rolled out by a
    /// Deployment; the image before it is deleted once the new one runs everywhere. An account's
    /// image pull secret (spec.podTemplate.imagePullSecret) is used to push; --creds/--authfile
    /// are the fallback. Stops cleanly on SIGINT/SIGTERM.
    ///
    /// Replicas elect a leader through a coordination.k8s.io Lease; only the leader reconciles.
    /// The leader renews the lease every third of --lease-duration and exits non-zero when it
    /// could not renew for two thirds of it; on SIGTERM it finishes its reconciles and releases
    /// the lease, so a follower takes over at its next look (every eighth of --lease-duration).
    /// After a crash, a follower takes over once the lease has gone unrenewed for --lease-duration.
    ///
    /// Serves /healthz (200 while running), /readyz (200 once the watch caches are filled, or
    /// while standing by as a follower) and /metrics (Prometheus) on --health-listen.
    ///
    /// Example:
    ///   workerbundle run --repository-prefix 127.0.0.1:5000/workers --insecure \
    ///     --base-image docker://127.0.0.1:5000/workerd-base:1 --s3-endpoint http://127.0.0.1:8014 \
    ///     --health-listen 127.0.0.1:8080
    ///   curl -s 127.0.0.1:8080/metrics | grep workerbundle_reconciles_total
    #[command(verbatim_doc_comment)]
    Run {
        /// Watch this namespace only. Default: every namespace.
        #[arg(long, value_name = "NAMESPACE")]
        namespace: Option<String>,
        /// Registry and path under which each account gets a repository named after it
        /// (the release's workerbundle.dev/account label, else its namespace).
        /// Example: --repository-prefix registry.example.com/workers
        #[arg(long, value_name = "HOST[:PORT]/PATH")]
        repository_prefix: Option<String>,
        /// The workerd base image of bundles whose account names none (spec.baseImage):
        /// docker://HOST[:PORT]/REPO:TAG|@DIGEST or oci:DIR[:TAG]. Each bundle pins it by digest
        /// the first time it is built. Example: --base-image docker://registry.example.com/workerd-base:1
        #[arg(long, value_name = "REF", value_parser = ImageRef::parse)]
        base_image: Option<ImageRef>,
        /// WorkerDeployments, and WorkerAccounts, reconciled at once (each only reads caches and
        /// writes to the Kubernetes API).
        #[arg(long, value_name = "N", default_value_t = controller::Concurrency::default().accounts, value_parser = clap::value_parser!(u16).range(1..=256))]
        concurrency: u16,
        /// WorkerReleases, and WorkerBundles, reconciled at once (each reads S3 or pushes to the
        /// registry).
        #[arg(long, value_name = "N", default_value_t = controller::Concurrency::default().bundles, value_parser = clap::value_parser!(u16).range(1..=256))]
        build_concurrency: u16,
        /// Timestamp for every file of the layers built, in seconds since the epoch.
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0, value_name = "SECONDS")]
        source_date_epoch: i64,
        /// Give each bundle's pods a NetworkPolicy: ingress from anything but another account's
        /// workers; egress to DNS and to addresses outside the private ranges only (no other pods,
        /// nodes or metadata service). Enforced only where the cluster's network plugin enforces
        /// NetworkPolicies. With false, none is made or watched (existing ones stay until their
        /// bundle goes).
        #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
        network_policies: bool,
        /// Where deflated blocks of worker layers are kept, so that a release changing one module
        /// of a big worker deflates only the blocks whose bytes changed (the layer is the same
        /// with or without it). Kept under 512 MiB. In a pod, an emptyDir. Default: none, every
        /// layer deflated whole.
        #[arg(long, env = "WORKERBUNDLE_CACHE_DIR", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
        #[command(flatten)]
        s3: Box<S3Args>,
        #[command(flatten)]
        operations: OperationsArgs,
        #[command(flatten)]
        startup: StartupCheckArgs,
    },
    /// Serve the Cloudflare-compatible API that unmodified wrangler deploys to.
    ///
    /// Point wrangler at the URL this prints (CLOUDFLARE_API_BASE_URL) with a token from the
    /// token table (CLOUDFLARE_API_TOKEN). Uploads are validated whole, stored in S3 under
    /// <account>/<script>/<version-id>/, and the WorkerDeployment of (account, script) is
    /// server-side-applied to run them; `wrangler secret put` writes the Secret <script>-secrets.
    /// Connects to Kubernetes with KUBECONFIG (or ~/.kube/config), else the in-cluster service
    /// account. Logs one line per request on stderr; stops cleanly on SIGINT/SIGTERM.
    ///
    /// Example:
    ///   workerbundle api --listen 127.0.0.1:8787 --bucket workers --tokens tokens \
    ///     --namespace workers --s3-endpoint http://127.0.0.1:8014
    ///   CLOUDFLARE_API_BASE_URL=http://127.0.0.1:8787/client/v4 CLOUDFLARE_API_TOKEN=... \
    ///     CLOUDFLARE_ACCOUNT_ID=1234 npx wrangler deploy
    #[command(verbatim_doc_comment)]
    Api(Box<ApiArgs>),
    /// The whole platform on this machine, in one process: no cluster, no Docker, no root.
    ///
    /// Runs the Cloudflare-compatible API, an in-memory Kubernetes API server as the control
    /// plane, the controllers, an S3-compatible store on a local directory, an OCI image layout
    /// as the image target, and a local runner that starts each bundle's workerd as a pod would
    /// (its Secrets' values in the environment) and replaces it when the image or a secret
    /// changes. The first run assembles the workerd base image from the pinned archives (fetch
    /// them with base-images/workerd/fetch.py) unless --base-image names one.
    ///
    /// stdout carries, for scripts, three `export CLOUDFLARE_...=` lines for wrangler, then
    /// `serving ACCOUNT/SCRIPT on http://127.0.0.1:PORT` whenever a worker starts or changes.
    /// Logs go to stderr: by default a line or two per deploy (the workerd that serves it,
    /// anything that went wrong, every worker's console lines); RUST_LOG=info adds every API
    /// request and reconcile. Ctrl-C stops everything, every workerd included. DATA/kubeconfig
    /// lets kubectl look at the control plane while dev runs.
    ///
    /// Example:
    ///   workerbundle dev --data .workerbundle > dev.out &
    ///   eval "$(head -3 dev.out)"      # once the exports are there
    ///   cd my-worker && npx wrangler deploy
    ///   curl http://127.0.0.1:8080/    # the URL dev.out names
    #[command(verbatim_doc_comment)]
    Dev {
        /// Keep everything here (objects, uploads, images, the account and token) across
        /// restarts. Default: a temporary directory removed at exit.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Where the API listens (CLOUDFLARE_API_BASE_URL).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8787")]
        listen: std::net::SocketAddr,
        /// The workerd base image: oci:DIR[:TAG] or docker://HOST/REPO:TAG|@DIGEST. Default: the
        /// one assembled from the pinned archives into DATA/base.
        #[arg(long, value_name = "REF", value_parser = ImageRef::parse)]
        base_image: Option<ImageRef>,
        /// Push images to a registry (HOST[:PORT]/PATH; each account gets PATH/<account>)
        /// instead of the OCI layout under DATA/images.
        #[arg(long, value_name = "HOST[:PORT]/PATH")]
        repository_prefix: Option<String>,
        /// Where the base image's package archives are. Default: $WORKERBUNDLE_ARCHIVES, else
        /// ~/.cache/workerbundle/archives.
        #[arg(long, value_name = "DIR")]
        archives: Option<PathBuf>,
        /// Host ports for the workers, on 127.0.0.1. Each worker keeps the port it got, across
        /// redeploys and restarts (DATA/ports.json); a new worker takes the lowest free one, and
        /// a port another process holds is skipped with a warning naming it.
        /// Example: --worker-ports 9000-9099
        #[arg(long, value_name = "FIRST-LAST", default_value = "8080-8179", value_parser = workerbundle::dev::PortRange::parse)]
        worker_ports: workerbundle::dev::PortRange,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// The `api` subcommand's arguments (boxed in [`Command`]: they are many).
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("token_source").required(true).args(["tokens", "tokens_secret"])))]
#[command(group(clap::ArgGroup::new("placement").required(true).args(["namespace", "namespace_per_account"])))]
struct ApiArgs {
    /// Address to listen on; port 0 picks a free port. The URL to give wrangler as
    /// CLOUDFLARE_API_BASE_URL is printed on stdout. Example: --listen 127.0.0.1:8787
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8787")]
    listen: std::net::SocketAddr,
    /// The S3 bucket uploads are stored in, as <account>/<script>/<version-id>/.
    /// Example: --bucket workers
    #[arg(long, value_name = "BUCKET")]
    bucket: String,
    /// The token table: one `ACCOUNT_ID SHA256_HEX_OF_TOKEN` line per token and account ('#'
    /// comments). It holds no live token; it is re-read when it changes.
    /// Example: printf '1234 %s\n' "$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)" > tokens
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// The same table in the key `tokens` of a Kubernetes Secret, re-read every few seconds.
    /// Example: --tokens-secret workerbundle/api-tokens
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_namespaced)]
    tokens_secret: Option<(String, String)>,
    /// Put every account's objects (WorkerAccount, WorkerDeployments, Secrets) in this namespace.
    /// Example: --namespace workers
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Put each account's objects in its own namespace, workers-<account>, created on first upload.
    #[arg(long)]
    namespace_per_account: bool,
    /// Largest upload, in bytes (Cloudflare's paid-plan limit is 10 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = ApiLimits::default().max_upload_bytes)]
    max_upload_bytes: usize,
    /// Most modules in one upload.
    #[arg(long, value_name = "N", default_value_t = ApiLimits::default().max_modules)]
    max_modules: usize,
    /// Largest single module, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = ApiLimits::default().max_module_bytes)]
    max_module_bytes: usize,
    /// Requests one token may make per minute (0: no limit).
    #[arg(long, value_name = "N", default_value_t = ApiLimits::default().requests_per_minute)]
    rate_limit: u32,
    #[command(flatten)]
    s3: S3Args,
    #[command(flatten)]
    startup: StartupCheckArgs,
}

fn parse_namespaced(text: &str) -> Result<(String, String), String> {
    text.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
        .ok_or_else(|| format!("{text:?} must look like NAMESPACE/NAME"))
}

/// The start-up check of `api` and `run`: each worker is loaded alone in workerd before it is
/// stored or released, and refused with workerd's words when it cannot start.
#[derive(clap::Args, Clone)]
struct StartupCheckArgs {
    /// The workerd that loads each worker for the check: the base image's own (same version as
    /// the bundles run). Default: /usr/local/bin/workerd (where workerbundle's own image has it),
    /// else `workerd` on PATH. Example: --workerd ./node_modules/.bin/workerd
    #[arg(long, env = "WORKERBUNDLE_WORKERD", value_name = "PATH")]
    workerd: Option<PathBuf>,
    /// How long a worker may take to load and run its top-level code, in seconds; past it workerd
    /// is killed and the worker refused (a top-level loop never ends).
    #[arg(long, value_name = "SECONDS", default_value_t = startup_check::DEFAULT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=120))]
    startup_timeout: u64,
    /// Store and release workers without loading them first. One that throws at start-up then
    /// stops every worker of its account until it is replaced.
    #[arg(long, conflicts_with = "workerd")]
    no_startup_check: bool,
}

impl StartupCheckArgs {
    fn checker(&self) -> Result<Option<StartupChecker>, String> {
        if self.no_startup_check {
            tracing::warn!("--no-startup-check: workers are stored and released without loading them first");
            return Ok(None);
        }
        let workerd = match &self.workerd {
            Some(path) => path.clone(),
            None => default_workerd().ok_or(
                "no workerd for the start-up check: give --workerd PATH (the base image's workerd), \
                 or --no-startup-check to store workers without loading them",
            )?,
        };
        if !workerd.is_file() {
            return Err(format!("--workerd {}: no such file", workerd.display()));
        }
        Ok(Some(StartupChecker::new(workerd, std::time::Duration::from_secs(self.startup_timeout))))
    }
}

/// /usr/local/bin/workerd, else `workerd` on PATH.
fn default_workerd() -> Option<PathBuf> {
    let installed = PathBuf::from("/usr/local/bin/workerd");
    if installed.is_file() {
        return Some(installed);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("workerd")).find(|p| p.is_file())
}

/// Probes, metrics and leader election of `run`.
#[derive(clap::Args, Clone)]
struct OperationsArgs {
    /// Address of /healthz, /readyz and /metrics. Port 0 picks a free port (logged at start).
    /// Example: --health-listen 127.0.0.1:9090
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    health_listen: std::net::SocketAddr,
    /// Reconcile only while holding the Lease (several replicas, one acting). `false` acts at
    /// once: run a single replica then.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(long, value_name = "NAME", default_value = "workerbundle-controller")]
    lease_name: String,
    /// Namespace of the Lease. Default: $POD_NAMESPACE (the controller's own, where
    /// deploy/rbac.yaml lets it hold the Lease), else --namespace, else the namespace of the
    /// kubeconfig context.
    #[arg(long, value_name = "NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long a lease lasts unrenewed, in seconds; a follower takes over a crashed leader's
    /// lease after this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=600))]
    lease_duration: u64,
    /// This replica's name in the Lease. Default: $POD_NAME, else HOSTNAME-PID.
    #[arg(long, value_name = "NAME")]
    lease_identity: Option<String>,
}

impl OperationsArgs {
    fn lease(&self) -> Option<controller::LeaseOptions> {
        self.leader_election.then(|| controller::LeaseOptions {
            name: self.lease_name.clone(),
            namespace: self.lease_namespace.clone(),
            identity: self.lease_identity.clone().unwrap_or_else(controller::leader::default_identity),
            duration: std::time::Duration::from_secs(self.lease_duration),
        })
    }
}

fn parse_env_prefix(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(n, p)| (n.to_owned(), p.to_owned()))
        .ok_or_else(|| format!("--env-prefix {text:?} must look like NAME=PREFIX"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        // A person watching a terminal: a deploy is a line or two (the workerd that serves it,
        // what went wrong); RUST_LOG=info adds every request and reconcile.
        Command::Dev { .. } => DEV_LOG_FILTER,
        _ => "info",
    };
    init_logging(cli.log_format, default_filter);
    // Fails only when a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    // Every task whose work matters was awaited inside `run`; what is left are idle connections
    // and idle blocking threads. Waiting for each to wind down cost a fresh `build` ~2 ms of its
    // ~35 ms push.
    runtime.shutdown_background();
    // Benchmarks only (WORKERBUNDLE_RECORD_REQUESTS): the requests still queued for the file.
    workerbundle::registry::record::finish();
    match result {
        Ok(output) => {
            if !output.is_empty() {
                println!("{}", output.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<String, String> {
    match command {
        Command::Build {
            base,
            mut workers,
            env_prefixes,
            output,
            base_name,
            source_date_epoch,
            cache_dir,
            no_cache,
            registry,
            s3,
        } => {
            for (name, prefix) in env_prefixes {
                let worker = workers.iter_mut().find(|w| w.name == name).ok_or_else(|| {
                    format!("--env-prefix names worker {name:?}, which no --worker defines")
                })?;
                worker.env_prefix = Some(prefix);
            }
            let request = BuildRequest { base, base_name, workers, output, source_date_epoch };
            let cache = if no_cache { None } else { open_block_cache(cache_dir) };
            let context = BuildContext::new(registry.registries(), s3.options()).with_block_cache(cache);
            let outcome = build(&request, &context).await.map_err(|e| e.to_string())?;
            if let Some(cache) = &context.block_cache {
                cache.trim_if_due();
            }
            if let Some(push) = &outcome.push {
                eprintln!(
                    "pushed: {} uploaded, {} mounted, {} already there; {} registry requests",
                    push.uploaded, push.mounted, push.skipped, push.requests
                );
            }
            Ok(outcome.manifest_digest.to_string())
        }
        Command::Delete { image, registry } => {
            let ImageRef::Registry(r) = &image else {
                return Err(format!("{image} is not a registry reference (docker://...)"));
            };
            let digest = r.digest.clone().ok_or("delete needs a digest: docker://HOST/REPO@sha256:...")?;
            let client = registry.registries().client(&r.registry).map_err(|e| e.to_string())?;
            let deleted = delete_image(&client, &r.repository, &digest).await.map_err(|e| e.to_string())?;
            if !deleted {
                eprintln!("{image} was already gone");
            }
            Ok(digest.to_string())
        }
        Command::BaseImage { output, archives, recipe, source_date_epoch } => {
            let recipe = Recipe::parse(&recipe_text(recipe.as_deref(), BUILTIN_RECIPE)?)?;
            let ImageRef::Layout { dir, tag: Some(tag) } = output else {
                return Err("--output of base-image must be an OCI layout with a tag: oci:DIR:TAG".into());
            };
            let archives = archives.unwrap_or_else(base_image::default_archive_dir);
            let digest = base_image::build_base_image(&recipe, &archives, &dir, &tag, source_date_epoch)
                .map_err(|e| e.to_string())?;
            Ok(digest.to_string())
        }
        Command::SelfImage { output, binary, archives, recipe, source_date_epoch, registry } => {
            let recipe =
                ControllerRecipe::parse(&recipe_text(recipe.as_deref(), BUILTIN_CONTROLLER_RECIPE)?)?;
            let binary = match binary {
                Some(path) => path,
                None => std::env::current_exe().map_err(|e| {
                    format!("cannot find the running executable (name one with --binary): {e}")
                })?,
            };
            let archives = archives.unwrap_or_else(base_image::default_archive_dir);
            let destination =
                Destination::open(&output, registry.registries()).await.map_err(|e| e.to_string())?;
            let started = std::time::Instant::now();
            let image = tokio::task::spawn_blocking(move || {
                self_image::assemble_self_image(&recipe, &archives, &binary, source_date_epoch)
            })
            .await
            .map_err(|e| format!("image assembly stopped: {e}"))?
            .map_err(|e| e.to_string())?;
            tracing::info!(
                bytes = image.size(),
                seconds = started.elapsed().as_secs_f64(),
                digest = %image.manifest.digest,
                "image assembled"
            );
            if let Some(push) = destination.write(&image).await.map_err(|e| e.to_string())? {
                eprintln!(
                    "pushed: {} uploaded, {} already there; {} registry requests",
                    push.uploaded, push.skipped, push.requests
                );
            }
            Ok(image.manifest.digest.to_string())
        }
        Command::Crd => workerbundle::crd::crds_yaml(),
        Command::Run {
            namespace,
            repository_prefix,
            base_image,
            concurrency,
            build_concurrency,
            source_date_epoch,
            network_policies,
            cache_dir,
            registry,
            s3,
            operations,
            startup,
        } => {
            if let Some(prefix) = &repository_prefix {
                RegistryRef::parse(prefix).map_err(|e| format!("--repository-prefix: {e}"))?;
            }
            let options = RunOptions {
                namespace,
                concurrency: controller::Concurrency::new(concurrency, build_concurrency),
                settings: Settings {
                    repository_prefix,
                    source_date_epoch,
                    base_image,
                    network_policies,
                    startup_check: startup.checker()?,
                },
                health_listen: operations.health_listen,
                leader_election: operations.lease(),
            };
            let cache = cache_dir.and_then(|dir| BlockCache::open_or_warn(&dir));
            let build = BuildContext::new(registry.registries(), s3.options()).with_block_cache(cache);
            controller::run(options, build).await.map_err(|e| e.to_string())?;
            Ok(String::new())
        }
        Command::Dev { data, listen, base_image, repository_prefix, archives, worker_ports, registry } => {
            if let Some(prefix) = &repository_prefix {
                RegistryRef::parse(prefix).map_err(|e| format!("--repository-prefix: {e}"))?;
            }
            let options = workerbundle::dev::DevOptions {
                data,
                listen,
                base_image,
                repository_prefix,
                archives: archives.unwrap_or_else(base_image::default_archive_dir),
                source_date_epoch: 0,
                worker_ports,
            };
            workerbundle::dev::run(options, registry.registries()).await.map_err(|e| e.to_string())?;
            Ok(String::new())
        }
        Command::Api(args) => {
            let ApiArgs {
                listen,
                bucket,
                tokens,
                tokens_secret,
                namespace,
                namespace_per_account: _,
                max_upload_bytes,
                max_modules,
                max_module_bytes,
                rate_limit,
                s3,
                startup,
            } = *args;
            let tokens = match (tokens, tokens_secret) {
                (Some(file), _) => TokenSource::File(file),
                (None, Some((namespace, name))) => TokenSource::Secret { namespace, name },
                (None, None) => return Err("give --tokens FILE or --tokens-secret NAMESPACE/NAME".into()),
            };
            let placement = match namespace {
                Some(namespace) => Placement::Shared(namespace),
                None => Placement::PerAccount,
            };
            let options = ApiOptions {
                listen,
                bucket,
                tokens,
                placement,
                limits: ApiLimits {
                    max_upload_bytes,
                    max_modules,
                    max_module_bytes,
                    requests_per_minute: rate_limit,
                },
                s3: s3.options(),
                startup_check: startup.checker()?,
            };
            // The URL goes to stdout as soon as the port is bound: scripts and tests read it.
            api::serve(options, |addr| {
                use std::io::Write;
                let mut stdout = std::io::stdout();
                let _ = writeln!(stdout, "http://{addr}{}", api::BASE_PATH);
                let _ = stdout.flush();
            })
            .await
            .map_err(|e| e.to_string())?;
            Ok(String::new())
        }
    }
}

/// A recipe file's text, or the built-in recipe.
fn recipe_text(path: Option<&std::path::Path>, builtin: &str) -> Result<String, String> {
    match path {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| format!("cannot read recipe {}: {e}", path.display()))
        }
        None => Ok(builtin.to_owned()),
    }
}

/// `workerbundle dev`'s log filter when RUST_LOG is unset.
const DEV_LOG_FILTER: &str = "info,kube=warn,workerbundle::api=warn,workerbundle::controller=warn,\
                              workerbundle::source=warn,workerbundle::registry=warn,workerbundle::image=warn";

fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    // Colours only for a person at a terminal: never escape codes in a log file or collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // WORKERBUNDLE_SPAN_TIMES=1: a line with the busy and idle time of every span as it closes
    // (where a build's milliseconds go: reading, assembly, each registry step).
    let span_events = match std::env::var_os("WORKERBUNDLE_SPAN_TIMES") {
        Some(_) => tracing_subscriber::fmt::format::FmtSpan::CLOSE,
        None => tracing_subscriber::fmt::format::FmtSpan::NONE,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_span_events(span_events);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The block cache for `build`: `dir`, else the default one. A cache that cannot be opened is a
/// warning, not an error: the build only deflates more.
fn open_block_cache(dir: Option<PathBuf>) -> Option<BlockCache> {
    BlockCache::open_or_warn(&dir.or_else(BlockCache::default_dir)?)
}
