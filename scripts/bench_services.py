"""The services the controller benchmarks run against, all on 127.0.0.1: the CNCF registry
(Debian's docker-registry) holding the workerd base image, the S3 server (s3s-fs) and the
in-memory Kubernetes API server with the CRDs applied. Used by scripts/bench-scale and
scripts/bench-controller-push; each process logs to a file in the work directory."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port


class Services:
    def __init__(self, name):
        self.name = name
        self.work = tempfile.mkdtemp(prefix=f"{name}-")
        self.children = []
        self.procs = {}  # by log name without ".log": what CPU time is read from

    def start(self, args, log, env=None):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, log), "w"),
                             env={**os.environ, **(env or {})})
        self.children.append(p)
        self.procs[log.rsplit(".", 1)[0]] = p
        return p

    def wait_http(self, url, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url, timeout=2).read(); return
            except Exception:
                time.sleep(0.05)
        sys.exit(f"{self.name}: {url} did not come up; logs in {self.work}")

    def cleanup(self, *_):
        for p in self.children:
            if p.poll() is None:
                p.terminate()
        for p in self.children:
            try: p.wait(timeout=10)
            except Exception: p.kill()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(self.work, ignore_errors=True)

    def registry(self):
        """Starts the registry with the base image (BASE_LAYOUT) in it as workerd-base:1; returns HOST:PORT."""
        port = free_port()
        with open(os.path.join(self.work, "registry.yml"), "w") as f:
            f.write(f"version: 0.1\nlog: {{ level: {os.environ.get('REGISTRY_LOG_LEVEL', 'error')} }}\nstorage: {{ filesystem: {{ rootdirectory: {self.work}/registry }}, delete: {{ enabled: true }} }}\n"
                    f"http: {{ addr: 127.0.0.1:{port}, secret: bench }}\n")
        self.start(["docker-registry", "serve", os.path.join(self.work, "registry.yml")], "registry.log")
        self.wait_http(f"http://127.0.0.1:{port}/v2/")
        reg = f"127.0.0.1:{port}"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{os.environ['BASE_LAYOUT']}:workerd",
                        f"docker://{reg}/workerd-base:1"], check=True)
        return reg

    def s3(self, root):
        """Starts s3s-fs serving the buckets under `root`; returns its port."""
        port = free_port()
        self.start([os.environ["S3S_FS"], "--host", "127.0.0.1", "--port", str(port), "--access-key", "bench",
                    "--secret-key", "bench-secret-0123456789", root], "s3.log")
        deadline = time.time() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.time() > deadline: sys.exit(f"{self.name}: s3s-fs did not start")
            time.sleep(0.02)
        return port

    def apiserver(self):
        """Starts the in-memory API server with the CRDs; returns its URL and the environment that
        points kubectl and the controller at it."""
        port = free_port()
        kubeconfig = os.path.join(self.work, "kubeconfig")
        self.start([os.environ["APISERVER"], "--listen", f"127.0.0.1:{port}", "--kubeconfig", kubeconfig], "apiserver.log")
        api = f"http://127.0.0.1:{port}"
        self.wait_http(f"{api}/healthz")
        env = {"KUBECONFIG": kubeconfig, "KUBECACHEDIR": os.path.join(self.work, "kubecache")}
        subprocess.run(["kubectl", "apply", "-f", "deploy/crds.yaml"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, **env})
        return api, env

    def controller_env(self, env):
        """The controller's environment: the API server's, S3 credentials, warnings only."""
        return {**env, "RUST_LOG": os.environ.get("BENCH_LOG", "warn"), "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret-0123456789",
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
