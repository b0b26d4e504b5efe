//! Plumbing for the data-carrying features of a control connection: exec sessions and
//! URL-service streams.
//!
//! - [`Mux`]: per live connection, which features it switched off (Hello.disabled), and a route
//!   table from exec session / stream id to whoever consumes that id's frames. The control
//!   connection hands every Exec*/Stream*/WindowUpdate frame it reads to [`Mux::deliver`], which
//!   never blocks: the entrypoint sends data only within the credits we granted, so what waits in
//!   a route is bounded by one window (INITIAL_WINDOW) per stream, and more is a protocol error.
//! - Two extra outgoing lanes per connection besides its control queue ([`lanes`]): `exec`
//!   (everything of exec sessions) and `data` (everything of tunnel streams). The writer takes
//!   control frames first, then exec, then tunnel data (the write priority of docs/architecture.md), so a big
//!   download never delays a keystroke or a Pong. Each stream's/session's frames stay on one lane,
//!   so their order (open → data → close) is kept. The lanes are unbounded channels because the
//!   producers are bounded by credits (what we may send is what the entrypoint granted), which
//!   also means nothing of ours ever fills the control queue.
//! - [`TunnelStream`]: one URL-service stream as a tokio `AsyncRead + AsyncWrite`, so hyper's
//!   HTTP/1.1 client can run on it. Writes wait for credits; reads return credits as they
//!   consume; shutdown is a half-close; drop aborts what is not finished both ways.

use crate::server::model::InstanceId;
use crate::server::model::metrics::{AppKind, AppLabel, GaugeGuard, metrics};
use prometheus_client::metrics::counter::Counter;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use waypost_proto::{self as proto, Frame, Kind, window_update::Target};

/// Credits each direction of every stream/session starts with (the protocol's constant).
pub const INITIAL_WINDOW: u32 = proto::INITIAL_WINDOW;
/// Largest StreamData / ExecInput payload we send in one frame (well under MAX_FRAME).
pub const OUT_CHUNK: usize = 64 * 1024;
/// Credits are returned in batches of at least this much (or when the reader caught up and
/// the peer's window is below half), so small reads do not each cost a WindowUpdate.
pub const GRANT_AT: u32 = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- outgoing lanes ------------------------------------------------------------------------

/// The sending side of a connection's exec and data lanes.
#[derive(Clone)]
pub struct Outbox {
    exec: mpsc::UnboundedSender<Queued>,
    data: mpsc::UnboundedSender<Queued>,
}

impl Outbox {
    /// Queues an exec frame; false if the connection is gone.
    pub fn exec(&self, kind: Kind) -> bool {
        self.exec.send(Box::new(kind.into())).is_ok()
    }

    /// Queues a tunnel frame; false if the connection is gone.
    pub fn data(&self, kind: Kind) -> bool {
        self.data.send(Box::new(kind.into())).is_ok()
    }
}

/// A frame on its way to a connection's writer: boxed, because a tokio channel allocates its slots
/// 32 at a time up front, whatever it carries, and every connection has
/// three (control, exec, data): with 192-byte frames that was 18 KiB of every idle connection;
/// boxed, 1 KiB, and a frame costs its allocation only while it waits.
pub type Queued = Box<Frame>;

/// The receiving side, owned by the connection's writer.
pub struct Lanes {
    exec: mpsc::UnboundedReceiver<Queued>,
    data: mpsc::UnboundedReceiver<Queued>,
}

/// A new pair of lanes for one connection.
pub fn lanes() -> (Outbox, Lanes) {
    let (exec_tx, exec) = mpsc::unbounded_channel();
    let (data_tx, data) = mpsc::unbounded_channel();
    (
        Outbox {
            exec: exec_tx,
            data: data_tx,
        },
        Lanes { exec, data },
    )
}

impl Lanes {
    /// The next frame to write: control first, then exec, then tunnel data. `None` once the
    /// control queue is closed (the connection is ending; what is left on the lanes is moot).
    pub async fn next(&mut self, ctrl: &mut mpsc::Receiver<Queued>) -> Option<Queued> {
        tokio::select! {
            biased;
            f = ctrl.recv() => f,
            Some(f) = self.exec.recv() => Some(f),
            Some(f) = self.data.recv() => Some(f),
        }
    }

    /// A frame that is ready now, in the same priority order.
    pub fn try_next(&mut self, ctrl: &mut mpsc::Receiver<Queued>) -> Option<Queued> {
        ctrl.try_recv()
            .or_else(|_| self.exec.try_recv())
            .or_else(|_| self.data.try_recv())
            .ok()
    }
}

// ---- the route table -----------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Route {
    Exec(u64),
    Stream(u64),
}

enum Target2 {
    /// Frames of an exec session go to its relay task (closed channel = connection gone).
    Exec(mpsc::UnboundedSender<Kind>),
    Stream(Arc<Mutex<StreamState>>),
}

struct Conn {
    session: i64,
    app: String,
    exec_disabled: bool,
    url_disabled: bool,
    out: Outbox,
    routes: HashMap<Route, Target2>,
    exec_count: usize,
    stream_count: usize,
    /// This app's series of `exec_sessions`, `tunnel_streams{kind=ingress}` and
    /// `{kind=port_forward}`, looked up once per connection rather than per session or stream.
    counted: [Counter; 3],
}

/// Which feature an instance is picked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Exec,
    Url,
}

impl Feature {
    fn name(self) -> &'static str {
        match self {
            Feature::Exec => "exec",
            Feature::Url => "the URL service",
        }
    }
    fn var(self) -> &'static str {
        match self {
            Feature::Exec => "WAYPOST_DISABLE_EXEC=1",
            Feature::Url => "WAYPOST_DISABLE_URL=1",
        }
    }
}

/// Why no instance could be picked. The Display text is what users see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickError {
    /// The app has no live instance at all.
    NoLive { app: String },
    /// Live instances exist, but every one has the feature switched off.
    Disabled {
        app: String,
        feature: Feature,
        live: usize,
    },
    /// `--instance` matched no live instance of the app.
    NoSuchInstance { app: String, prefix: String },
    /// `--instance` matched several.
    Ambiguous {
        app: String,
        prefix: String,
        matches: usize,
    },
    /// The one instance asked for has the feature switched off.
    InstanceDisabled { instance: String, feature: Feature },
}

impl std::fmt::Display for PickError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickError::NoLive { app } => write!(f, "app {app} has no live instance"),
            PickError::Disabled { app, feature, live } => write!(
                f,
                "{} is disabled on {} of app {app} ({})",
                feature.name(),
                if *live == 1 {
                    "the live instance".to_string()
                } else {
                    format!("all {live} live instances")
                },
                feature.var()
            ),
            PickError::NoSuchInstance { app, prefix } => {
                write!(
                    f,
                    "no live instance of app {app} has an id starting with {prefix:?}"
                )
            }
            PickError::Ambiguous {
                app,
                prefix,
                matches,
            } => write!(
                f,
                "{matches} live instances of app {app} have ids starting with {prefix:?}; give more of the id"
            ),
            PickError::InstanceDisabled { instance, feature } => write!(
                f,
                "{} is disabled on instance {instance} ({})",
                feature.name(),
                feature.var()
            ),
        }
    }
}

impl std::error::Error for PickError {}

/// Live connections' feature switches, load counters and route tables.
pub struct Mux {
    inner: Mutex<HashMap<InstanceId, Conn>>,
    /// Tunnel stream ids: unique for the server's life (exec session ids come from the store,
    /// unique across restarts).
    next_stream: AtomicU64,
}

impl Default for Mux {
    fn default() -> Self {
        Mux {
            inner: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
        }
    }
}

impl Mux {
    /// A connection was admitted. A previous connection of the same instance (superseded) loses
    /// its routes: their consumers see the instance as gone.
    pub fn attach(
        &self,
        id: InstanceId,
        session: i64,
        app: &str,
        disabled: Option<&proto::Features>,
        out: Outbox,
    ) {
        let conn = Conn {
            session,
            app: app.to_string(),
            exec_disabled: disabled.is_some_and(|d| d.exec),
            url_disabled: disabled.is_some_and(|d| d.url),
            out,
            routes: HashMap::new(),
            exec_count: 0,
            stream_count: 0,
            counted: counters(app),
        };
        let old = lock(&self.inner).insert(id, conn);
        if let Some(old) = old {
            fail_routes(old.routes);
        }
    }

    /// The connection ended: every exec session and stream on it fails.
    pub fn detach(&self, id: &InstanceId, session: i64) {
        let removed = {
            let mut map = lock(&self.inner);
            if map.get(id).is_some_and(|c| c.session == session) {
                map.remove(id)
            } else {
                None
            }
        };
        if let Some(conn) = removed {
            fail_routes(conn.routes);
        }
    }

    /// Whether any live connection belongs to `app` (saves a database lookup per request).
    pub fn has_app(&self, app: &str) -> bool {
        lock(&self.inner).values().any(|c| c.app == app)
    }

    /// Routes a frame the entrypoint sent. Returns the frame back if it is not one of ours.
    pub fn deliver(&self, id: &InstanceId, session: i64, kind: Kind) -> Option<Kind> {
        let route = match &kind {
            Kind::ExecStarted(m) => Route::Exec(m.session),
            Kind::ExecOutput(m) => Route::Exec(m.session),
            Kind::ExecExit(m) => Route::Exec(m.session),
            Kind::StreamData(m) => Route::Stream(m.stream),
            Kind::StreamClose(m) => Route::Stream(m.stream),
            Kind::WindowUpdate(w) => match w.target {
                Some(Target::ExecSession(s)) => Route::Exec(s),
                Some(Target::Stream(s)) => Route::Stream(s),
                None => return None,
            },
            _ => return Some(kind),
        };
        let mut map = lock(&self.inner);
        // A frame of a connection that is no longer registered (superseded): dropped.
        let conn = map.get_mut(id).filter(|c| c.session == session)?;
        match conn.routes.get(&route) {
            // Late frames of a session/stream that already ended: nothing to do.
            None => {}
            Some(Target2::Exec(tx)) => {
                let _ = tx.send(kind);
            }
            Some(Target2::Stream(st)) => {
                let st = st.clone();
                let verdict = lock(&st).deliver(kind);
                match verdict {
                    Delivered::Ok => {}
                    Delivered::Gone => {
                        // The entrypoint aborted it and forgot it.
                        remove_route(conn, route);
                    }
                    Delivered::Overrun => {
                        tracing::warn!(
                            instance = crate::util::hex(id),
                            stream = route_id(route),
                            "the instance sent stream data beyond its window; aborting the stream"
                        );
                        conn.out.data(Kind::StreamClose(proto::StreamClose {
                            stream: route_id(route),
                            half: false,
                            error: "data beyond the window".into(),
                        }));
                        remove_route(conn, route);
                    }
                }
            }
        }
        None
    }

    /// Picks a live instance of `app` for `feature`: the one whose id starts with `prefix`, or
    /// the least loaded (fewest exec sessions / open streams) with the feature on.
    fn pick<'a>(
        map: &'a mut HashMap<InstanceId, Conn>,
        app: &str,
        feature: Feature,
        prefix: Option<&str>,
    ) -> Result<(InstanceId, &'a mut Conn), PickError> {
        let disabled = |c: &Conn| match feature {
            Feature::Exec => c.exec_disabled,
            Feature::Url => c.url_disabled,
        };
        let load = |c: &Conn| match feature {
            Feature::Exec => c.exec_count,
            Feature::Url => c.stream_count,
        };
        let of_app: Vec<(InstanceId, &Conn)> = map
            .iter()
            .filter(|(_, c)| c.app == app)
            .map(|(id, c)| (*id, c))
            .collect();
        let chosen = if let Some(prefix) = prefix {
            let p = prefix.to_ascii_lowercase();
            let hits: Vec<_> = of_app
                .iter()
                .filter(|(id, _)| crate::util::hex(id).starts_with(&p))
                .collect();
            match hits.as_slice() {
                [] => {
                    return Err(PickError::NoSuchInstance {
                        app: app.into(),
                        prefix: prefix.into(),
                    });
                }
                [(id, c)] => {
                    if disabled(c) {
                        return Err(PickError::InstanceDisabled {
                            instance: crate::util::hex(id),
                            feature,
                        });
                    }
                    *id
                }
                many => {
                    return Err(PickError::Ambiguous {
                        app: app.into(),
                        prefix: prefix.into(),
                        matches: many.len(),
                    });
                }
            }
        } else {
            if of_app.is_empty() {
                return Err(PickError::NoLive { app: app.into() });
            }
            of_app
                .iter()
                .filter(|(_, c)| !disabled(c))
                .min_by_key(|(id, c)| (load(c), *id))
                .map(|(id, _)| *id)
                .ok_or(PickError::Disabled {
                    app: app.into(),
                    feature,
                    live: of_app.len(),
                })?
        };
        let conn = map.get_mut(&chosen).expect("picked from the map");
        Ok((chosen, conn))
    }

    /// Opens a URL-service stream to an instance of `app` (StreamOpen is queued).
    pub fn open_stream(
        self: &Arc<Self>,
        app: &str,
        prefix: Option<&str>,
        client_addr: &str,
    ) -> Result<(TunnelStream, InstanceId), PickError> {
        let id = self.pick_url(app, prefix)?;
        let stream = self
            .open_stream_on(id, client_addr)
            .ok_or_else(|| PickError::NoLive { app: app.into() })?;
        Ok((stream, id))
    }

    /// The instance a URL request for `app` goes to (as `open_stream` would pick it), without
    /// opening anything: the ingress first looks for an idle upstream connection to it.
    /// Sends `control` (an operator's restart or signal) to each live connection of `app` held
    /// here whose hex id starts with `prefix` (every one when None); their ids. Not gated by a
    /// feature switch: managing the child is what an entrypoint is for.
    pub fn control_children(
        &self,
        app: &str,
        prefix: Option<&str>,
        control: &proto::ChildControl,
    ) -> Vec<InstanceId> {
        let map = lock(&self.inner);
        let p = prefix.map(str::to_ascii_lowercase);
        map.iter()
            .filter(|(id, c)| {
                c.app == app
                    && p.as_deref()
                        .is_none_or(|p| crate::util::hex(*id).starts_with(p))
            })
            .filter(|(_, c)| c.out.exec(Kind::ChildControl(control.clone())))
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn pick_url(&self, app: &str, prefix: Option<&str>) -> Result<InstanceId, PickError> {
        let mut map = lock(&self.inner);
        Mux::pick(&mut map, app, Feature::Url, prefix).map(|(id, _)| id)
    }

    /// Opens a URL-service stream to instance `id` (None if it is gone), to the app's `PORT`.
    pub fn open_stream_on(
        self: &Arc<Self>,
        id: InstanceId,
        client_addr: &str,
    ) -> Option<TunnelStream> {
        self.open_stream_to_port(id, 0, client_addr)
    }

    /// Opens a tunnel stream to `127.0.0.1:target_port` inside instance `id` (None if it is
    /// gone); `target_port` 0 is the app's `PORT` (what the ingress uses). `port-forward` names
    /// its port; the entrypoint answers a port it does not allow with a StreamClose error, which
    /// the stream's reads and writes then return.
    pub fn open_stream_to_port(
        self: &Arc<Self>,
        id: InstanceId,
        target_port: u16,
        client_addr: &str,
    ) -> Option<TunnelStream> {
        let mut map = lock(&self.inner);
        let conn = map.get_mut(&id)?;
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(Mutex::new(StreamState::new()));
        conn.routes
            .insert(Route::Stream(stream), Target2::Stream(state.clone()));
        conn.stream_count += 1;
        let kind = if target_port == 0 {
            INGRESS
        } else {
            PORT_FORWARD
        };
        conn.counted[kind].inc();
        conn.out.data(Kind::StreamOpen(proto::StreamOpen {
            stream,
            target_port: u32::from(target_port),
            client_addr: client_addr.to_string(),
        }));
        let out = conn.out.clone();
        let session = conn.session;
        drop(map);
        Some(TunnelStream {
            id: stream,
            state,
            out,
            _open: GaugeGuard::new(&metrics().tunnel_streams_open),
            guard: RouteGuard {
                mux: self.clone(),
                instance: id,
                session,
                route: Route::Stream(stream),
            },
        })
    }

    pub fn open_exec(
        self: &Arc<Self>,
        app: &str,
        prefix: Option<&str>,
        session_id: u64,
    ) -> Result<ExecRoute, PickError> {
        let mut map = lock(&self.inner);
        let (id, conn) = Mux::pick(&mut map, app, Feature::Exec, prefix)?;
        let (tx, rx) = mpsc::unbounded_channel();
        conn.routes
            .insert(Route::Exec(session_id), Target2::Exec(tx));
        conn.exec_count += 1;
        conn.counted[EXEC].inc();
        Ok(ExecRoute {
            instance: id,
            session: session_id,
            out: conn.out.clone(),
            rx,
            _open: GaugeGuard::new(&metrics().exec_sessions_open),
            _guard: RouteGuard {
                mux: self.clone(),
                instance: id,
                session: conn.session,
                route: Route::Exec(session_id),
            },
        })
    }

    fn remove(&self, instance: &InstanceId, session: i64, route: Route) {
        let mut map = lock(&self.inner);
        if let Some(conn) = map.get_mut(instance).filter(|c| c.session == session) {
            remove_route(conn, route);
        }
    }
}

/// Indices into `Conn::counted`.
const EXEC: usize = 0;
const INGRESS: usize = 1;
const PORT_FORWARD: usize = 2;

fn counters(app: &str) -> [Counter; 3] {
    let m = metrics();
    let stream = |kind| {
        m.tunnel_streams
            .get_or_create(&AppKind {
                app: app.to_string(),
                kind,
            })
            .clone()
    };
    [
        m.exec_sessions.get_or_create(&AppLabel::new(app)).clone(),
        stream("ingress"),
        stream("port_forward"),
    ]
}

fn route_id(r: Route) -> u64 {
    match r {
        Route::Exec(id) | Route::Stream(id) => id,
    }
}

fn remove_route(conn: &mut Conn, route: Route) {
    if conn.routes.remove(&route).is_some() {
        match route {
            Route::Exec(_) => conn.exec_count -= 1,
            Route::Stream(_) => conn.stream_count -= 1,
        }
    }
}

/// The connection is gone: streams fail with an error; exec relays see their channel close.
fn fail_routes(routes: HashMap<Route, Target2>) {
    for (_, target) in routes {
        if let Target2::Stream(st) = target {
            lock(&st).fail("the instance disconnected".into());
        }
    }
}

/// Removes a route (and its load count) when its owner goes away.
struct RouteGuard {
    mux: Arc<Mux>,
    instance: InstanceId,
    session: i64,
    route: Route,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.mux.remove(&self.instance, self.session, self.route);
    }
}

/// An exec session's route: frames from the entrypoint arrive on `rx` (closed when the
/// connection is gone); frames for it go out through `out`'s exec lane.
pub struct ExecRoute {
    pub instance: InstanceId,
    pub session: u64,
    pub out: Outbox,
    pub rx: mpsc::UnboundedReceiver<Kind>,
    _open: GaugeGuard,
    _guard: RouteGuard,
}

// ---- tunnel streams ------------------------------------------------------------------------

enum Delivered {
    Ok,
    /// The entrypoint aborted the stream (and forgot it).
    Gone,
    /// It sent more than its window: a protocol violation.
    Overrun,
}

struct StreamState {
    /// Data from the app not read yet, and how far into the front chunk we are.
    inbox: VecDeque<Vec<u8>>,
    front_off: usize,
    /// Bytes the entrypoint may still send (our grant).
    recv_window: u32,
    /// Read since we last granted credits.
    consumed: u32,
    /// The app's side ended (half-close from the entrypoint).
    remote_fin: bool,
    /// Aborted by the entrypoint (with its reason) or the connection is gone.
    error: Option<String>,
    read_waker: Option<Waker>,
    /// Bytes we may still send (the entrypoint's grant).
    credits: u32,
    write_waker: Option<Waker>,
    local_fin: bool,
    /// Last time bytes moved either way (for the ingress's "app not answering" timer).
    activity: Instant,
}

impl StreamState {
    fn new() -> Self {
        StreamState {
            inbox: VecDeque::new(),
            front_off: 0,
            recv_window: INITIAL_WINDOW,
            consumed: 0,
            remote_fin: false,
            error: None,
            read_waker: None,
            credits: INITIAL_WINDOW,
            write_waker: None,
            local_fin: false,
            activity: Instant::now(),
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    fn fail(&mut self, why: String) {
        if self.error.is_none() {
            self.error = Some(why);
        }
        self.wake();
    }

    fn deliver(&mut self, kind: Kind) -> Delivered {
        match kind {
            Kind::StreamData(d) => {
                let n = u32::try_from(d.data.len()).unwrap_or(u32::MAX);
                if n > self.recv_window || self.remote_fin {
                    self.fail("the instance sent data beyond its window".into());
                    return Delivered::Overrun;
                }
                self.recv_window -= n;
                if n > 0 {
                    self.inbox.push_back(d.data);
                    self.activity = Instant::now();
                }
                if let Some(w) = self.read_waker.take() {
                    w.wake();
                }
                Delivered::Ok
            }
            Kind::StreamClose(c) if c.half => {
                self.remote_fin = true;
                self.activity = Instant::now();
                if let Some(w) = self.read_waker.take() {
                    w.wake();
                }
                Delivered::Ok
            }
            Kind::StreamClose(c) => {
                let why = if c.error.is_empty() {
                    "the instance closed the stream".to_string()
                } else {
                    c.error
                };
                self.fail(why);
                Delivered::Gone
            }
            Kind::WindowUpdate(w) => {
                self.credits = self.credits.saturating_add(w.credits);
                if let Some(w) = self.write_waker.take() {
                    w.wake();
                }
                Delivered::Ok
            }
            _ => Delivered::Ok,
        }
    }
}

/// A cheap handle to look at a stream from outside while hyper owns it.
#[derive(Clone)]
pub struct StreamProbe(Arc<Mutex<StreamState>>);

impl StreamProbe {
    /// When bytes last moved either way.
    pub fn last_activity(&self) -> Instant {
        lock(&self.0).activity
    }

    /// Why the stream failed, if it did (e.g. the entrypoint could not connect to the app).
    pub fn error(&self) -> Option<String> {
        lock(&self.0).error.clone()
    }
}

/// One URL-service stream as a byte stream. See the module docs.
pub struct TunnelStream {
    id: u64,
    state: Arc<Mutex<StreamState>>,
    out: Outbox,
    _open: GaugeGuard,
    guard: RouteGuard,
}

impl TunnelStream {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn probe(&self) -> StreamProbe {
        StreamProbe(self.state.clone())
    }

    /// Whether the stream is open both ways with nothing unread: an idle keep-alive connection
    /// to the app that may carry another request.
    pub fn is_reusable(&self) -> bool {
        let st = lock(&self.state);
        st.error.is_none() && !st.remote_fin && !st.local_fin && st.inbox.is_empty()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = lock(&this.state);
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(front) = st.inbox.front() {
            let off = st.front_off;
            let n = (front.len() - off).min(buf.remaining());
            buf.put_slice(&front[off..off + n]);
            if off + n == front.len() {
                st.inbox.pop_front();
                st.front_off = 0;
            } else {
                st.front_off += n;
            }
            st.consumed += n as u32;
            st.activity = Instant::now();
            // Return credits in batches, or as soon as we caught up while the peer's window is
            // below half (so a sender never stalls on a reader that keeps up).
            if st.consumed >= GRANT_AT
                || (st.inbox.is_empty() && st.recv_window < INITIAL_WINDOW / 2)
            {
                let credits = std::mem::take(&mut st.consumed);
                st.recv_window += credits;
                this.out.data(Kind::WindowUpdate(proto::WindowUpdate {
                    target: Some(Target::Stream(this.id)),
                    credits,
                }));
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = &st.error {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                e.clone(),
            )));
        }
        if st.remote_fin {
            return Poll::Ready(Ok(())); // EOF
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = lock(&this.state);
        if let Some(e) = &st.error {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, e.clone())));
        }
        if st.local_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if st.credits == 0 {
            // Backpressure: the app (or the entrypoint) has not consumed what we sent.
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(st.credits as usize).min(OUT_CHUNK);
        st.credits -= n as u32;
        st.activity = Instant::now();
        if !this.out.data(Kind::StreamData(proto::StreamData {
            stream: this.id,
            data: buf[..n].to_vec(),
        })) {
            st.fail("the instance disconnected".into());
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the instance disconnected",
            )));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = lock(&this.state);
        if !st.local_fin && st.error.is_none() {
            st.local_fin = true;
            this.out.data(Kind::StreamClose(proto::StreamClose {
                stream: this.id,
                half: true,
                error: String::new(),
            }));
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        let st = lock(&self.state);
        // Done both ways (the entrypoint forgot it) or already failed: nothing to say. Otherwise
        // abort, so the entrypoint drops its socket to the app now (a pending zero-downtime
        // restart waits for exactly that).
        if st.error.is_none() && !(st.local_fin && st.remote_fin) {
            self.out.data(Kind::StreamClose(proto::StreamClose {
                stream: self.id,
                half: false,
                error: String::new(),
            }));
        }
        drop(st);
        let _ = &self.guard; // dropped next: removes the route
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn mux_with(app: &str, ids: &[(u8, bool)]) -> (Arc<Mux>, Vec<Lanes>) {
        let mux = Arc::new(Mux::default());
        let mut all = Vec::new();
        for &(b, url_off) in ids {
            let (out, lanes) = lanes();
            let f = proto::Features {
                url: url_off,
                exec: url_off,
                ..Default::default()
            };
            mux.attach([b; 16], b as i64, app, Some(&f), out);
            all.push(lanes);
        }
        (mux, all)
    }

    fn frame(l: &mut Lanes) -> Kind {
        l.data
            .try_recv()
            .or_else(|_| l.exec.try_recv())
            .expect("a frame")
            .kind
            .unwrap()
    }

    #[tokio::test]
    async fn picks_least_loaded_enabled_instance_and_counts() {
        let (mux, _lanes) = mux_with("web", &[(1, false), (2, false), (3, true)]);
        let (a, ia) = mux.open_stream("web", None, "x").unwrap();
        let (b, ib) = mux.open_stream("web", None, "x").unwrap();
        assert_ne!(ia, ib, "spread over the two enabled instances");
        assert!(ia != [3; 16] && ib != [3; 16], "never the disabled one");
        drop(a);
        let (_c, ic) = mux.open_stream("web", None, "x").unwrap();
        assert_eq!(ic, ia, "the freed one is least loaded again");
        drop(b);
        let e = mux.open_stream("web", Some("0303"), "x").err().unwrap();
        assert!(matches!(e, PickError::InstanceDisabled { .. }), "{e}");
        assert!(matches!(
            mux.open_stream("web", Some("ff"), "x").err().unwrap(),
            PickError::NoSuchInstance { .. }
        ));
        assert!(matches!(
            mux.open_stream("api", None, "x").err().unwrap(),
            PickError::NoLive { .. }
        ));
        let (mux, _l) = mux_with("web", &[(3, true)]);
        let e = mux.open_exec("web", None, 1).err().unwrap();
        assert!(e.to_string().contains("WAYPOST_DISABLE_EXEC"), "{e}");
    }

    #[tokio::test]
    async fn stream_credits_both_ways_and_close() {
        let (mux, mut lanes) = mux_with("web", &[(1, false)]);
        let l = &mut lanes[0];
        let (mut s, id) = mux.open_stream("web", None, "1.2.3.4:5").unwrap();
        let sid = s.id();
        assert!(matches!(frame(l), Kind::StreamOpen(o) if o.stream == sid));
        // Writes stop at the window.
        let big = vec![7u8; INITIAL_WINDOW as usize + 10];
        let mut sent = 0;
        while let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(50), s.write(&big[sent..])).await
        {
            sent += n;
        }
        assert_eq!(sent, INITIAL_WINDOW as usize);
        let mut on_wire = 0;
        while let Ok(f) = l.data.try_recv() {
            if let Some(Kind::StreamData(d)) = f.kind {
                on_wire += d.data.len();
            }
        }
        assert_eq!(on_wire, sent);
        mux.deliver(
            &id,
            1,
            Kind::WindowUpdate(proto::WindowUpdate {
                target: Some(Target::Stream(sid)),
                credits: 10,
            }),
        );
        assert_eq!(s.write(&big[sent..]).await.unwrap(), 10);
        // Reads return credits; more than the window is refused.
        let chunk = vec![1u8; 128 * 1024];
        mux.deliver(
            &id,
            1,
            Kind::StreamData(proto::StreamData {
                stream: sid,
                data: chunk.clone(),
            }),
        );
        let mut got = vec![0u8; 128 * 1024];
        s.read_exact(&mut got).await.unwrap();
        let mut granted = 0;
        while let Ok(f) = l.data.try_recv() {
            if let Some(Kind::WindowUpdate(w)) = f.kind {
                granted += w.credits;
            }
        }
        assert_eq!(granted, 128 * 1024);
        mux.deliver(
            &id,
            1,
            Kind::StreamClose(proto::StreamClose {
                stream: sid,
                half: true,
                error: String::new(),
            }),
        );
        assert_eq!(
            s.read(&mut got).await.unwrap(),
            0,
            "EOF after the half-close"
        );
        s.shutdown().await.unwrap();
        assert!(matches!(frame(l), Kind::StreamClose(c) if c.half));
        drop(s);
        assert!(l.data.try_recv().is_err(), "done both ways: no abort");
        assert_eq!(lock(&mux.inner)[&id].stream_count, 0);
    }

    #[tokio::test]
    async fn streams_name_their_target_port_and_the_ingress_keeps_port_zero() {
        let (mux, mut lanes) = mux_with("web", &[(1, false)]);
        let s = mux.open_stream_to_port([1; 16], 5432, "pf").unwrap();
        assert!(
            matches!(frame(&mut lanes[0]), Kind::StreamOpen(o) if o.stream == s.id() && o.target_port == 5432)
        );
        let (i, _) = mux.open_stream("web", None, "1.2.3.4:5").unwrap();
        assert!(
            matches!(frame(&mut lanes[0]), Kind::StreamOpen(o) if o.stream == i.id() && o.target_port == 0)
        );
        assert!(
            mux.open_stream_to_port([9; 16], 1, "pf").is_none(),
            "no such instance"
        );
    }

    #[tokio::test]
    async fn overrun_and_disconnect_fail_the_stream() {
        let (mux, mut lanes) = mux_with("web", &[(1, false)]);
        let (mut s, id) = mux.open_stream("web", None, "x").unwrap();
        let sid = s.id();
        let _ = frame(&mut lanes[0]);
        mux.deliver(
            &id,
            1,
            Kind::StreamData(proto::StreamData {
                stream: sid,
                data: vec![0; INITIAL_WINDOW as usize + 1],
            }),
        );
        assert!(matches!(frame(&mut lanes[0]), Kind::StreamClose(c) if !c.half));
        let mut b = [0u8; 4];
        assert!(s.read(&mut b).await.is_err());
        let (mut s2, _) = mux.open_stream("web", None, "x").unwrap();
        mux.detach(&id, 1);
        let e = s2.read(&mut b).await.unwrap_err();
        assert!(e.to_string().contains("disconnected"), "{e}");
        drop(s);
    }
}
