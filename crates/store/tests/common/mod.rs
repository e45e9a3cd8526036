//! Fixtures shared by the store tests: a fresh store of each kind, and
//! fresh clients of it (one per simulated node).
#![allow(dead_code)]

use std::time::Duration;

use tern_store::{Datastore, EtcdOptions, EtcdStore, LocalOptions, LocalStore};
use tern_testkit::{Etcd, TempDir};

/// A fresh, empty store; `client()` gives an independent client of it (its
/// own connection or its own handle on the directory, like another process).
pub trait Fixture: Sync {
    fn client(&self) -> Box<dyn Datastore>;
    fn kind(&self) -> &'static str;
}

pub struct LocalFx {
    pub dir: TempDir,
}

impl LocalFx {
    pub fn new() -> LocalFx {
        LocalFx { dir: TempDir::new() }
    }

    pub fn open(&self) -> LocalStore {
        LocalStore::open_with(self.dir.join("store"), local_options()).expect("open local store")
    }
}

pub fn local_options() -> LocalOptions {
    LocalOptions { poll_interval: Duration::from_millis(50), ..LocalOptions::default() }
}

impl Fixture for LocalFx {
    fn client(&self) -> Box<dyn Datastore> {
        Box::new(self.open())
    }
    fn kind(&self) -> &'static str {
        "local"
    }
}

pub struct EtcdFx {
    pub etcd: Etcd<'static>,
}

/// Short timeouts so "etcd is down" shows within a couple of seconds.
pub fn etcd_options() -> EtcdOptions {
    EtcdOptions {
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        keep_alive: (Duration::from_secs(1), Duration::from_secs(1)),
    }
}

impl EtcdFx {
    pub fn new() -> EtcdFx {
        EtcdFx { etcd: Etcd::start() }
    }

    pub fn open(&self) -> EtcdStore {
        EtcdStore::connect(&self.etcd.endpoints(), etcd_options()).expect("etcd client")
    }
}

impl Fixture for EtcdFx {
    fn client(&self) -> Box<dyn Datastore> {
        Box::new(self.open())
    }
    fn kind(&self) -> &'static str {
        "etcd"
    }
}
