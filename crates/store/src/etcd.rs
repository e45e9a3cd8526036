//! `EtcdStore`: the cluster datastore on etcd v3 (`etcd-client`).
//!
//! * Conditional writes are single etcd transactions: `create` compares the
//!   key's version with 0; `compare_and_swap` / `delete_if_revision` compare
//!   `version > 0` and `mod_revision == expected`, so revision 0 never
//!   matches an absent key. The failure branch reads the key, which is how
//!   Conflict (with the current revision) is told from NotFound.
//! * Leases are etcd's own (minimum TTL 2 s on a default etcd: shorter asks
//!   are raised, and [`Lease::ttl`] says what was granted). `keep_alive`
//!   sends one renewal on a fresh keep-alive stream and waits for the answer.
//! * Watches are etcd's own; `watch` returns once etcd has confirmed the
//!   watch, and the watch ends with an `Err` event when the stream breaks.
//!
//! The synchronous facade owns a tokio runtime with one worker thread: every
//! call is spawned there and the caller blocks on a channel, so it works from
//! any thread (even one inside another runtime, although an async caller
//! should prefer `spawn_blocking`). Every call is bounded by
//! [`EtcdOptions::timeout`]; an etcd that is down or hung gives
//! [`StoreError::Unavailable`] within that time. Connecting does not contact
//! etcd, so an agent starts (and serves from its warm pool) while etcd is
//! down; the client reconnects by itself when etcd comes back.
use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::runtime::Runtime;

use crate::error::{Result, StoreError};
use crate::keys::{check_key, check_prefix};
use crate::{Datastore, KeyValue, Lease, LeaseId, Listing, Revision, Watch, WatchEvent};

/// Tuning for [`EtcdStore`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Longest any one call may take, connecting included (default 3 s).
    pub timeout: Duration,
    /// Longest a TCP connect to one endpoint may take (default 2 s).
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive pings (interval, timeout) so watches notice a dead
    /// or frozen etcd (default 5 s, 3 s).
    pub keep_alive: (Duration, Duration),
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            keep_alive: (Duration::from_secs(5), Duration::from_secs(3)),
        }
    }
}

/// See the module documentation.
pub struct EtcdStore {
    client: Client,
    rt: Option<Runtime>,
    endpoints: Vec<String>,
    opts: EtcdOptions,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EtcdStore({})", self.endpoints.join(","))
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Never blocks, and is allowed inside another runtime.
            rt.shutdown_background();
        }
    }
}

/// Maps a client error. `lease` names the lease a NotFound refers to.
fn map_err(store: &str, lease: Option<i64>, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    let unavailable = |detail: String| StoreError::Unavailable { store: store.to_string(), detail };
    match e {
        E::GRpcStatus(s) => {
            let msg = s.message().to_string();
            match s.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => unavailable(msg),
                Code::Unknown if msg.contains("transport") || msg.contains("connect") => unavailable(msg),
                Code::NotFound if msg.contains("lease") => StoreError::LeaseNotFound(lease.unwrap_or(0)),
                Code::InvalidArgument | Code::OutOfRange => StoreError::Invalid(msg),
                c => StoreError::Backend { store: store.to_string(), detail: format!("{c:?}: {msg}") },
            }
        }
        E::TransportError(e) => unavailable(e.to_string()),
        E::IoError(e) => unavailable(e.to_string()),
        // etcd-client's keep-alive reports an expired lease (TTL <= 0) this way.
        E::LeaseKeepAliveError(e) if e.contains("lease not found") => StoreError::LeaseNotFound(lease.unwrap_or(0)),
        E::WatchError(e) | E::LeaseKeepAliveError(e) => unavailable(e),
        E::InvalidArgs(e) => StoreError::Invalid(e),
        E::InvalidUri(e) => StoreError::Invalid(e.to_string()),
        other => StoreError::Backend { store: store.to_string(), detail: other.to_string() },
    }
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    let key = kv.key_str().map_err(|_| StoreError::corrupt(&String::from_utf8_lossy(kv.key()), "key is not UTF-8"))?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map(|h| h.revision()).unwrap_or(0)
}

fn prefix_options(prefix: &str) -> (String, GetOptions) {
    if prefix.is_empty() {
        ("\0".into(), GetOptions::new().with_all_keys())
    } else {
        (prefix.to_string(), GetOptions::new().with_prefix())
    }
}

/// What a failed conditional transaction found: the key's current revision.
fn failed(key: &str, resp: &etcd_client::TxnResponse) -> StoreError {
    let current = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.mod_revision())),
        _ => None,
    });
    match current.flatten() {
        Some(rev) => StoreError::Conflict { key: key.to_string(), current: rev },
        None => StoreError::NotFound { key: key.to_string() },
    }
}

impl EtcdStore {
    /// A client for `endpoints` (`http://host:port`). Does not contact etcd.
    pub fn connect<S: AsRef<str>>(endpoints: &[S], opts: EtcdOptions) -> Result<EtcdStore> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_string()).collect();
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints".into()));
        }
        let describe = format!("etcd {}", endpoints.join(","));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tern-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable { store: describe.clone(), detail: format!("tokio runtime: {e}") })?;
        let copts = ConnectOptions::new()
            .with_timeout(opts.timeout)
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(opts.keep_alive.0, opts.keep_alive.1)
            .with_keep_alive_while_idle(true);
        let eps = endpoints.clone();
        let d = describe.clone();
        let client = run_on(&rt, &describe, opts.timeout, async move {
            Client::connect(eps, Some(copts)).await.map_err(|e| map_err(&d, None, e))
        })?;
        Ok(EtcdStore { client, rt: Some(rt), endpoints, opts })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn rt(&self) -> &Runtime {
        self.rt.as_ref().expect("runtime present until drop")
    }

    /// Runs `f(client)` on the runtime thread, bounded by the timeout.
    fn call<T, F, Fut>(&self, lease: Option<i64>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>> + Send + 'static,
    {
        let d = self.describe();
        let fut = f(self.client.clone());
        run_on(
            self.rt(),
            &self.describe(),
            self.opts.timeout,
            async move { fut.await.map_err(|e| map_err(&d, lease, e)) },
        )
    }

    /// Runs a compare-then-write transaction whose failure branch reads `key`.
    fn txn(&self, key: &str, compares: Vec<Compare>, op: TxnOp, lease: Option<i64>) -> Result<Revision> {
        let k = key.to_string();
        let resp = self.call(lease, move |mut c| async move {
            c.txn(Txn::new().when(compares).and_then(vec![op]).or_else(vec![TxnOp::get(k, None)])).await
        })?;
        if resp.succeeded() {
            Ok(header_rev(resp.header()))
        } else {
            Err(failed(key, &resp))
        }
    }
}

/// Spawns `fut` on `rt` and waits for it, at most `timeout`.
fn run_on<T: Send + 'static>(
    rt: &Runtime,
    store: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    let s = store.to_string();
    rt.spawn(async move {
        let r = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable { store: s, detail: format!("no answer within {timeout:?}") }),
        };
        let _ = tx.send(r);
    });
    rx.recv().unwrap_or_else(|_| {
        Err(StoreError::Unavailable { store: store.to_string(), detail: "client runtime stopped".into() })
    })
}

fn put_opts(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
}

impl Datastore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let k = key.to_string();
        let resp = self.call(None, move |mut c| async move { c.get(k, None).await })?;
        resp.kvs().first().map(convert).transpose()
    }

    fn list(&self, prefix: &str) -> Result<Listing> {
        check_prefix(prefix)?;
        let (k, o) = prefix_options(prefix);
        let resp = self.call(None, move |mut c| async move { c.get(k, Some(o)).await })?;
        let kvs = resp.kvs().iter().map(convert).collect::<Result<Vec<_>>>()?;
        Ok(Listing { kvs, revision: header_rev(resp.header()) })
    }

    fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        check_key(key)?;
        let (k, v) = (key.to_string(), value.to_vec());
        let resp = self.call(lease.map(|l| l.0), move |mut c| async move { c.put(k, v, put_opts(lease)).await })?;
        Ok(header_rev(resp.header()))
    }

    fn create(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        check_key(key)?;
        let put = TxnOp::put(key, value, put_opts(lease));
        self.txn(key, vec![Compare::version(key, CompareOp::Equal, 0)], put, lease.map(|l| l.0))
    }

    fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision> {
        check_key(key)?;
        let put = TxnOp::put(key, value, put_opts(lease));
        let when =
            vec![Compare::version(key, CompareOp::Greater, 0), Compare::mod_revision(key, CompareOp::Equal, expected)];
        self.txn(key, when, put, lease.map(|l| l.0))
    }

    fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let k = key.to_string();
        let resp = self.call(None, move |mut c| async move { c.delete(k, None).await })?;
        Ok(resp.deleted() > 0)
    }

    fn delete_if_revision(&self, key: &str, expected: Revision) -> Result<()> {
        check_key(key)?;
        let when =
            vec![Compare::version(key, CompareOp::Greater, 0), Compare::mod_revision(key, CompareOp::Equal, expected)];
        self.txn(key, when, TxnOp::delete(key, None), None).map(drop)
    }

    fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let secs = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)) as i64;
        if secs < 1 {
            return Err(StoreError::Invalid(format!("lease TTL {ttl:?}: must be at least 1 s")));
        }
        let resp = self.call(None, move |mut c| async move { c.lease_grant(secs, None).await })?;
        if !resp.error().is_empty() {
            return Err(StoreError::Backend { store: self.describe(), detail: resp.error().to_string() });
        }
        Ok(Lease { id: LeaseId(resp.id()), ttl: Duration::from_secs(resp.ttl().max(0) as u64) })
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let id = lease.0;
        let resp = self.call(Some(id), move |mut c| async move {
            // Opening the stream already renews once (and fails for an expired
            // lease); a second renewal reports the TTL.
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            let msg = stream.message().await?;
            drop(keeper);
            Ok(msg)
        })?;
        match resp {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
            Some(_) => Err(StoreError::LeaseNotFound(id)),
            None => Err(StoreError::Unavailable { store: self.describe(), detail: "keep-alive stream closed".into() }),
        }
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let id = lease.0;
        match self.call(Some(id), move |mut c| async move { c.lease_revoke(id).await }) {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn watch(&self, prefix: &str, start: Option<Revision>) -> Result<Watch> {
        check_prefix(prefix)?;
        let (key, _) = prefix_options(prefix);
        let mut wo =
            if prefix.is_empty() { WatchOptions::new().with_all_keys() } else { WatchOptions::new().with_prefix() };
        if let Some(s) = start {
            wo = wo.with_start_revision(s);
        }
        let d = self.describe();
        let requested = start.unwrap_or(0);
        // Open the stream and wait for etcd's "created" answer.
        let (mut stream, first_events) = self
            .call(None, move |mut c| async move {
                let mut stream = c.watch(key, Some(wo)).await?;
                let first = stream.message().await?;
                Ok((stream, first))
            })
            .and_then(|(stream, first)| match first {
                None => Err(StoreError::Unavailable { store: d.clone(), detail: "watch stream closed".into() }),
                Some(r) if r.canceled() || r.compact_revision() > 0 => Err(canceled(&d, requested, &r)),
                Some(r) => Ok((stream, r.events().to_vec())),
            })?;

        let (tx, rx) = mpsc::channel();
        for ev in &first_events {
            let _ = tx.send(event(&d, ev));
        }
        let (cancel_tx, mut cancel_rx) = tokio::sync::oneshot::channel::<()>();
        self.rt().spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut cancel_rx => return,
                    m = stream.message() => match m {
                        Ok(Some(resp)) => {
                            // A compacted start revision: etcd confirms the watch, then cancels it.
                            if resp.canceled() || resp.compact_revision() > 0 {
                                let _ = tx.send(Err(canceled(&d, requested, &resp)));
                                return;
                            }
                            for ev in resp.events() {
                                if tx.send(event(&d, ev)).is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => {
                            let _ = tx.send(Err(StoreError::Unavailable { store: d.clone(), detail: "watch stream closed".into() }));
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(map_err(&d, None, e)));
                            return;
                        }
                    }
                }
            }
        });
        Ok(Watch::new(rx, Box::new(cancel_tx)))
    }
}

fn canceled(store: &str, requested: Revision, r: &etcd_client::WatchResponse) -> StoreError {
    if r.compact_revision() > 0 {
        StoreError::Compacted { requested, compacted: r.compact_revision() }
    } else {
        StoreError::Backend { store: store.to_string(), detail: format!("watch canceled: {}", r.cancel_reason()) }
    }
}

fn event(store: &str, ev: &etcd_client::Event) -> Result<WatchEvent> {
    let kv =
        ev.kv().ok_or_else(|| StoreError::Backend { store: store.into(), detail: "watch event without kv".into() })?;
    let kv = convert(kv)?;
    Ok(match ev.event_type() {
        EventType::Put => WatchEvent::Put(kv),
        EventType::Delete => WatchEvent::Delete { key: kv.key, revision: kv.revision },
    })
}
