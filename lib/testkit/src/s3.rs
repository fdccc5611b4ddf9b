//! A private S3-compatible server per test: `moto` (Python) in server mode.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, localhost};

/// How long a starting moto may take to answer HTTP (it imports a large Python package).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `python3 -m moto.server` on an ephemeral 127.0.0.1 port, with its output in a temp dir.
/// Accepts any credentials; keeps everything in memory. Killed when dropped.
pub struct TestS3 {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// An HTTP answer from the server.
pub struct S3Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl TestS3 {
    /// Starts moto and waits until it answers HTTP.
    ///
    /// Panics if python3 with `moto[server]` is missing (saying how to install it) or it does
    /// not start.
    pub fn start() -> TestS3 {
        let ok = Command::new("python3")
            .args(["-c", "import moto.server, flask, flask_cors"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "this test needs python3 with moto's server: run \
             `python3 -m pip install -r fleet-api/tests/python/requirements.txt` \
             or `bash scripts/install-deps.sh`"
        );
        let mut last_err = String::new();
        // The port was free when picked; another process may take it before moto binds it.
        for _ in 0..5 {
            let mut s3 = TestS3 {
                port: free_port(),
                dir: tempfile::Builder::new()
                    .prefix("ember-s3-")
                    .tempdir()
                    .expect("cannot create a temp dir for moto"),
                child: None,
            };
            match s3.spawn() {
                Ok(()) => return s3,
                Err(e) => last_err = e,
            }
        }
        panic!("moto did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`: what `AWS_ENDPOINT_URL` should say.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `object_store` S3 options (the lowercase names of the `AWS_*` variables) that point
    /// a client at this server with dummy credentials.
    pub fn client_options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint_url", self.endpoint()),
            ("aws_allow_http", "true".to_string()),
            ("aws_access_key_id", "ember-test".to_string()),
            ("aws_secret_access_key", "ember-test-secret".to_string()),
            ("aws_region", "us-east-1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Creates a bucket (moto, like S3, refuses writes to a bucket that does not exist).
    pub fn create_bucket(&self, bucket: &str) {
        let a = self.request("PUT", &format!("/{bucket}"));
        assert_eq!(
            a.status,
            200,
            "moto refused to create bucket {bucket}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }

    /// `GET /<bucket>/<key>` straight from the server, bypassing the fleet.
    pub fn get(&self, bucket: &str, key: &str) -> S3Answer {
        self.request("GET", &format!("/{bucket}/{key}"))
    }

    /// moto's output (for failure messages).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    /// One request with a dummy signature (moto does not check them) on its own connection.
    pub fn request(&self, method: &str, path: &str) -> S3Answer {
        try_request(self.port, method, path)
            .unwrap_or_else(|e| panic!("{method} {path} to moto failed: {e}"))
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("moto.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log_path.display()))?;
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run python3 -m moto.server: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "moto exited with {status} (port {}); its output:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            // Answering HTTP, not only accepting: the listener is up before the app is.
            if try_request(self.port, "GET", "/").is_ok_and(|a| a.status == 200) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "moto did not answer on port {} within {START_TIMEOUT:?}; its output:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestS3 {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn try_request(port: u16, method: &str, path: &str) -> Result<S3Answer, String> {
    let mut s = TcpStream::connect_timeout(&localhost(port), Duration::from_millis(500))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    // moto treats a request without credentials as anonymous (403 on private objects) but
    // does not check signatures: any SigV4-shaped header is the account's owner.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=ember-test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok(S3Answer {
        status,
        body: raw[end + 4..].to_vec(),
    })
}
