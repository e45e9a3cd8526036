//! Running commands inside a namespace, with a timeout.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use nix::libc;

use crate::Netns;

/// Default limit for every command the kit runs; on expiry the command's
/// whole process group is killed (SIGKILL).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A `Command` whose child enters `ns` before exec, like `ip netns exec`:
/// setns into the network namespace, then a private mount namespace in which
/// `/sys` is remounted so `/sys/class/net` shows the namespace's own links.
/// The child gets its own process group so a timeout can kill all of it.
pub(crate) fn command_in(ns: &Netns, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    let fd: Arc<OwnedFd> = ns.fd();
    // SAFETY: the closure only makes raw syscalls (async-signal-safe) on an fd
    // and static C strings; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || enter_in_child(fd.as_raw_fd()));
    }
    cmd.process_group(0);
    cmd
}

fn enter_in_child(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain syscalls with valid arguments.
    unsafe {
        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Best effort, as `ip netns exec` does: own mount ns, own /sys.
        if libc::unshare(libc::CLONE_NEWNS) == 0 {
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            );
            if libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) == 0 {
                libc::mount(c"sysfs".as_ptr(), c"/sys".as_ptr(), c"sysfs".as_ptr(), 0, std::ptr::null());
            }
        }
    }
    Ok(())
}

/// Exit code as a shell reports it: the code, or 128 + signal.
pub(crate) fn code_of(status: &ExitStatus) -> i32 {
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1)
}

fn reader(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn kill_group(pgid: i32) {
    // The group was created for this child (process_group(0)): pgid == its pid.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
}

/// Runs `cmd` to completion with piped stdout/stderr, optional stdin, and a
/// timeout. Waits for the output pipes to close too (as `$(...)` does), within
/// the same deadline. `ns`, if given, records the child so the namespace guard
/// can kill leftovers on drop.
pub(crate) fn output(
    mut cmd: Command,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    ns: Option<&Netns>,
    what: &str,
) -> Output {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.process_group(0);
    let deadline = Instant::now() + timeout;
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("testkit: cannot start {what}: {e}"));
    let pid = child.id() as i32;
    if let Some(ns) = ns {
        ns.track(pid);
    }
    let stdin_writer = match (child.stdin.take(), stdin) {
        (Some(mut w), Some(data)) => Some(thread::spawn(move || {
            let _ = w.write_all(&data);
        })),
        _ => None,
    };
    let out_rx = reader(child.stdout.take().expect("piped stdout"));
    let err_rx = reader(child.stderr.take().expect("piped stderr"));
    let (tx, exited) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(());
        status
    });

    let mut timed_out = false;
    if exited.recv_timeout(timeout).is_err() {
        // Not reaped yet, so the pid (= pgid) is still ours.
        timed_out = true;
        kill_group(pid);
    }
    let status = waiter.join().expect("waiter thread").unwrap_or_else(|e| panic!("testkit: wait for {what}: {e}"));
    let ino = ns.map(Netns::inode);
    let mut collect = |rx: mpsc::Receiver<Vec<u8>>| -> Vec<u8> {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => b,
            Err(_) => {
                // Something the command left in the background holds the pipe.
                // The leader is reaped, so only signal group members we can
                // prove are ours: those inside the test's namespace.
                timed_out = true;
                if let Some(ino) = ino {
                    crate::netns::kill_group_in_ns(ino, pid);
                }
                rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
            }
        }
    };
    let stdout = collect(out_rx);
    let mut stderr = collect(err_rx);
    if let Some(t) = stdin_writer {
        let _ = t.join();
    }
    if timed_out {
        stderr.extend_from_slice(
            format!("\n[testkit: {what} killed after the {} s timeout]\n", timeout.as_secs_f32()).as_bytes(),
        );
    }
    Output { status, stdout, stderr }
}

/// Short description of an argv for messages.
pub(crate) fn describe(argv: &[&str]) -> String {
    let s = argv.join(" ");
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}
