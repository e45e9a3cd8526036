//! TCP reachability between namespaces, with std sockets only.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::names::unique;
use crate::Netns;

/// How long binding may wait for the server address to become usable (IPv6
/// addresses are tentative until DAD finishes).
const BIND_WAIT: Duration = Duration::from_secs(3);

/// True if a client in `client` can open a TCP connection to
/// `server_ip:port` in `server` and get a token echoed back, within 3 s.
///
/// The listener is bound inside `server` (to `server_ip`, which must be one of
/// its addresses: otherwise this panics) before the client connects; the
/// client retries refused/unreachable attempts until the deadline (neighbour
/// discovery, DAD). Nothing leaves the two namespaces.
pub fn tcp_ok(client: &Netns, server: &Netns, server_ip: IpAddr, port: u16) -> bool {
    tcp_ok_within(client, server, server_ip, port, Duration::from_secs(3))
}

/// [`tcp_ok`] with an explicit client deadline (e.g. shorter for negative
/// tests that expect no connectivity).
pub fn tcp_ok_within(client: &Netns, server: &Netns, server_ip: IpAddr, port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::new(server_ip, port);
    let listener = server.enter(|| bind_retry(addr));
    let listener = match listener {
        Ok(l) => l,
        Err(e) => panic!(
            "testkit: tcp_ok: cannot listen on {addr} in netns {}: {e} (is {server_ip} an address of that namespace?)",
            server.name()
        ),
    };
    listener.set_nonblocking(true).expect("nonblocking listener");

    let stop = Arc::new(AtomicBool::new(false));
    let server_thread = {
        let stop = stop.clone();
        // The socket already belongs to the server netns; any thread may accept.
        thread::spawn(move || serve(listener, &stop))
    };

    let token = format!("{}\n", unique("tern-testkit-token"));
    let result = client.enter(|| connect_echo(addr, &token, timeout));
    stop.store(true, Ordering::Relaxed);
    let _ = server_thread.join();
    match result {
        Ok(()) => true,
        Err(e) => {
            eprintln!("testkit: tcp_ok {} -> {addr} ({}): {e}", client.name(), server.name());
            false
        }
    }
}

fn bind_retry(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = Instant::now() + BIND_WAIT;
    loop {
        match TcpListener::bind(addr) {
            Err(e) if e.kind() == ErrorKind::AddrNotAvailable && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(50))
            }
            r => return r,
        }
    }
}

fn serve(listener: TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = echo_line(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn echo_line(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    (&stream).write_all(line.as_bytes())
}

fn connect_echo(addr: SocketAddr, token: &str, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(ErrorKind::TimedOut, "no connection before the deadline"));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                s.set_read_timeout(Some(left))?;
                s.set_write_timeout(Some(left))?;
                (&s).write_all(token.as_bytes())?;
                let mut back = String::new();
                BufReader::new(&s).read_line(&mut back)?;
                return if back == token {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!("echo mismatch: {back:?}")))
                };
            }
            Err(e) => last_err = e,
        }
        if Instant::now() + Duration::from_millis(50) >= deadline {
            return Err(last_err);
        }
        thread::sleep(Duration::from_millis(50));
    }
}
