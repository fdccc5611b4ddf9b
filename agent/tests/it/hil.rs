//! Hardware in the loop, emulated: the real sensor-node firmware (`firmware/`, built here for
//! thumbv7em) boots in `qemu-system-arm -machine mps2-an386`; its UART0 goes through a TCP
//! proxy (that flips bits on demand and decodes what the node really sent) to the agent
//! binary's `serial` source, and on to a real Mosquitto. The node is reset through QEMU's
//! monitor (QMP `system_reset`) mid-stream.
//!
//! Needs `qemu-system-arm` (scripts/install-deps.sh installs it) and the thumbv7em-none-eabihf
//! Rust target; without them the test fails saying so.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ember_proto::node::{self as link, FrameReader, MAX_FRAME_BYTES, NodeFrame, Pushed};
use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, wait_until};

use crate::common::*;

/// Builds the firmware once per test run (release, its own target dir beside this build's).
fn firmware_elf() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
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

/// What the node put on the line, decoded before any damage: the ground truth.
#[derive(Debug, Default)]
struct Truth {
    /// Per boot seen: (boot, last seq + 1, the latest status's next_seq).
    boots: Vec<(u32, u64, u64)>,
    /// The last sample's (boot, seq), to know when the agent has caught up.
    last: Option<(u32, u32)>,
}

impl Truth {
    /// The samples the node numbered as the line shows them: a finished boot up to its last
    /// sample or status (what it had buffered at the reset is lost, and the agent learns how
    /// much from that status); the current boot up to its last sample.
    fn numbered(&self) -> u64 {
        let n = self.boots.len();
        self.boots
            .iter()
            .enumerate()
            .map(|(i, (_, samples, status))| {
                if i + 1 < n {
                    *samples.max(status)
                } else {
                    *samples
                }
            })
            .sum()
    }

    fn see(&mut self, frame: NodeFrame) {
        let (boot, samples, status) = match frame {
            NodeFrame::Hello(h) => (h.boot, 0, 0),
            NodeFrame::Status(s) => (s.boot, 0, u64::from(s.next_seq)),
            NodeFrame::Sample(s) => {
                self.last = Some((s.boot, s.seq));
                (s.boot, u64::from(s.seq) + 1, 0)
            }
        };
        match self.boots.last_mut() {
            Some((b, m, st)) if *b == boot => {
                *m = (*m).max(samples);
                *st = (*st).max(status);
            }
            _ => self.boots.push((boot, samples, status)),
        }
    }
}

/// Between QEMU (which connects to `node_port`) and the agent (which connects to
/// `agent_port`): forwards both ways; while `flip_every` > 0, flips one bit in every that many
/// bytes from the node, after the truth has seen them.
struct Proxy {
    node_port: u16,
    agent_port: u16,
    truth: Arc<Mutex<Truth>>,
    flip_every: Arc<AtomicU64>,
    flipped: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    /// Both ends are connected.
    connected: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start() -> Proxy {
        let node_l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let agent_l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = Proxy {
            node_port: node_l.local_addr().expect("addr").port(),
            agent_port: agent_l.local_addr().expect("addr").port(),
            truth: Arc::default(),
            flip_every: Arc::default(),
            flipped: Arc::default(),
            forwarded: Arc::default(),
            connected: Arc::default(),
            stop: Arc::default(),
        };
        let (truth, flip_every, flipped, forwarded, connected, stop) = (
            p.truth.clone(),
            p.flip_every.clone(),
            p.flipped.clone(),
            p.forwarded.clone(),
            p.connected.clone(),
            p.stop.clone(),
        );
        std::thread::spawn(move || {
            let Ok((node, _)) = node_l.accept() else {
                return;
            };
            let Ok((agent, _)) = agent_l.accept() else {
                return;
            };
            connected.store(true, Relaxed);
            // Commands: agent -> node, untouched.
            let (mut a_rd, mut n_wr) = (
                agent.try_clone().expect("clone"),
                node.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a_rd, &mut n_wr);
            });
            let (mut n_rd, mut a_wr) = (node, agent);
            let mut reader = FrameReader::<MAX_FRAME_BYTES>::new();
            let mut buf = [0u8; 4096];
            let mut count = 0u64;
            while !stop.load(Relaxed) {
                let n = match n_rd.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let every = flip_every.load(Relaxed);
                {
                    let mut t = truth.lock().expect("truth");
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        // A frame the reset cut short does not decode: it was never whole on
                        // the line, for the agent either.
                        if let Pushed::Frame(body) = reader.push(*b)
                            && let Ok(frame) = link::decode(body)
                        {
                            t.see(frame);
                        }
                        count += 1;
                        if every > 0 && count.is_multiple_of(every) {
                            *b ^= 1 << (i % 8);
                            flipped.fetch_add(1, Relaxed);
                        }
                    }
                }
                if a_wr.write_all(&buf[..n]).is_err() {
                    return;
                }
                forwarded.fetch_add(n as u64, Relaxed);
            }
        });
        p
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// The node in QEMU, paused until [`Qemu::cont`]; its QMP monitor on a Unix socket.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
    _dir: tempfile::TempDir,
}

impl Qemu {
    fn start(elf: &Path, serial_port: u16) -> Qemu {
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
            wait_until(SHORT, || {
                conn = UnixStream::connect(&sock).ok();
                conn.is_some()
            }),
            "QEMU's QMP socket {} never appeared",
            sock.display()
        );
        let conn = conn.expect("connected");
        conn.set_read_timeout(Some(SHORT)).expect("timeout");
        let mut q = Qemu {
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

    fn execute(&mut self, cmd: &str) {
        writeln!(self.qmp.get_mut(), "{{\"execute\":\"{cmd}\"}}").expect("QMP write");
        let reply = self.read_reply(cmd);
        assert!(reply.contains("\"return\""), "QMP {cmd} failed: {reply}");
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole chain: node (QEMU) → proxy → agent → Mosquitto. Phases: a clean stream, a damaged
/// line (bits flipped: refused frames, counted, the stream resumes), a node reset (a new boot,
/// nothing double-counted), then the node is paused and the ledger must close exactly:
/// samples the agent captured + samples it counted as corrupt or gap = the samples the node
/// numbered on the line, and every captured sample reaches the broker.
#[test]
fn firmware_in_qemu_feeds_the_agent_through_a_damaged_line_and_a_reset() {
    let elf = firmware_elf();
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let proxy = Proxy::start();
    let mut qemu = Qemu::start(elf, proxy.node_port);
    let dev = "node-1";
    let agent = agent(dev, broker.port())
        .source(&format!(
            "type = \"serial\"\nstream = \"imu\"\ndevice = \"tcp:127.0.0.1:{}\"\nrate_hz = 1000\nchannels = 6",
            proxy.agent_port
        ))
        .start();
    // The agent is connected (it greets the node at once); only now does the guest run.
    assert!(
        wait_until(SHORT, || proxy.connected.load(Relaxed)),
        "the agent's serial source never connected to tcp:127.0.0.1:{}",
        proxy.agent_port
    );
    qemu.execute("cont");

    // 1. Clean: samples flow; time how fast the source takes them.
    let t0 = Instant::now();
    let clean = agent.expect_metric("records_captured_total", |v| v >= 2000.0, LONG);
    let rate = clean / t0.elapsed().as_secs_f64();
    eprintln!(
        "hil: the serial source took {clean} samples at {rate:.0} samples/s (node at 1 kHz guest time, QEMU -icount)"
    );
    // An undamaged line refuses no frame (a node overrun on a starved machine would be a gap,
    // which the ledger below accounts for: it is not asserted away here).
    let m = agent.metrics();
    assert_eq!(
        m.get("serial_frames_refused_total").copied().unwrap_or(0.0),
        0.0,
        "a clean line refuses nothing: {m:?}"
    );

    // 2. Damaged: one flipped bit every 501 bytes.
    proxy.flip_every.store(501, Relaxed);
    agent.expect_metric("serial_frames_refused_total", |v| v >= 10.0, LONG);
    proxy.flip_every.store(0, Relaxed);
    let before = agent.metric("records_captured_total");
    agent.expect_metric("records_captured_total", |v| v >= before + 500.0, LONG);

    // 3. Reset the node mid-stream.
    qemu.execute("system_reset");
    agent.expect_metric("serial_node_reboots_total", |v| v >= 1.0, LONG);
    let before = agent.metric("records_captured_total");
    agent.expect_metric("records_captured_total", |v| v >= before + 500.0, LONG);

    // 4. Pause the node; wait until the agent has what the proxy forwarded; close the ledger.
    qemu.execute("stop");
    let truth = || {
        let t = proxy.truth.lock().expect("truth");
        (t.numbered(), t.last, t.boots.clone())
    };
    let ledger = || {
        let m = agent.metrics();
        m.get("records_captured_total").copied().unwrap_or(0.0) + rejected_total(&m)
    };
    let closed = wait_until(LONG, || truth().0 as f64 == ledger());
    let (numbered, last, boots) = truth();
    assert!(
        closed,
        "ledger open: the node numbered {numbered} samples on the line (boots {boots:?}, last {last:?}); the agent accounts for {} (metrics {:?})",
        ledger(),
        agent.metrics()
    );
    assert!(boots.len() >= 2, "the reset gave a new boot: {boots:?}");
    let m = agent.metrics();
    let corrupt = m
        .get("input_rejected_total{reason=\"corrupt\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(
        corrupt >= 1.0,
        "damaged samples are counted as corrupt: {m:?}"
    );
    assert!(proxy.flipped.load(Relaxed) > 0);

    // Every captured sample reaches the broker, in order, once.
    let captured = m.get("records_captured_total").copied().unwrap_or(0.0) as u64;
    wait_all_delivered(&sub, dev, "imu", captured, LONG);
    sub.with_view(assert_clean_delivery);
    stop_gracefully(&agent, LONG);
    let status = final_status(&sub, dev);
    let counters = status.counters.expect("the final status carries counters");
    assert_eq!(
        counters.rejected as f64,
        rejected_total(&m),
        "the status carries the source's rejects to the fleet"
    );
}
