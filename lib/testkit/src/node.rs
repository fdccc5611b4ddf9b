//! Hardware in the loop, emulated: the sensor-node firmware (`firmware/`) booted in
//! `qemu-system-arm -machine mps2-an386` ([`QemuNode`]), its UART0 on a TCP line through a
//! [`LineProxy`] that decodes what the node really sent (the ground truth, [`NodeTruth`]),
//! flips bits on demand, and lets the agent's serial source connect, die and connect again.
//!
//! Needs `qemu-system-arm` and the `thumbv7em-none-eabihf` Rust target (scripts/install-deps.sh
//! installs both); without them the harness panics saying so.
//!
//! A real board instead of QEMU: [`HilNode::start`] gives a [`BoardNode`] when
//! `EMBER_HIL_SERIAL` names the board's serial port ([`BoardConfig::from_env`] lists the other
//! variables; docs/hil.md, "A real board"), and [`firmware_elf`] the board's image when
//! `EMBER_HIL_ELF` names one. [`QemuBoard`] is QEMU playing such a board (a pseudo-terminal,
//! QMP commands): the board path's self-test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use ember_proto::node::{self as link, FrameReader, MAX_FRAME_BYTES, NodeFrame, Pushed};

use crate::wait_until;

mod board;
pub use board::{BoardConfig, BoardNode, DEFAULT_BAUD, QemuBoard, sh_quote};

/// How long QEMU may take to open its monitor socket, or to answer a monitor command.
const QMP_WAIT: Duration = Duration::from_secs(20);

/// The node's firmware image for the HIL tests: the file `EMBER_HIL_ELF` names (a real
/// board's image), else [`qemu_firmware_elf`].
pub fn firmware_elf() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(
        || match std::env::var_os("EMBER_HIL_ELF").filter(|v| !v.is_empty()) {
            Some(elf) => {
                let elf = PathBuf::from(elf);
                assert!(
                    elf.is_file(),
                    "EMBER_HIL_ELF={} is not a file (the board's firmware image, built for it)",
                    elf.display()
                );
                elf
            }
            None => qemu_firmware_elf().to_path_buf(),
        },
    )
}

/// The firmware (`ember-node` for mps2-an386, release), built once per test binary into
/// `$CARGO_TARGET_DIR/hil-firmware` (or `<repo>/target/hil-firmware`).
pub fn qemu_firmware_elf() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let fw = root.join("firmware");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("hil-firmware");
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "ember-node-mps2-an386", "--bin", "ember-node"])
            .current_dir(&fw)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("run cargo to build the firmware");
        assert!(
            out.status.success(),
            "building the firmware failed (is the thumbv7em-none-eabihf target installed? scripts/install-deps.sh adds it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("thumbv7em-none-eabihf/release/ember-node")
    })
}

/// One boot of the node as the line showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSeen {
    pub boot: u32,
    /// The last sample's seq + 1 (0 before any sample).
    pub samples: u64,
    /// The latest status's `next_seq` (0 before any status).
    pub status_next: u64,
    /// The latest status's `overruns` (the node's own drops).
    pub overruns: u64,
}

/// What the node put on the line, decoded before any damage: the ground truth.
#[derive(Debug, Default, Clone)]
pub struct NodeTruth {
    pub boots: Vec<BootSeen>,
    /// The last sample's (boot, seq).
    pub last: Option<(u32, u32)>,
    /// Sample (or, from a node running a model, result) frames seen (each boot's, resent or
    /// not).
    pub sample_frames: u64,
}

impl NodeTruth {
    /// The samples the node numbered, as the line shows them: a finished boot up to its last
    /// sample or status (what it had buffered at the reset is lost, and the agent learns how
    /// much from that status); the current boot up to its last sample.
    pub fn numbered(&self) -> u64 {
        let n = self.boots.len();
        self.boots
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if i + 1 < n {
                    b.samples.max(b.status_next)
                } else {
                    b.samples
                }
            })
            .sum()
    }

    fn see(&mut self, frame: NodeFrame) {
        let (boot, samples, status) = match frame {
            NodeFrame::Hello(h) => (h.boot, 0, None),
            NodeFrame::Resumed(r) => (r.boot, 0, None),
            NodeFrame::Status(s) => (s.boot, 0, Some(s)),
            NodeFrame::Sample(s) => {
                self.last = Some((s.boot, s.seq));
                self.sample_frames += 1;
                (s.boot, u64::from(s.seq) + 1, None)
            }
            // A node running a model numbers its results as it numbers samples.
            NodeFrame::Result(r) => {
                self.last = Some((r.boot, r.seq));
                self.sample_frames += 1;
                (r.boot, u64::from(r.seq) + 1, None)
            }
            // Names the node's model; numbers nothing.
            NodeFrame::Model(_) => return,
        };
        if self.boots.last().is_none_or(|b| b.boot != boot) {
            self.boots.push(BootSeen {
                boot,
                samples: 0,
                status_next: 0,
                overruns: 0,
            });
        }
        if let Some(b) = self.boots.last_mut() {
            b.samples = b.samples.max(samples);
            if let Some(s) = status {
                b.status_next = b.status_next.max(u64::from(s.next_seq));
                b.overruns = u64::from(s.overruns);
            }
        }
    }
}

struct ProxyShared {
    truth: Mutex<NodeTruth>,
    flip_every: AtomicU64,
    flipped: AtomicU64,
    forwarded: AtomicU64,
    node_connected: AtomicBool,
    agent_connections: AtomicU64,
    /// The agent end now connected; `None` while no agent reads the line.
    agent: Mutex<Option<TcpStream>>,
    agent_changed: Condvar,
    stop: AtomicBool,
}

/// A TCP line between the node (QEMU, or a board's tty bridge: [`HilNode`]; it connects to
/// [`LineProxy::node_port`]) and the agent's serial source (which connects to
/// [`LineProxy::agent_port`], and may reconnect). Forwards both ways; decodes every node frame before any damage ([`LineProxy::truth`]); while
/// [`LineProxy::flip_every`] is set, flips one bit in every that many bytes from the node.
///
/// While no agent is connected the proxy stops reading from the node, as a USB CDC-ACM line
/// with no reader does: the node's UART stalls and its ring buffer takes the samples.
pub struct LineProxy {
    pub node_port: u16,
    pub agent_port: u16,
    shared: Arc<ProxyShared>,
}

impl LineProxy {
    pub fn start() -> LineProxy {
        let node_l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let agent_l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = LineProxy {
            node_port: node_l.local_addr().expect("addr").port(),
            agent_port: agent_l.local_addr().expect("addr").port(),
            shared: Arc::new(ProxyShared {
                truth: Mutex::default(),
                flip_every: AtomicU64::new(0),
                flipped: AtomicU64::new(0),
                forwarded: AtomicU64::new(0),
                node_connected: AtomicBool::new(false),
                agent_connections: AtomicU64::new(0),
                agent: Mutex::new(None),
                agent_changed: Condvar::new(),
                stop: AtomicBool::new(false),
            }),
        };
        let (node_tx, node_rx) = std::sync::mpsc::channel::<TcpStream>();
        let shared = p.shared.clone();
        // Agents: each connection replaces the last; its commands go to the node.
        std::thread::spawn(move || {
            let Ok(node) = node_rx.recv() else { return };
            for conn in agent_l.incoming() {
                let Ok(conn) = conn else { return };
                if shared.stop.load(Relaxed) {
                    return;
                }
                let (Ok(mut rd), Ok(mut wr)) = (conn.try_clone(), node.try_clone()) else {
                    return;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut rd, &mut wr);
                });
                *shared.agent.lock().expect("agent") = Some(conn);
                shared.agent_connections.fetch_add(1, Relaxed);
                shared.agent_changed.notify_all();
            }
        });
        let shared = p.shared.clone();
        std::thread::spawn(move || {
            let Ok((node, _)) = node_l.accept() else {
                return;
            };
            shared.node_connected.store(true, Relaxed);
            if node_tx.send(node.try_clone().expect("clone")).is_err() {
                return;
            }
            pump(&shared, node);
        });
        p
    }

    /// What the node put on the line so far.
    pub fn truth(&self) -> NodeTruth {
        self.shared.truth.lock().expect("truth").clone()
    }

    /// Flip one bit in every `n` bytes from the node from now on (0: stop flipping).
    pub fn flip_every(&self, n: u64) {
        self.shared.flip_every.store(n, Relaxed);
    }

    /// Bits flipped so far.
    pub fn flipped(&self) -> u64 {
        self.shared.flipped.load(Relaxed)
    }

    /// Agent connections accepted so far.
    pub fn agent_connections(&self) -> u64 {
        self.shared.agent_connections.load(Relaxed)
    }

    /// Whether the node's side (QEMU's serial line, a board's bridge) is connected.
    pub fn node_connected(&self) -> bool {
        self.shared.node_connected.load(Relaxed)
    }
}

/// Node → agent: waits for an agent (not reading the node meanwhile), forwards until its
/// connection fails, then waits for the next one. Bytes read when the agent failed are lost,
/// as on a line whose reader went away.
fn pump(shared: &ProxyShared, mut node: TcpStream) {
    let mut reader = FrameReader::<MAX_FRAME_BYTES>::new();
    let mut buf = [0u8; 4096];
    let mut count = 0u64;
    while !shared.stop.load(Relaxed) {
        let agent = {
            let mut a = shared.agent.lock().expect("agent");
            loop {
                if let Some(conn) = a.as_ref() {
                    break conn.try_clone().ok();
                }
                if shared.stop.load(Relaxed) {
                    return;
                }
                a = shared
                    .agent_changed
                    .wait_timeout(a, Duration::from_millis(200))
                    .expect("agent")
                    .0;
            }
        };
        let Some(mut agent) = agent else { continue };
        let n = match node.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let every = shared.flip_every.load(Relaxed);
        {
            let mut t = shared.truth.lock().expect("truth");
            for (i, b) in buf[..n].iter_mut().enumerate() {
                // A frame a reset cut short does not decode: it was never whole on the line,
                // for the agent either.
                if let Pushed::Frame(body) = reader.push(*b)
                    && let Ok(frame) = link::decode(body)
                {
                    t.see(frame);
                }
                count += 1;
                if every > 0 && count.is_multiple_of(every) {
                    *b ^= 1 << (i % 8);
                    shared.flipped.fetch_add(1, Relaxed);
                }
            }
        }
        if agent.write_all(&buf[..n]).is_err() {
            // The agent went away: forget it (a newer connection may already have replaced it).
            let mut a = shared.agent.lock().expect("agent");
            if a.as_ref()
                .and_then(|c| c.peer_addr().ok())
                .is_none_or(|p| Some(p) == agent.peer_addr().ok())
            {
                *a = None;
            }
            continue;
        }
        shared.forwarded.fetch_add(n as u64, Relaxed);
    }
}

impl Drop for LineProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        self.shared.agent_changed.notify_all();
    }
}

/// The node under test: the firmware in QEMU (the default), or a real board when
/// `EMBER_HIL_SERIAL` names its serial port ([`BoardConfig::from_env`]). Either way its line
/// connects to `127.0.0.1:serial_port` (a [`LineProxy`]'s node side) and the node does not
/// run until [`HilNode::resume`].
pub enum HilNode {
    Qemu(QemuNode),
    Board(BoardNode),
}

impl HilNode {
    pub fn start(elf: &Path, serial_port: u16) -> HilNode {
        match BoardConfig::from_env() {
            Some(config) => HilNode::Board(BoardNode::start(config, elf, serial_port)),
            None => HilNode::Qemu(QemuNode::start(elf, serial_port)),
        }
    }

    /// Starts the node (the first time), or lets it run again after [`Self::halt`].
    pub fn resume(&mut self) {
        match self {
            HilNode::Qemu(q) => q.resume(),
            HilNode::Board(b) => b.resume(),
        }
    }

    /// Stops the node: nothing more reaches the line until [`Self::resume`].
    pub fn halt(&mut self) {
        match self {
            HilNode::Qemu(q) => q.halt(),
            HilNode::Board(b) => b.halt(),
        }
    }

    /// Resets the node mid-stream: a new boot (its boot counter survives in RAM).
    pub fn reset(&mut self) {
        match self {
            HilNode::Qemu(q) => q.reset(),
            HilNode::Board(b) => b.reset(),
        }
    }
}

/// The node in QEMU, paused until `execute("cont")`; its QMP monitor on a Unix socket, its
/// UART0 connected to `127.0.0.1:serial_port`.
pub struct QemuNode {
    child: Child,
    qmp: BufReader<UnixStream>,
    _dir: tempfile::TempDir,
}

impl QemuNode {
    pub fn start(elf: &Path, serial_port: u16) -> QemuNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-arm")
            .args(["-machine", "mps2-an386", "-cpu", "cortex-m4", "-nographic", "-monitor", "none"])
            .args(["-icount", "shift=0,sleep=off", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .arg("-serial")
            .arg(format!("tcp:127.0.0.1:{serial_port}"))
            .arg("-kernel")
            .arg(elf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-arm is not installed: run scripts/install-deps.sh (Debian package qemu-system-arm)");
        let mut conn = None;
        assert!(
            wait_until(QMP_WAIT, || {
                conn = UnixStream::connect(&sock).ok();
                conn.is_some()
            }),
            "QEMU's QMP socket {} never appeared",
            sock.display()
        );
        let conn = conn.expect("connected");
        conn.set_read_timeout(Some(QMP_WAIT)).expect("timeout");
        let mut q = QemuNode {
            child,
            qmp: BufReader::new(conn),
            _dir: dir,
        };
        q.read_reply("greeting");
        q.execute("qmp_capabilities");
        q
    }

    fn read_reply(&mut self, what: &str) -> String {
        loop {
            let mut line = String::new();
            self.qmp
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("QMP {what}: {e}"));
            assert!(!line.is_empty(), "QMP closed while waiting for {what}");
            // Events (RESET, STOP, ...) interleave with replies.
            if !line.contains("\"event\"") {
                return line;
            }
        }
    }

    /// Runs a QMP command without arguments (`cont`, `stop`, `system_reset`); panics if QEMU
    /// refuses it.
    pub fn execute(&mut self, cmd: &str) {
        writeln!(self.qmp.get_mut(), "{{\"execute\":\"{cmd}\"}}").expect("QMP write");
        let reply = self.read_reply(cmd);
        assert!(reply.contains("\"return\""), "QMP {cmd} failed: {reply}");
    }

    /// QMP `cont`.
    pub fn resume(&mut self) {
        self.execute("cont");
    }

    /// QMP `stop`.
    pub fn halt(&mut self) {
        self.execute("stop");
    }

    /// QMP `system_reset` (a stopped guest stays stopped).
    pub fn reset(&mut self) {
        self.execute("system_reset");
    }
}

impl Drop for QemuNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
