//! A throwaway etcd server (Debian's `etcd-server`, `/usr/bin/etcd`) for
//! datastore tests.
//!
//! [`Etcd::start`] runs it on two free 127.0.0.1 ports with a [`TempDir`]
//! data directory and returns once `/health` answers; [`Etcd::start_in`]
//! runs it inside a test's network namespace on an address there (for
//! agents in node namespaces). The guard kills it by pid (SIGKILL) on drop,
//! also while a failing test unwinds, and removes the data directory.
//! [`Etcd::stop`] / [`Etcd::restart`] kill it and bring it back on the same
//! ports and data, [`Etcd::pause`] / [`Etcd::resume`] freeze it (SIGSTOP), so
//! tests can check what clients do when the store is down or hung.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::names::{unique, TempDir};
use crate::process::{spawn_in, ChildGuard};
use crate::Netns;

/// Where Debian's etcd-server installs the server.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a start may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

enum Proc {
    Host(Child),
    InNs(ChildGuard),
}

/// A running etcd; see the module docs.
pub struct Etcd<'ns> {
    proc: Option<Proc>,
    ns: Option<&'ns Netns>,
    dir: TempDir,
    name: String,
    host: String,
    client_port: u16,
    peer_port: u16,
}

impl std::fmt::Debug for Etcd<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Etcd({} pid {:?})", self.endpoint(), self.pid())
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("testkit: bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Whether `GET /health` on `addr` says healthy.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Etcd<'static> {
    /// Starts etcd on free 127.0.0.1 ports in the test's own network
    /// namespace. Panics (with etcd's log) if it is not healthy within 20 s.
    /// Needs Debian's `etcd-server` (scripts/setup.sh installs it).
    pub fn start() -> Etcd<'static> {
        // Free ports can be taken by a parallel test before etcd binds them:
        // then etcd exits at once and we try other ports.
        let mut last_log = String::new();
        for _ in 0..5 {
            let mut e = Etcd {
                proc: None,
                ns: None,
                dir: TempDir::new(),
                name: unique("etcd"),
                host: "127.0.0.1".into(),
                client_port: free_port(),
                peer_port: free_port(),
            };
            if e.client_port == e.peer_port {
                continue;
            }
            match e.launch() {
                Ok(()) => return e,
                Err(log) => last_log = log,
            }
        }
        panic!("testkit: etcd did not start:\n{last_log}");
    }
}

impl<'ns> Etcd<'ns> {
    /// Starts etcd inside `ns`, listening on `ip` (an address the test put on
    /// a link there, or 127.0.0.1 for clients in the same namespace), ports
    /// 2379/2380 (a fresh namespace has no other listeners).
    pub fn start_in(ns: &'ns Netns, ip: &str) -> Etcd<'ns> {
        let mut e = Etcd {
            proc: None,
            ns: Some(ns),
            dir: TempDir::new(),
            name: unique("etcd"),
            host: ip.to_string(),
            client_port: 2379,
            peer_port: 2380,
        };
        if let Err(log) = e.launch() {
            panic!("testkit: etcd did not start in netns {}:\n{log}", ns.name());
        }
        e
    }

    fn url(&self, port: u16) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{port}", self.host)
        } else {
            format!("http://{}:{port}", self.host)
        }
    }

    /// `http://127.0.0.1:<port>`: the client URL.
    pub fn endpoint(&self) -> String {
        self.url(self.client_port)
    }

    /// `[endpoint]`, the shape client constructors take.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// The data directory (kept across [`Etcd::stop`] / [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// etcd's output so far.
    pub fn log(&self) -> String {
        match &self.proc {
            Some(Proc::InNs(g)) => g.log(),
            _ => std::fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default(),
        }
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        match &self.proc {
            Some(Proc::Host(c)) => Some(c.id()),
            Some(Proc::InNs(g)) => Some(g.pid()),
            None => None,
        }
    }

    fn args(&self) -> Vec<String> {
        let peer = self.url(self.peer_port);
        let client = self.endpoint();
        vec![
            "--name".into(),
            self.name.clone(),
            "--data-dir".into(),
            self.data_dir().display().to_string(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            format!("{}={peer}", self.name),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ]
    }

    /// Starts the process and waits for health; on failure kills it and
    /// returns the log.
    fn launch(&mut self) -> Result<(), String> {
        assert!(std::path::Path::new(ETCD_BIN).exists(), "testkit: {ETCD_BIN} missing: run `bash scripts/setup.sh`");
        let args = self.args();
        match self.ns {
            None => {
                let log = File::create(self.log_path()).expect("testkit: etcd log file");
                let child = Command::new(ETCD_BIN)
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().expect("dup"))
                    .stderr(log)
                    .process_group(0)
                    .spawn()
                    .unwrap_or_else(|e| panic!("testkit: cannot run {ETCD_BIN}: {e}"));
                self.proc = Some(Proc::Host(child));
            }
            Some(ns) => {
                let mut argv: Vec<&str> = vec![ETCD_BIN];
                argv.extend(args.iter().map(|s| s.as_str()));
                self.proc = Some(Proc::InNs(spawn_in(ns, &argv)));
            }
        }
        let addr: SocketAddr = match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, self.client_port),
            Err(_) => panic!("testkit: etcd host {:?} is not an IP address", self.host),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ok = match self.ns {
                None => healthy(addr),
                Some(ns) => ns.enter(|| healthy(addr)),
            };
            if ok {
                return Ok(());
            }
            if !self.running() || Instant::now() >= deadline {
                let log = self.log();
                self.kill();
                return Err(log);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&mut self) -> bool {
        match &mut self.proc {
            Some(Proc::Host(c)) => matches!(c.try_wait(), Ok(None)),
            Some(Proc::InNs(g)) => g.running(),
            None => false,
        }
    }

    /// SIGKILL by pid and reap (a frozen process dies too).
    fn kill(&mut self) {
        match self.proc.take() {
            Some(Proc::Host(mut c)) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Some(Proc::InNs(g)) => drop(g), // kills its process group by pid and reaps
            None => {}
        }
    }

    /// Kills etcd (SIGKILL, by pid), keeping its data and ports for
    /// [`Etcd::restart`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts etcd again on the same ports with the same data; panics if it
    /// does not become healthy.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.launch() {
            panic!("testkit: etcd did not restart:\n{log}");
        }
    }

    fn signal(&self, sig: Signal) {
        let pid = self.pid().expect("testkit: etcd is not running");
        kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("testkit: kill -{sig} {pid}: {e}"));
    }

    /// Freezes etcd (SIGSTOP): connections open, nothing answers. A hung
    /// store, for timeout tests.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Thaws a paused etcd (SIGCONT).
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }
}

impl Drop for Etcd<'_> {
    fn drop(&mut self) {
        self.kill();
    }
}
