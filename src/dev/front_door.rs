//! The front door of one worker in `workerbundle dev`: the worker's fixed port, forwarding each
//! connection to whichever workerd serves the worker now. A new workerd starts beside the old one
//! on ports of its own and the door switches to it only once it serves, so a redeploy, a secret
//! change or a restart never refuses a connection; a workerd that cannot start is never switched
//! to. A pod's Service does the same on a cluster.
//!
//! The door also knows since when its connections have waited: from a request's first byte to
//! its answer's first byte. When the account's workerd stops answering its health probe, the
//! worker whose request has waited longest is the one that went into a loop (the others' requests
//! came in after it and wait behind it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::debug;

const BUFFER: usize = 16 * 1024;

#[derive(Debug)]
pub struct FrontDoor {
    port: u16,
    backend: Arc<RwLock<Option<SocketAddr>>>,
    waiting: Arc<Waits>,
    accept: tokio::task::JoinHandle<()>,
}

/// When each waiting request started waiting, by connection.
#[derive(Debug, Default)]
struct Waits {
    next: AtomicU64,
    since: Mutex<BTreeMap<u64, Instant>>,
}

impl FrontDoor {
    /// Serves `listener` (already bound); connections are closed until [`FrontDoor::switch_to`].
    pub fn open(listener: std::net::TcpListener) -> std::io::Result<FrontDoor> {
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let backend = Arc::new(RwLock::new(None));
        let waiting = Arc::new(Waits::default());
        let accept = tokio::spawn(accept_loop(listener, backend.clone(), waiting.clone()));
        Ok(FrontDoor { port, backend, waiting, accept })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// New connections go to `backend` from now on (none: closed at once). Connections already
    /// forwarded stay with the workerd they reached.
    pub fn switch_to(&self, backend: Option<SocketAddr>) {
        if let Ok(mut current) = self.backend.write() {
            *current = backend;
        }
    }

    /// Since when the longest-waiting request has waited for the first byte of its answer.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.waiting.since.lock().ok()?.values().min().copied()
    }
}

impl Drop for FrontDoor {
    /// Closes the port.
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    backend: Arc<RwLock<Option<SocketAddr>>>,
    waiting: Arc<Waits>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of descriptors, most likely: wait instead of spinning.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let target = backend.read().ok().and_then(|b| *b);
        let Some(target) = target else {
            continue; // dropped: nothing serves this worker now
        };
        tokio::spawn(forward(client, target, waiting.clone()));
    }
}

/// Marks a connection as waiting for its answer while it lives.
struct Waiting(Arc<Waits>, u64);

impl Waiting {
    fn new(waits: &Arc<Waits>) -> Waiting {
        let id = waits.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut since) = waits.since.lock() {
            since.insert(id, Instant::now());
        }
        Waiting(waits.clone(), id)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut since) = self.0.since.lock() {
            since.remove(&self.1);
        }
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, waiting: Arc<Waits>) {
    let mut server = match TcpStream::connect(target).await {
        Ok(server) => server,
        Err(e) => {
            debug!(%target, error = %e, "workerd refused a forwarded connection");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let (sent, request_sent) = oneshot::channel::<()>();
    let upstream = async {
        let mut buffer = vec![0; BUFFER];
        let mut sent = Some(sent);
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            if let Some(sent) = sent.take() {
                let _ = sent.send(());
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async {
        let mut buffer = vec![0; BUFFER];
        // Waiting from the request's first byte to the answer's first byte.
        let mut marked: Option<Waiting> = None;
        let first = server_read.read(&mut buffer);
        tokio::pin!(first);
        let mut request_sent = request_sent;
        let mut watching = true;
        let first = loop {
            tokio::select! {
                read = &mut first => break read,
                result = &mut request_sent, if watching => {
                    watching = false;
                    if result.is_ok() {
                        marked = Some(Waiting::new(&waiting));
                    }
                }
            }
        };
        drop(marked);
        if let Ok(n) = first {
            if n > 0 && client_write.write_all(&buffer[..n]).await.is_ok() {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0; 64];
                    let n = stream.read(&mut buffer).await.unwrap_or(0);
                    let _ = stream.write_all(&buffer[..n]).await;
                });
            }
        });
        address
    }

    async fn ask(port: u16, text: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.write_all(text.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        answer
    }

    #[tokio::test]
    async fn connections_follow_the_switch_and_none_is_refused_by_the_port() {
        let door = FrontDoor::open(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        assert_eq!(ask(door.port(), "nobody").await, "", "no backend: closed, not forwarded");
        door.switch_to(Some(echo_server().await));
        assert_eq!(ask(door.port(), "one").await, "one");
        door.switch_to(Some(echo_server().await));
        assert_eq!(ask(door.port(), "two").await, "two");
        assert_eq!(door.waiting_since(), None);
    }

    #[tokio::test]
    async fn a_request_without_an_answer_counts_as_waiting() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = silent.local_addr().unwrap();
        let door = FrontDoor::open(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        door.switch_to(Some(address));
        let mut stream = TcpStream::connect(("127.0.0.1", door.port())).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (_held, _) = silent.accept().await.unwrap();
        let before = Instant::now();
        for _ in 0..100 {
            if door.waiting_since().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(door.waiting_since().is_some_and(|since| since >= before));
    }
}
