//! The watcher's HTTP server (hyper, HTTP/1.1) on a thread of its own: `GET /metrics`,
//! `GET /` (the live page), `GET /api/run` (its JSON). Anything else is a 4xx; a request
//! hyper cannot parse is answered 400 by hyper. On loopback it is open; anywhere else it
//! requires the run's token (`Authorization: Bearer HEX`, or `?token=HEX` for a browser),
//! because what it shows is the run's business.

use crate::exposition::{render_metrics, Latencies};
use crate::snapshot::{HistoryPoint, RunSnapshot};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::sync::{oneshot, Semaphore};

/// Connections served at once; more are closed on accept (the accept loop never waits for a
/// slot, so the stop signal and the history tick are always heard).
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a connection lives, reading and writing (a client that sends requests and never
/// reads the answers holds its slot no longer than this).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(20);
/// Requests on one connection; the answer to the last says `Connection: close`.
const REQUESTS_PER_CONNECTION: u32 = 600;
/// History points kept (one a second); older ones are thinned out.
const HISTORY_POINTS: usize = 1200;

const PAGE: &str = include_str!("page.html");

/// Where a watcher gets what it shows.
pub trait Source: Send + Sync + 'static {
    fn snapshot(&self) -> RunSnapshot;
}

impl<F: Fn() -> RunSnapshot + Send + Sync + 'static> Source for F {
    fn snapshot(&self) -> RunSnapshot {
        self()
    }
}

#[derive(Debug, Error)]
pub enum WatchError {
    #[error("--metrics-addr {0}: not an address (HOST:PORT)")]
    BadAddress(String),
    #[error(
        "--metrics-addr {0} is reachable from other hosts: give the run a token (--token-file) \
         so that only its holders can watch, or listen on 127.0.0.1"
    )]
    Unprotected(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the watcher's thread: {0}")]
    Runtime(std::io::Error),
}

struct Context {
    source: Arc<dyn Source>,
    latencies: Option<Latencies>,
    /// The token's hex form, if one is required.
    token: Option<String>,
    history: Mutex<Vec<HistoryPoint>>,
    started: Instant,
}

impl Context {
    fn snapshot(&self) -> RunSnapshot {
        let mut snap = self.source.snapshot();
        snap.history = self.history.lock().map(|h| h.clone()).unwrap_or_default();
        snap
    }

    /// One history point from the source, once a second.
    fn sample(&self) {
        let snap = self.source.snapshot();
        let Some(first) = snap.shards.first() else {
            return;
        };
        let point = HistoryPoint {
            time_s: if snap.uptime_s > 0.0 {
                snap.uptime_s
            } else {
                self.started.elapsed().as_secs_f64()
            },
            version: first.version,
            samples: first.samples_applied,
            loss: first.loss,
        };
        if let Ok(mut h) = self.history.lock() {
            if h.len() >= HISTORY_POINTS {
                // Keep every other point: the curve stays whole, at half the resolution.
                let thinned: Vec<_> = h.iter().step_by(2).copied().collect();
                *h = thinned;
            }
            h.push(point);
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let bearer = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let query = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
        // Hex is hex in either case (the token's own form is lower-case).
        [bearer, query]
            .into_iter()
            .flatten()
            .map(str::to_ascii_lowercase)
            .any(|given| {
                bool::from(
                    given
                        .as_bytes()
                        .ct_eq(token.to_ascii_lowercase().as_bytes()),
                )
            })
    }
}

/// A running watcher; dropping it stops the server.
pub struct Watcher {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Serves `source` on `addr` (`HOST:PORT`; port 0 picks one). `token` (hex) is required
    /// of every request unless the address is loopback, and must exist for any other.
    pub fn start(
        addr: &str,
        token: Option<String>,
        source: Arc<dyn Source>,
        latencies: Option<Latencies>,
    ) -> Result<Watcher, WatchError> {
        let socket = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| WatchError::BadAddress(addr.to_string()))?;
        let loopback = socket.ip().is_loopback();
        if !loopback && token.is_none() {
            return Err(WatchError::Unprotected(socket));
        }
        let listener = StdListener::bind(socket).map_err(|source| WatchError::Bind {
            addr: socket,
            source,
        })?;
        let bound = listener.local_addr().map_err(WatchError::Runtime)?;
        listener
            .set_nonblocking(true)
            .map_err(WatchError::Runtime)?;
        let ctx = Arc::new(Context {
            source,
            latencies,
            token: if loopback { None } else { token },
            history: Mutex::new(Vec::new()),
            started: Instant::now(),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(WatchError::Runtime)?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("pstrain-watch".into())
            .spawn(move || runtime.block_on(serve(listener, ctx, stopped)))
            .map_err(WatchError::Runtime)?;
        Ok(Watcher {
            addr: bound,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The live page's address.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: StdListener, ctx: Arc<Context>, mut stopped: oneshot::Receiver<()>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => ctx.sample(),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // Over the cap the socket is dropped at once.
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else { continue };
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    let served = std::sync::atomic::AtomicU32::new(0);
                    let served = Arc::new(served);
                    let service = service_fn(move |req| {
                        let ctx = Arc::clone(&ctx);
                        let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        async move {
                            let mut r = respond(&ctx, req);
                            // A refused request, or the budget spent: this answer is the
                            // connection's last, so a stranger's slot frees at once.
                            if r.status() == StatusCode::UNAUTHORIZED || n >= REQUESTS_PER_CONNECTION {
                                r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    // Errors here are the client's (a malformed head, a hang-up, a client
                    // that does not read): hyper answered what it could, and nothing else is
                    // affected.
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                    drop(permit);
                });
            }
        }
    }
}

fn reply(status: StatusCode, kind: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn respond(ctx: &Context, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET\n");
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if !ctx.authorized(&req) {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            TEXT,
            "this run's token is required (Authorization: Bearer HEX, or ?token=HEX)\n",
        );
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render_metrics(&ctx.snapshot(), ctx.latencies.as_ref()),
        ),
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/api/run" => match serde_json::to_vec(&ctx.snapshot()) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /, /metrics or /api/run\n",
        ),
    }
}
