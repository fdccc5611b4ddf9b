//! A throwaway PostgreSQL cluster per test.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, localhost};

/// Where Debian puts PostgreSQL 15's server programs (`initdb`, `pg_ctl`, `postgres`), which
/// are not on `PATH`.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// How long a starting server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The system user that runs the server when the tests run as root (`initdb` refuses root).
const PG_USER: &str = "postgres";

/// A private PostgreSQL 15 server: `initdb` into a temp dir, `pg_ctl start` on a free
/// 127.0.0.1 port with its Unix socket in that dir, trust authentication for the superuser
/// `postgres`, durability off (`fsync`, `synchronous_commit`, `full_page_writes`): tests
/// need speed, not crash safety of the database itself.
///
/// When the tests run as root, the cluster belongs to the `postgres` system user (created if
/// missing) and every server command runs through `runuser -u postgres --`.
///
/// Stopped (`pg_ctl stop -m immediate`) and deleted when dropped.
pub struct TestPostgres {
    port: u16,
    dir: tempfile::TempDir,
    as_user: Option<&'static str>,
    durable: bool,
}

impl TestPostgres {
    /// Creates and starts a cluster; returns once it accepts connections.
    ///
    /// Panics, saying what to install, if PostgreSQL 15's server binaries are missing.
    pub fn start() -> TestPostgres {
        Self::start_with(false)
    }

    /// Like [`TestPostgres::start`], but with PostgreSQL's production durability (`fsync`,
    /// `synchronous_commit` and `full_page_writes` on, the defaults), for benchmarks whose
    /// numbers must hold for a real deployment.
    pub fn start_durable() -> TestPostgres {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> TestPostgres {
        let bin = Path::new(PG_BIN_DIR);
        if !bin.join("initdb").is_file() || !bin.join("pg_ctl").is_file() {
            panic!(
                "the PostgreSQL tests need PostgreSQL 15's server binaries in {PG_BIN_DIR}, and \
                 they are not installed: run `sudo apt-get install postgresql-15` (Debian/Ubuntu) \
                 or `bash scripts/install-deps.sh`"
            );
        }
        let as_user = if is_root() {
            ensure_pg_user();
            Some(PG_USER)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("ember-pg-")
            .tempdir()
            .expect("cannot create a temp dir for PostgreSQL");
        if let Some(user) = as_user {
            let out = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .output()
                .expect("cannot run chown");
            assert!(
                out.status.success(),
                "chown of {} to {user} failed: {}",
                dir.path().display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut pg = TestPostgres {
            port: 0,
            dir,
            as_user,
            durable,
        };
        let data = pg.data_dir();
        let out = pg.pg_command("initdb", |c| {
            c.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ]);
        });
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The port was free when picked; another process may take it before postgres binds.
        let mut last_err = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            match pg.try_start() {
                Ok(()) => return pg,
                Err(e) => last_err = e,
            }
        }
        panic!("PostgreSQL did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id (from `postmaster.pid`), for benchmarks that read the
    /// server's CPU time from `/proc` (its backends are its children).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (trust authentication).
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.database_url(name)
    }

    /// Runs `sql` as the superuser in database `db`; panics with psql's error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(Path::new(PG_BIN_DIR).join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c"])
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// From now on `role` must give its password (SCRAM) on TCP connections: a line ahead of
    /// the cluster's trust rules, and the server reloads its configuration.
    pub fn require_password(&self, role: &str) {
        let hba = self.data_dir().join("pg_hba.conf");
        let old = fs::read_to_string(&hba).expect("read pg_hba.conf");
        fs::write(
            &hba,
            format!("host all \"{role}\" 127.0.0.1/32 scram-sha-256\n{old}"),
        )
        .expect("write pg_hba.conf");
        let data = self.data_dir();
        let out = self.pg_command("pg_ctl", |c| {
            c.arg("-D").arg(&data).arg("reload");
        });
        assert!(
            out.status.success(),
            "pg_ctl reload failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The server's log.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn try_start(&mut self) -> Result<(), String> {
        let (data, log, sock) = (
            self.data_dir(),
            self.log_path(),
            self.dir.path().to_path_buf(),
        );
        let durability = if self.durable { "on" } else { "off" };
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={durability} \
             -c synchronous_commit={durability} -c full_page_writes={durability} \
             -c max_connections=200",
            self.port,
            sock.display()
        );
        let out = self.pg_command("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "30", "-o", &options, "start"]);
        });
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start on port {} failed: {}{}; log:\n{}",
                self.port,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            ));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&localhost(self.port), Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "PostgreSQL did not accept connections on port {} within {START_TIMEOUT:?}",
            self.port
        ))
    }

    /// Runs a server program from [`PG_BIN_DIR`], as the `postgres` user when root.
    fn pg_command(&self, program: &str, args: impl FnOnce(&mut Command)) -> Output {
        let path = Path::new(PG_BIN_DIR).join(program);
        let mut cmd = match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        args(&mut cmd);
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.pg_command("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "-t", "10", "stop"]);
        });
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Creates the `postgres` system user if it does not exist (Debian's package creates it).
fn ensure_pg_user() {
    let exists = Command::new("id")
        .arg("-u")
        .arg(PG_USER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if exists {
        return;
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg(PG_USER)
        .output()
        .expect("cannot run useradd");
    // Another test may have created it meanwhile (exit 9: already exists).
    assert!(
        out.status.success() || out.status.code() == Some(9),
        "useradd {PG_USER} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
