//! A real board instead of QEMU: its serial port (a tty: `/dev/ttyACM0`, the debug probe's
//! USB CDC-ACM port) bridged to the [`LineProxy`](super::LineProxy)'s node side, its core
//! flashed and reset by shell commands (`probe-rs` by default; OpenOCD, pyOCD or anything
//! else by environment variable). [`BoardConfig::from_env`] reads the variables;
//! [`HilNode::start`](super::HilNode::start) picks the board when `EMBER_HIL_SERIAL` is set.
//!
//! **The line's start is exact, as QEMU's `-S` makes it.** A board may run the image it was
//! flashed with (or an older one) before the test starts it, and a real UART loses what it
//! receives while the core is halted or still booting. So the bridge:
//! - discards what the tty delivers until [`BoardNode::resume`] first starts the node (the
//!   reset command), then passes the node's bytes on from the first whole `Hello` frame (and
//!   resets again, up to [`RESET_TRIES`] times, when none comes): the proxy's ground truth and
//!   the agent see every boot from its first frame;
//! - holds the agent's bytes (its greeting: `SetRate`, `Resume`, `RequestStatus`) until that
//!   `Hello`, when the node's UART is up, as QEMU holds them in its socket until `cont`;
//! - while halted ([`BoardNode::halt`]) reads nothing from the tty and holds the agent's
//!   bytes: the truth stops moving, as under QEMU's `stop`, even where no command can keep the
//!   core halted (see [`BoardConfig::halt`]).
//!
//! One board serves one test at a time: [`BoardNode::start`] takes an exclusive lock
//! (`flock`) named after the tty, held until the node is dropped, so the tests of one binary
//! (which run in parallel) and of several binaries take turns.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_proto::node::{self as link, MAX_FRAME_BYTES, NodeFrame};

use crate::wait_until;

/// The baud rate when `EMBER_HIL_BAUD` is not set (the firmware's `BAUD`).
pub const DEFAULT_BAUD: u32 = 115_200;
/// How long flashing may take.
const FLASH_WAIT: Duration = Duration::from_secs(300);
/// How long a reset, halt or resume command may take.
const COMMAND_WAIT: Duration = Duration::from_secs(60);
/// How long the node may take, once reset, to send its first `Hello`; and how often the reset
/// is tried (a `Hello` the line lost would otherwise leave the test waiting forever).
const HELLO_WAIT: Duration = Duration::from_secs(10);
const RESET_TRIES: u32 = 3;
/// QEMU polls a pseudo-terminal that had no reader once a second, and drops what the guest
/// sends while it has not noticed the reader (`chardev/char-pty.c`).
const PTY_POLL: Duration = Duration::from_millis(1500);

/// How to reach a board: its serial port and the shell commands that drive its core. Each
/// command runs as `sh -c COMMAND ember-hil ELF`: the firmware image's path is `$1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardConfig {
    /// The board's serial port (`EMBER_HIL_SERIAL`).
    pub serial: PathBuf,
    /// Its baud rate (`EMBER_HIL_BAUD`, default [`DEFAULT_BAUD`]).
    pub baud: u32,
    /// Writes `$1` to the board's flash (`EMBER_HIL_FLASH`; default `probe-rs download --chip
    /// $EMBER_HIL_CHIP "$1"`). The core may run or stay halted afterwards: the bridge
    /// discards whatever it sends until the node is started.
    pub flash: String,
    /// Resets the core and lets it run (`EMBER_HIL_RESET`; default `probe-rs reset --chip
    /// $EMBER_HIL_CHIP`). Starts the node the first time, resets it mid-stream afterwards.
    pub reset: String,
    /// Halts the core (`EMBER_HIL_HALT`; default none). `probe-rs` has no command that leaves
    /// a core halted (it ends every session by disabling halting debug, which lets the core
    /// run), so by default a halt only holds the line (above); set this for a probe that can,
    /// e.g. a command talking to a running OpenOCD's telnet port.
    pub halt: Option<String>,
    /// Lets a halted core run again (`EMBER_HIL_RESUME`; default none, as [`Self::halt`]).
    pub resume: Option<String>,
}

impl BoardConfig {
    /// The board the environment names: `None` when `EMBER_HIL_SERIAL` is not set (the tests
    /// boot QEMU). Panics saying which variable to set when the board's are incomplete.
    pub fn from_env() -> Option<BoardConfig> {
        Self::from_vars(|name| std::env::var(name).ok()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<BoardConfig>, String> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let Some(serial) = var("EMBER_HIL_SERIAL") else {
            return Ok(None);
        };
        let baud =
            match var("EMBER_HIL_BAUD") {
                None => DEFAULT_BAUD,
                Some(b) => b.trim().parse().ok().filter(|b| *b > 0).ok_or_else(|| {
                    format!("EMBER_HIL_BAUD={b:?} is not a baud rate (e.g. 115200)")
                })?,
            };
        if var("EMBER_HIL_ELF").is_none() {
            return Err(format!(
                "EMBER_HIL_SERIAL={serial} names a board, but EMBER_HIL_ELF does not name its \
                 firmware image (the node built for that board; without it the QEMU board's image \
                 would be flashed)"
            ));
        }
        let chip = var("EMBER_HIL_CHIP");
        let probe_rs = |name: &str, default: &dyn Fn(&str) -> String| {
            var(name).or_else(|| chip.as_deref().map(default)).ok_or_else(|| {
                format!(
                    "EMBER_HIL_SERIAL={serial} names a board, but {name} is not set and neither is \
                     EMBER_HIL_CHIP (the chip for probe-rs, e.g. STM32H7A3ZITxQ: `probe-rs chip list`). \
                     Set EMBER_HIL_CHIP, or EMBER_HIL_FLASH and EMBER_HIL_RESET (shell commands for \
                     another probe; the image's path is $1); EMBER_HIL_HALT and EMBER_HIL_RESUME are \
                     optional, EMBER_HIL_BAUD defaults to {DEFAULT_BAUD}, EMBER_HIL_ELF names the \
                     board's firmware image"
                )
            })
        };
        Ok(Some(BoardConfig {
            serial: PathBuf::from(serial.clone()),
            baud,
            flash: probe_rs("EMBER_HIL_FLASH", &|c| {
                format!("probe-rs download --chip {} \"$1\"", sh_quote(c))
            })?,
            reset: probe_rs("EMBER_HIL_RESET", &|c| {
                format!("probe-rs reset --chip {}", sh_quote(c))
            })?,
            halt: var("EMBER_HIL_HALT"),
            resume: var("EMBER_HIL_RESUME"),
        }))
    }
}

/// `s` as one shell word.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Not started: the tty's bytes are discarded, the agent's held.
    Idle,
    /// Reset: the tty's bytes are discarded until a whole `Hello`, passed on from there.
    Syncing,
    /// Both ways.
    Running,
    /// Halted: nothing read from the tty, the agent's bytes held.
    Held,
    /// The node was dropped.
    Closed,
}

struct Gate {
    line: Mutex<Line>,
    changed: Condvar,
}

impl Gate {
    fn get(&self) -> Line {
        *self.line.lock().expect("gate")
    }

    fn set(&self, line: Line) {
        *self.line.lock().expect("gate") = line;
        self.changed.notify_all();
    }

    /// Waits while `holds(line)`; returns the line then.
    fn wait_while(&self, holds: impl Fn(Line) -> bool) -> Line {
        let mut l = self.line.lock().expect("gate");
        while holds(*l) {
            l = self.changed.wait(l).expect("gate");
        }
        *l
    }
}

/// The board, flashed; its node starts at the first [`Self::resume`].
pub struct BoardNode {
    config: BoardConfig,
    elf: PathBuf,
    gate: Arc<Gate>,
    proxy: TcpStream,
    from_node: Option<JoinHandle<()>>,
    started: bool,
    /// The board's lock, released last.
    _lock: File,
}

impl BoardNode {
    /// Locks the board, configures its tty (raw, `baud`), connects it to the proxy's node
    /// side (`127.0.0.1:serial_port`) and flashes `elf`. The node does not run for the test
    /// until [`Self::resume`].
    pub fn start(config: BoardConfig, elf: &Path, serial_port: u16) -> BoardNode {
        let lock = lock_board(&config.serial);
        configure_tty(&config.serial, config.baud);
        let tty = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&config.serial)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot open the board's serial port {} (EMBER_HIL_SERIAL): {e} (is this user in the dialout group?)",
                    config.serial.display()
                )
            });
        let proxy = TcpStream::connect(("127.0.0.1", serial_port))
            .unwrap_or_else(|e| panic!("connect to the line proxy's node port {serial_port}: {e}"));
        let gate = Arc::new(Gate {
            line: Mutex::new(Line::Idle),
            changed: Condvar::new(),
        });
        let from_node = {
            let (tty, proxy, gate) = (
                tty.try_clone().expect("clone the tty"),
                proxy.try_clone().expect("clone the socket"),
                gate.clone(),
            );
            std::thread::spawn(move || node_to_proxy(tty, proxy, &gate))
        };
        {
            // Not joined: it may be blocked in a read of the proxy's socket, which Drop shuts
            // down, or in a write to a tty nobody drains; it holds no lock.
            let (proxy, gate) = (proxy.try_clone().expect("clone the socket"), gate.clone());
            std::thread::spawn(move || proxy_to_node(proxy, tty, &gate));
        }
        let node = BoardNode {
            config,
            elf: elf.to_path_buf(),
            gate,
            proxy,
            from_node: Some(from_node),
            started: false,
            _lock: lock,
        };
        node.run("flash", "EMBER_HIL_FLASH", &node.config.flash, FLASH_WAIT);
        node
    }

    /// Starts the node the first time (the reset command; returns once its `Hello` is on the
    /// line), afterwards lets it run again after [`Self::halt`].
    pub fn resume(&mut self) {
        if self.started {
            if let Some(cmd) = &self.config.resume {
                self.run("resume", "EMBER_HIL_RESUME", cmd, COMMAND_WAIT);
            }
            self.gate.set(Line::Running);
            return;
        }
        self.started = true;
        self.gate.set(Line::Syncing);
        // A boot whose hello the line lost is never passed on (the line stays in `Syncing`):
        // the next reset gives a whole one.
        let hello = (0..RESET_TRIES).any(|_| {
            self.run("reset", "EMBER_HIL_RESET", &self.config.reset, COMMAND_WAIT);
            wait_until(HELLO_WAIT, || self.gate.get() == Line::Running)
        });
        assert!(
            hello,
            "the board sent no hello within {HELLO_WAIT:?} of any of {RESET_TRIES} resets (`{}`): is {} (EMBER_HIL_SERIAL) its UART, at {} baud (EMBER_HIL_BAUD), and EMBER_HIL_ELF this board's image ({})?",
            self.config.reset,
            self.config.serial.display(),
            self.config.baud,
            self.elf.display()
        );
    }

    /// Stops the line (and the core, where [`BoardConfig::halt`] is set).
    pub fn halt(&mut self) {
        self.gate.set(Line::Held);
        if let Some(cmd) = &self.config.halt {
            self.run("halt", "EMBER_HIL_HALT", cmd, COMMAND_WAIT);
        }
    }

    /// Resets the core mid-stream (it runs again at once, a new boot).
    pub fn reset(&mut self) {
        self.run("reset", "EMBER_HIL_RESET", &self.config.reset, COMMAND_WAIT);
    }

    /// Runs one of the board's commands; panics with its output if it fails or hangs.
    fn run(&self, what: &str, var: &str, cmd: &str, timeout: Duration) {
        let mut log = tempfile::tempfile().expect("tempfile");
        let mut child = Command::new("sh")
            .args(["-c", cmd, "ember-hil"])
            .arg(&self.elf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log.try_clone().expect("clone"))
            .process_group(0)
            .spawn()
            .expect("run sh");
        let t0 = Instant::now();
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            crate::process::kill_group(&mut child);
        }
        let mut out = String::new();
        let _ = std::io::Seek::rewind(&mut log);
        let _ = log.read_to_string(&mut out);
        match status {
            Some(s) if s.success() => {}
            Some(s) => panic!("the board's {what} command ({var}: `{cmd}`) failed ({s}):\n{out}"),
            None => panic!(
                "the board's {what} command ({var}: `{cmd}`) did not finish within {:?}:\n{out}",
                t0.elapsed()
            ),
        }
    }
}

impl Drop for BoardNode {
    fn drop(&mut self) {
        self.gate.set(Line::Closed);
        let _ = self.proxy.shutdown(Shutdown::Both);
        // The reader sees `Closed` within the tty's read timeout (0.1 s).
        if let Some(t) = self.from_node.take() {
            let _ = t.join();
        }
    }
}

/// An exclusive lock on the board, named after its tty, in the temporary directory.
fn lock_board(serial: &Path) -> File {
    let name: String = serial
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = std::env::temp_dir().join(format!("ember-hil-{name}.lock"));
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open the board's lock {}: {e}", path.display()));
    f.lock()
        .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
    f
}

/// Raw 8N1 at `baud`, no echo, no flow control, modem lines ignored; reads return after at
/// most 0.1 s (`min 0 time 1`) so the bridge notices when it is closed.
fn configure_tty(serial: &Path, baud: u32) {
    let out = Command::new("stty")
        .arg("-F")
        .arg(serial)
        .arg(baud.to_string())
        .args([
            "raw", "-echo", "-echoe", "-echok", "-echonl", "-iexten", "cs8", "-parenb",
        ])
        .args([
            "-cstopb", "-crtscts", "-ixon", "-ixoff", "clocal", "-hupcl", "min", "0",
        ])
        .args(["time", "1"])
        .output()
        .expect("run stty (coreutils)");
    assert!(
        out.status.success(),
        "stty could not configure {} (EMBER_HIL_SERIAL) for {baud} baud (EMBER_HIL_BAUD): {}",
        serial.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tty's bytes to the proxy, through the gate (module docs).
fn node_to_proxy(mut tty: File, mut proxy: TcpStream, gate: &Gate) {
    let mut buf = [0u8; 4096];
    let mut hello = HelloSync::default();
    loop {
        if gate.wait_while(|l| l == Line::Held) == Line::Closed {
            return;
        }
        let n = match tty.read(&mut buf) {
            // `min 0 time 1`: nothing within 0.1 s.
            Ok(0) => continue,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // The device went away (unplugged; the emulator that played it ended).
            Err(_) => return,
        };
        let pass = match gate.get() {
            Line::Closed => return,
            Line::Idle => continue,
            Line::Syncing => match hello.find(&buf[..n]) {
                Some(from_hello) => {
                    if proxy.write_all(&from_hello).is_err() {
                        return;
                    }
                    // Only now may the agent's greeting reach the node.
                    gate.set(Line::Running);
                    continue;
                }
                None => continue,
            },
            Line::Running | Line::Held => &buf[..n],
        };
        if proxy.write_all(pass).is_err() {
            return;
        }
    }
}

/// The agent's bytes (through the proxy) to the tty, once the node runs.
fn proxy_to_node(mut proxy: TcpStream, mut tty: File, gate: &Gate) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match proxy.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gate.wait_while(|l| matches!(l, Line::Idle | Line::Syncing | Line::Held)) == Line::Closed
        {
            return;
        }
        if tty.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Finds the first whole `Hello` frame in a byte stream. A reset cuts the frame the node was
/// sending, and a node sends no delimiter before its first frame, so the `Hello` usually ends a
/// "frame" that begins with the cut one's bytes: it is looked for in every suffix of a frame
/// that does not decode (COBS and the CRC make a false match as likely as a CRC collision).
#[derive(Default)]
struct HelloSync {
    /// The bytes since the last delimiter (the last [`MAX_FRAME_BYTES`] of them at most).
    raw: Vec<u8>,
}

impl HelloSync {
    /// The stream from the first `Hello` frame on (its bytes, then the rest of `bytes`), once
    /// one ends in `bytes`.
    fn find(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        for (i, &b) in bytes.iter().enumerate() {
            if b != 0 {
                if self.raw.len() == MAX_FRAME_BYTES {
                    self.raw.remove(0);
                }
                self.raw.push(b);
                continue;
            }
            let hello = (0..self.raw.len()).find(|&k| {
                let mut body = self.raw[k..].to_vec();
                matches!(
                    link::decode::<NodeFrame>(&mut body),
                    Ok(NodeFrame::Hello(_))
                )
            });
            if let Some(k) = hello {
                let mut out = self.raw.split_off(k);
                out.push(0);
                out.extend_from_slice(&bytes[i + 1..]);
                return Some(out);
            }
            self.raw.clear();
        }
        None
    }
}

/// QEMU playing a real board, for the board path's self-test: the same firmware, UART0 on a
/// pseudo-terminal (`-serial pty`: a real tty device, configured with `stty` like
/// `/dev/ttyACM0`), and the board's commands small shell command lines that drive QEMU
/// through its QMP socket (`qmp.py`, beside this file): flash = `system_reset` + `cont` (the
/// image runs after flashing, as a real board's may: the bridge must discard it), reset =
/// `system_reset` + `cont`, halt = `stop`, resume = `cont`.
///
/// QEMU drops the guest's output while it has not noticed that its pseudo-terminal has a
/// reader (it polls once a second, [`PTY_POLL`]), and takes a reader that closes the terminal
/// (as `stty -F` does) as gone. So `start` opens the terminal itself and keeps it open for
/// QEMU's lifetime (never reading it), and returns once QEMU has polled it: from then on the
/// line loses nothing, as a real port's would not.
pub struct QemuBoard {
    child: std::process::Child,
    pty: PathBuf,
    _keep_open: File,
    qmp: PathBuf,
    _dir: tempfile::TempDir,
}

impl QemuBoard {
    pub fn start(elf: &Path) -> QemuBoard {
        let dir = tempfile::tempdir().expect("tempdir");
        let qmp = dir.path().join("qmp.sock");
        let log = dir.path().join("qemu.log");
        let mut child = Command::new("qemu-system-arm")
            .args(["-machine", "mps2-an386", "-cpu", "cortex-m4", "-nographic", "-monitor", "none"])
            .args(["-icount", "shift=0,sleep=off", "-S", "-serial", "pty"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(elf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("create QEMU's log"))
            .spawn()
            .expect("qemu-system-arm is not installed: run scripts/install-deps.sh (Debian package qemu-system-arm)");
        // On stdout: "char device redirected to /dev/pts/N (label serial0)"; the rest is drained.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(rest) = line.split("redirected to ").nth(1)
                    && let Some(pty) = rest.split_whitespace().next()
                {
                    let _ = tx.send(PathBuf::from(pty));
                }
            }
        });
        let pty = rx.recv_timeout(super::QMP_WAIT).unwrap_or_else(|_| {
            panic!(
                "QEMU never said which pseudo-terminal its serial port is on: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        assert!(
            wait_until(super::QMP_WAIT, || qmp.exists()),
            "QEMU's QMP socket {} never appeared",
            qmp.display()
        );
        let keep_open = File::open(&pty)
            .unwrap_or_else(|e| panic!("open QEMU's pseudo-terminal {}: {e}", pty.display()));
        // Not a synchronization with anything of ours: QEMU's fixed poll interval, which has
        // no event to wait on (the guest is paused, and nothing crosses the line yet).
        std::thread::sleep(PTY_POLL);
        QemuBoard {
            child,
            pty,
            _keep_open: keep_open,
            qmp,
            _dir: dir,
        }
    }

    /// The pseudo-terminal that plays the board's serial port.
    pub fn serial(&self) -> &Path {
        &self.pty
    }

    /// The board's configuration, as `EMBER_HIL_*` would give it for a real one.
    pub fn config(&self) -> BoardConfig {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/node/qmp.py");
        let qmp = |cmds: &str| {
            format!(
                "python3 {} {} {cmds}",
                sh_quote(&script.to_string_lossy()),
                sh_quote(&self.qmp.to_string_lossy())
            )
        };
        BoardConfig {
            serial: self.pty.clone(),
            baud: DEFAULT_BAUD,
            // The image must be the one QEMU loaded: a flash command gets it as $1.
            flash: format!("test -s \"$1\" && {}", qmp("system_reset cont")),
            reset: qmp("system_reset cont"),
            halt: Some(qmp("stop")),
            resume: Some(qmp("cont")),
        }
    }
}

impl Drop for QemuBoard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ember_proto::node::{Hello, LINK_VERSION, NodeStatus, encode};

    use super::*;

    /// `v` with `EMBER_HIL_ELF` set unless `v` sets it.
    fn vars(v: &[(&str, &str)]) -> Result<Option<BoardConfig>, String> {
        let m: HashMap<String, String> = [("EMBER_HIL_ELF", "/b/ember-node")]
            .iter()
            .chain(v)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        BoardConfig::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn no_serial_port_means_qemu() {
        assert_eq!(vars(&[]), Ok(None));
        assert_eq!(
            vars(&[("EMBER_HIL_SERIAL", " "), ("EMBER_HIL_CHIP", "X")]),
            Ok(None)
        );
    }

    #[test]
    fn a_chip_gives_the_probe_rs_commands() {
        let c = vars(&[
            ("EMBER_HIL_SERIAL", "/dev/ttyACM0"),
            ("EMBER_HIL_CHIP", "STM32H7A3ZITxQ"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            c,
            BoardConfig {
                serial: "/dev/ttyACM0".into(),
                baud: 115_200,
                flash: "probe-rs download --chip 'STM32H7A3ZITxQ' \"$1\"".into(),
                reset: "probe-rs reset --chip 'STM32H7A3ZITxQ'".into(),
                halt: None,
                resume: None,
            }
        );
    }

    #[test]
    fn commands_and_baud_can_be_overridden() {
        let c = vars(&[
            ("EMBER_HIL_SERIAL", "/dev/ttyUSB1"),
            ("EMBER_HIL_BAUD", "921600"),
            ("EMBER_HIL_FLASH", "pyocd flash \"$1\""),
            ("EMBER_HIL_RESET", "pyocd reset"),
            ("EMBER_HIL_HALT", "halt-it"),
            ("EMBER_HIL_RESUME", "go"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.baud, 921_600);
        assert_eq!(c.flash, "pyocd flash \"$1\"");
        assert_eq!(c.reset, "pyocd reset");
        assert_eq!(c.halt.as_deref(), Some("halt-it"));
        assert_eq!(c.resume.as_deref(), Some("go"));
    }

    #[test]
    fn a_board_without_chip_or_commands_is_refused_naming_the_variables() {
        let e = vars(&[("EMBER_HIL_SERIAL", "/dev/ttyACM0")]).unwrap_err();
        for v in [
            "EMBER_HIL_CHIP",
            "EMBER_HIL_FLASH",
            "EMBER_HIL_RESET",
            "/dev/ttyACM0",
        ] {
            assert!(e.contains(v), "{e}");
        }
        // A flash command alone is not enough: the reset has no default without a chip.
        let e = vars(&[
            ("EMBER_HIL_SERIAL", "/dev/ttyACM0"),
            ("EMBER_HIL_FLASH", "true"),
        ])
        .unwrap_err();
        assert!(e.contains("EMBER_HIL_RESET is not set"), "{e}");
        let e = vars(&[
            ("EMBER_HIL_SERIAL", "/dev/ttyACM0"),
            ("EMBER_HIL_CHIP", "X"),
            ("EMBER_HIL_BAUD", "fast"),
        ])
        .unwrap_err();
        assert!(e.contains("EMBER_HIL_BAUD"), "{e}");
        let e = vars(&[
            ("EMBER_HIL_SERIAL", "/dev/ttyACM0"),
            ("EMBER_HIL_CHIP", "X"),
            ("EMBER_HIL_ELF", ""),
        ])
        .unwrap_err();
        assert!(e.contains("EMBER_HIL_ELF"), "{e}");
    }

    #[test]
    fn quoting_keeps_one_word() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    fn frame(f: &NodeFrame) -> Vec<u8> {
        let mut buf = [0u8; MAX_FRAME_BYTES + 8];
        encode(f, &mut buf).expect("encode").to_vec()
    }

    #[test]
    fn the_line_starts_at_the_first_whole_hello() {
        let status = frame(&NodeFrame::Status(NodeStatus::default()));
        let hello = frame(&NodeFrame::Hello(Hello {
            version: LINK_VERSION,
            boot: 7,
            rate_hz: 100,
            channels: 6,
        }));
        // The tail of an old run's frame, a whole status, then the hello split across reads.
        let mut sync = HelloSync::default();
        assert_eq!(sync.find(&[1, 2, 3, 0]), None);
        assert_eq!(sync.find(&status), None);
        let (a, b) = hello.split_at(hello.len() / 2);
        assert_eq!(sync.find(a), None);
        let mut rest = b.to_vec();
        rest.extend_from_slice(&status);
        let mut want = hello.clone();
        want.extend_from_slice(&status);
        assert_eq!(sync.find(&rest), Some(want.clone()));

        // A reset cut the status short: its first bytes, no delimiter, then the hello.
        let mut sync = HelloSync::default();
        let mut glued = status[..status.len() / 2].to_vec();
        glued.extend_from_slice(&hello);
        glued.extend_from_slice(&status);
        assert_eq!(sync.find(&glued), Some(want));
    }
}
