//! Resumable, size-capped, hash-checked download of a model bundle.
//!
//! On-disk layout: the bytes arrive in `<dest>.part`; only a file whose SHA-256 matches the
//! expected digest is renamed to `<dest>` (after an fsync of the file, and of the directory
//! after the rename). So:
//!
//! * `<dest>` exists ⇒ it is complete and has the expected digest. A download MUST NOT leave
//!   any other file at `<dest>`.
//! * `<dest>.part` holds a prefix of the file as far as anyone can tell; the next attempt asks
//!   for the rest with `Range: bytes=<len>-` (a process killed mid-download resumes).
//! * A server that ignores the range (200 instead of 206), a `Content-Range` that does not
//!   continue the part file, or a part that fails the digest at the end start over from zero;
//!   nothing is ever appended at the wrong offset.
//! * More bytes than `max_bytes` (declared or received) abort the download and delete the part.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error(
        "{url} is {size} bytes, more than the {max} bytes allowed for this model (desired state's size cap)"
    )]
    TooLarge { url: String, size: u64, max: u64 },
    #[error(
        "the download of {url} has SHA-256 {found}, not the expected {expected}: discarded (damaged in transit or a different file)"
    )]
    Digest {
        url: String,
        expected: String,
        found: String,
    },
    #[error("{url}: malformed response: {message}")]
    Protocol { url: String, message: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot use TLS file {path}: {message}")]
    Tls { path: PathBuf, message: String },
}

/// TLS material for HTTPS downloads from the fleet.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM file of the CA(s) to trust; `None` trusts the public web PKI (e.g. object storage).
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain and key, for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// What to fetch.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub url: &'a str,
    /// Final path of the verified file.
    pub dest: &'a Path,
    /// Largest file accepted, in bytes.
    pub max_bytes: u64,
    /// Expected SHA-256, lowercase hex.
    pub sha256: &'a str,
    /// `Authorization: Bearer` token, if the server wants one.
    pub bearer: Option<&'a str>,
}

/// A finished download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub bytes: u64,
    /// Bytes already in the part file when this attempt started (0: from scratch).
    pub resumed_from: u64,
}

/// An HTTP(S) client for bundle downloads.
pub struct Downloader {
    agent: ureq::Agent,
}

/// How long one attempt may stall without receiving anything.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
const CHUNK: usize = 64 * 1024;

impl Downloader {
    pub fn new(tls: &TlsFiles) -> Result<Downloader, DownloadError> {
        let mut builder = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &tls.ca {
            let certs = pem_certs(ca)?;
            builder = builder.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        if let Some((cert, key)) = &tls.client_cert {
            let chain = pem_certs(cert)?;
            let key_pem = read_pem(key)?;
            // The error never includes the key's bytes.
            let key_parsed = ureq::tls::PrivateKey::from_pem(&key_pem)
                .map_err(|_| tls_err(key, "no usable PEM private key in the file".into()))?;
            builder = builder.client_cert(Some(ureq::tls::ClientCert::new_with_certs(
                &chain, key_parsed,
            )));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(STALL_TIMEOUT))
            .timeout_recv_body(None)
            .tls_config(builder.build())
            .build()
            .new_agent();
        Ok(Downloader { agent })
    }

    /// Fetches `req.url` into `req.dest`, resuming a previous attempt's part file.
    pub fn fetch(&self, req: &Request<'_>) -> Result<Fetched, DownloadError> {
        let part = part_path(req.dest);
        if let Some(done) = already_done(req)? {
            return Ok(done);
        }
        // Two rounds at most: a resume that turns out unusable starts over once.
        let mut fresh = false;
        loop {
            let have = match std::fs::metadata(&part) {
                Ok(m) if !fresh && m.len() <= req.max_bytes => m.len(),
                _ => 0,
            };
            match self.attempt(req, &part, have)? {
                Attempt::Complete { bytes } => {
                    return finish(req, &part, bytes, have);
                }
                Attempt::Restart if !fresh => {
                    fresh = true;
                    remove(&part)?;
                }
                Attempt::Restart => {
                    return Err(DownloadError::Protocol {
                        url: req.url.into(),
                        message: "the server does not continue the file consistently".into(),
                    });
                }
            }
        }
    }

    fn attempt(&self, req: &Request<'_>, part: &Path, have: u64) -> Result<Attempt, DownloadError> {
        let url = req.url;
        let mut get = self.agent.get(url);
        if have > 0 {
            get = get.header("Range", &format!("bytes={have}-"));
        }
        if let Some(token) = req.bearer {
            get = get.header("Authorization", &format!("Bearer {token}"));
        }
        let mut resp = get.call().map_err(|e| DownloadError::Transport {
            url: url.into(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (start, total) = match status {
            200 => (
                0,
                header("content-length").and_then(|v| v.parse::<u64>().ok()),
            ),
            206 => {
                let range = header("content-range").ok_or_else(|| DownloadError::Protocol {
                    url: url.into(),
                    message: "206 without Content-Range".into(),
                })?;
                let (start, total) =
                    parse_content_range(&range).ok_or_else(|| DownloadError::Protocol {
                        url: url.into(),
                        message: format!("unreadable Content-Range {range:?}"),
                    })?;
                if start != have {
                    return Ok(Attempt::Restart);
                }
                (start, total)
            }
            // Asked for bytes past the end: the part is complete (or wrong; the digest says).
            416 if have > 0 => return Ok(Attempt::Complete { bytes: have }),
            _ => {
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(512)
                    .read_to_string()
                    .unwrap_or_default();
                return Err(DownloadError::Status {
                    url: url.into(),
                    status,
                    body: body.chars().take(200).collect(),
                });
            }
        };
        if let Some(total) = total
            && total > req.max_bytes
        {
            remove(part)?;
            return Err(DownloadError::TooLarge {
                url: url.into(),
                size: total,
                max: req.max_bytes,
            });
        }
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(part)
            .map_err(io(part))?;
        // 200 rewrites from the start; 206 appends exactly at `have`.
        file.set_len(start).map_err(io(part))?;
        file.seek(SeekFrom::Start(start)).map_err(io(part))?;
        let mut reader = resp
            .body_mut()
            .with_config()
            .limit(req.max_bytes.saturating_sub(start).saturating_add(1))
            .reader();
        let mut written = start;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // Keep what arrived (flushed) so the next attempt resumes after it.
                    let _ = file.sync_data();
                    return Err(DownloadError::Transport {
                        url: url.into(),
                        message: format!("connection lost after {written} bytes: {e}"),
                    });
                }
            };
            written += n as u64;
            if written > req.max_bytes {
                drop(file);
                remove(part)?;
                return Err(DownloadError::TooLarge {
                    url: url.into(),
                    size: written,
                    max: req.max_bytes,
                });
            }
            file.write_all(&buf[..n]).map_err(io(part))?;
        }
        file.sync_all().map_err(io(part))?;
        if let Some(total) = total
            && written != total
        {
            return Err(DownloadError::Transport {
                url: url.into(),
                message: format!("connection closed at {written} of {total} bytes"),
            });
        }
        Ok(Attempt::Complete { bytes: written })
    }
}

enum Attempt {
    Complete { bytes: u64 },
    Restart,
}

/// `<dest>.part`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

fn already_done(req: &Request<'_>) -> Result<Option<Fetched>, DownloadError> {
    match sha256_file(req.dest) {
        Ok((digest, bytes)) if digest == req.sha256 => Ok(Some(Fetched {
            path: req.dest.to_path_buf(),
            bytes,
            resumed_from: bytes,
        })),
        Ok(_) => {
            remove(req.dest)?;
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DownloadError::Io {
            path: req.dest.to_path_buf(),
            source,
        }),
    }
}

fn finish(
    req: &Request<'_>,
    part: &Path,
    bytes: u64,
    resumed_from: u64,
) -> Result<Fetched, DownloadError> {
    let (found, _) = sha256_file(part).map_err(io(part))?;
    if found != req.sha256 {
        remove(part)?;
        return Err(DownloadError::Digest {
            url: req.url.into(),
            expected: req.sha256.into(),
            found,
        });
    }
    // The part file was fsynced after its last write; this fsyncs it again (cheap), renames it
    // and fsyncs the directory.
    ember_host::fs::rename(part, req.dest).map_err(io(req.dest))?;
    Ok(Fetched {
        path: req.dest.to_path_buf(),
        bytes,
        resumed_from,
    })
}

fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        h.update(&buf[..n]);
    }
    let digest = h.finalize();
    let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, n_total))
}

/// `bytes <start>-<end>/<total|*>` → (start, total).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if total.is_some_and(|t| end >= t) {
        return None;
    }
    Some((start, total))
}

fn remove(path: &Path) -> Result<(), DownloadError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DownloadError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The certificates of a PEM file (`ember_host::tls::certs_from_pem`), as ureq takes them.
fn pem_certs(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, DownloadError> {
    let certs = ember_host::tls::certs_from_pem(&read_pem(path)?)
        .map_err(|m| tls_err(path, format!("the file {m}")))?;
    Ok(certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect())
}

fn read_pem(path: &Path) -> Result<Vec<u8>, DownloadError> {
    std::fs::read(path).map_err(|e| tls_err(path, e.to_string()))
}

fn tls_err(path: &Path, message: String) -> DownloadError {
    DownloadError::Tls {
        path: path.to_path_buf(),
        message,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    //! Against a small HTTP/1.1 server on 127.0.0.1 that serves one file, honours (or, when
    //! told to, ignores) `Range`, and can cut the connection after N bytes.
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Honest,
        IgnoreRange,
        WrongOffset,
    }

    struct Server {
        port: u16,
        /// Ranges requested, in order (None: no Range header).
        requests: Arc<Mutex<Vec<Option<u64>>>>,
        /// Cut the body after this many bytes for the next response (usize::MAX: never).
        cut_after: Arc<AtomicUsize>,
    }

    fn serve(body: Vec<u8>, mode: Mode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let cut_after = Arc::new(AtomicUsize::new(usize::MAX));
        let (reqs, cut) = (requests.clone(), cut_after.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut range = None;
                let mut auth_ok = false;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("range: bytes=") {
                        range = v.trim().trim_end_matches('-').parse::<u64>().ok();
                    }
                    if lower.starts_with("authorization: bearer secret") {
                        auth_ok = true;
                    }
                }
                reqs.lock().unwrap().push(range);
                if !auth_ok {
                    let _ = stream.write_all(
                        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nConnection: close\r\n\r\nforbidden",
                    );
                    continue;
                }
                let len = body.len() as u64;
                let (status, start) = match (range, mode) {
                    (Some(s), Mode::Honest) if s >= len => {
                        let _ = stream.write_all(
                            format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                        );
                        continue;
                    }
                    (Some(s), Mode::Honest) => (206, s),
                    (Some(s), Mode::WrongOffset) => (206, s.saturating_sub(1)),
                    _ => (200, 0),
                };
                let chunk = &body[start as usize..];
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    chunk.len()
                );
                if status == 206 {
                    head.push_str(&format!(
                        "Content-Range: bytes {start}-{}/{len}\r\n",
                        len - 1
                    ));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let cut_at = cut.swap(usize::MAX, Ordering::SeqCst).min(chunk.len());
                let _ = stream.write_all(&chunk[..cut_at]);
                let _ = stream.flush();
            }
        });
        Server {
            port,
            requests,
            cut_after,
        }
    }

    fn file(n: usize) -> (Vec<u8>, String) {
        let body: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        let digest = Sha256::digest(&body);
        (body, digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    fn request<'a>(url: &'a str, dest: &'a Path, sha: &'a str, max: u64) -> Request<'a> {
        Request {
            url,
            dest,
            max_bytes: max,
            sha256: sha,
            bearer: Some("secret"),
        }
    }

    #[test]
    fn a_cut_download_resumes_with_a_range_request() {
        let (body, sha) = file(300_000);
        let server = serve(body.clone(), Mode::Honest);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.bundle");
        let url = format!("http://127.0.0.1:{}/b", server.port);
        let d = Downloader::new(&TlsFiles::default()).unwrap();

        server.cut_after.store(100_000, Ordering::SeqCst);
        let e = d.fetch(&request(&url, &dest, &sha, 1 << 20)).unwrap_err();
        assert!(matches!(e, DownloadError::Transport { .. }), "{e}");
        assert!(e.to_string().contains("100000"), "{e}");
        assert!(!dest.exists());
        assert_eq!(std::fs::metadata(part_path(&dest)).unwrap().len(), 100_000);

        let got = d.fetch(&request(&url, &dest, &sha, 1 << 20)).unwrap();
        assert_eq!(got.resumed_from, 100_000);
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert!(!part_path(&dest).exists());
        assert_eq!(*server.requests.lock().unwrap(), vec![None, Some(100_000)]);

        // Done is done: a third call checks the file and fetches nothing.
        d.fetch(&request(&url, &dest, &sha, 1 << 20)).unwrap();
        assert_eq!(server.requests.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_server_that_ignores_range_or_misplaces_it_restarts_from_zero() {
        for mode in [Mode::IgnoreRange, Mode::WrongOffset] {
            let (body, sha) = file(50_000);
            let server = serve(body.clone(), mode);
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("m.bundle");
            std::fs::write(part_path(&dest), &body[..20_000]).unwrap();
            let url = format!("http://127.0.0.1:{}/b", server.port);
            let d = Downloader::new(&TlsFiles::default()).unwrap();
            d.fetch(&request(&url, &dest, &sha, 1 << 20)).unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), body);
        }
    }

    #[test]
    fn size_cap_digest_and_status_errors_name_the_problem() {
        let (body, sha) = file(10_000);
        let server = serve(body, Mode::Honest);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.bundle");
        let url = format!("http://127.0.0.1:{}/b", server.port);
        let d = Downloader::new(&TlsFiles::default()).unwrap();

        let e = d.fetch(&request(&url, &dest, &sha, 9_999)).unwrap_err();
        assert!(
            matches!(
                e,
                DownloadError::TooLarge {
                    size: 10_000,
                    max: 9_999,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!part_path(&dest).exists());

        let wrong = "0".repeat(64);
        let e = d.fetch(&request(&url, &dest, &wrong, 1 << 20)).unwrap_err();
        assert!(matches!(e, DownloadError::Digest { .. }), "{e}");
        assert!(!dest.exists() && !part_path(&dest).exists());

        let mut unauth = request(&url, &dest, &sha, 1 << 20);
        unauth.bearer = None;
        let e = d.fetch(&unauth).unwrap_err();
        assert!(
            matches!(e, DownloadError::Status { status: 403, .. }),
            "{e}"
        );

        let e = d
            .fetch(&request("http://127.0.0.1:1/b", &dest, &sha, 1 << 20))
            .unwrap_err();
        assert!(matches!(e, DownloadError::Transport { .. }), "{e}");
    }

    #[test]
    fn a_complete_part_left_by_a_crash_before_the_rename_is_finished() {
        let (body, sha) = file(5_000);
        let server = serve(body.clone(), Mode::Honest);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.bundle");
        std::fs::write(part_path(&dest), &body).unwrap();
        let url = format!("http://127.0.0.1:{}/b", server.port);
        let d = Downloader::new(&TlsFiles::default()).unwrap();
        let got = d.fetch(&request(&url, &dest, &sha, 1 << 20)).unwrap();
        assert_eq!(got.resumed_from, 5_000);
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(*server.requests.lock().unwrap(), vec![Some(5_000)]);
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes 5-10/10"), None);
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn tls_files_that_are_not_pem_are_refused_without_echoing_them() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key SECRET-MATERIAL").unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "").unwrap();
        let e = Downloader::new(&TlsFiles {
            ca: None,
            client_cert: Some((cert, key)),
        })
        .err()
        .expect("refused");
        assert!(!e.to_string().contains("SECRET-MATERIAL"), "{e}");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "nothing").unwrap();
        let e = Downloader::new(&TlsFiles {
            ca: Some(ca),
            client_cert: None,
        })
        .err()
        .expect("refused");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }
}
