//! A TCP proxy in front of the broker that can hold what one client sends: the test decides
//! when a replica's packets reach the broker, to replay a race deterministically.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_testkit::localhost;

#[derive(Default)]
struct Shared {
    /// While set, bytes from clients are buffered instead of forwarded.
    hold: AtomicBool,
    /// Everything buffered while held (for the test to look into).
    held: Mutex<Vec<u8>>,
    /// Bytes the broker sent to clients since the last release.
    down_since_release: AtomicU64,
    stop: AtomicBool,
}

/// Listens on a free 127.0.0.1 port and forwards every connection to `upstream`.
pub struct HoldProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl HoldProxy {
    pub fn start(upstream: u16) -> HoldProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("address").port();
        listener.set_nonblocking(true).expect("non-blocking");
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(localhost(upstream)) else {
                            continue;
                        };
                        pump(client, server, s.clone());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        HoldProxy { port, shared }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on, what clients send is buffered.
    pub fn hold(&self) {
        self.shared.hold.store(true, Ordering::Release);
    }

    /// Forwards what was buffered, then everything as it comes.
    pub fn release(&self) {
        self.shared.down_since_release.store(0, Ordering::Release);
        self.shared.hold.store(false, Ordering::Release);
    }

    /// Whether the bytes buffered so far contain `needle`.
    pub fn held_contains(&self, needle: &[u8]) -> bool {
        let held = self.shared.held.lock().expect("lock");
        held.windows(needle.len()).any(|w| w == needle)
    }

    /// Bytes the broker sent back since the last [`HoldProxy::release`].
    pub fn down_since_release(&self) -> u64 {
        self.shared.down_since_release.load(Ordering::Acquire)
    }
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.hold.store(false, Ordering::Release);
    }
}

fn pump(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // Client → broker, held on request.
    {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let (mut from, mut to) = (client, s2);
            from.set_read_timeout(Some(Duration::from_millis(20))).ok();
            let mut pending: Vec<u8> = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    break;
                }
                let held = shared.hold.load(Ordering::Acquire);
                if !held && !pending.is_empty() {
                    if to.write_all(&pending).is_err() {
                        break;
                    }
                    pending.clear();
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if shared.hold.load(Ordering::Acquire) {
                            pending.extend_from_slice(&buf[..n]);
                            shared
                                .held
                                .lock()
                                .expect("lock")
                                .extend_from_slice(&buf[..n]);
                        } else if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
            // The client went away while held: what it sent still reaches the broker, later.
            while shared.hold.load(Ordering::Acquire) && !shared.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !pending.is_empty() {
                let _ = to.write_all(&pending);
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
    // Broker → client.
    std::thread::spawn(move || {
        let (mut from, mut to) = (server, c2);
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    shared
                        .down_since_release
                        .fetch_add(n as u64, Ordering::AcqRel);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
