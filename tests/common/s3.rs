//! A real S3 API on loopback for the remote-cache tests: the `moto` server (PyPI
//! `moto[server]`), started per test on a free port and killed when the guard drops, plus a
//! TCP proxy in front of it that can cut or stall a connection after some bytes (a network
//! failure in the middle of a transfer, without timing).
//!
//! The server is `python3 -m moto.server`; `FPIPE_TEST_PYTHON` names another interpreter.
//! Without moto the tests fail saying how to install it, unless `FPIPE_SKIP_S3_TESTS=1`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const BUCKET: &str = "fpipe-test";

/// A running moto server with one empty bucket.
pub struct S3 {
    child: Child,
    pub port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl S3 {
    /// Starts the server, or `None` when moto is missing and `FPIPE_SKIP_S3_TESTS=1`.
    pub fn start() -> Option<S3> {
        let python = std::env::var("FPIPE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let has_moto = Command::new(&python)
            .args(["-c", "import moto.server, flask, flask_cors"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_moto {
            if std::env::var("FPIPE_SKIP_S3_TESTS").as_deref() == Ok("1") {
                eprintln!("skipped: no moto server (FPIPE_SKIP_S3_TESTS=1)");
                return None;
            }
            panic!(
                "the S3 tests need the moto server: `{python} -m pip install 'moto[server]'` (or set FPIPE_SKIP_S3_TESTS=1 to skip them)"
            );
        }
        let port = free_port();
        let child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let s3 = S3 { child, port };
        // Up when it answers; a server that never comes up fails the bucket creation below.
        for _ in 0..600 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = s3.request("PUT", &format!("/{BUCKET}"), b"");
        assert_eq!(status, 200, "creating the test bucket");
        Some(s3)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP request to the server (moto accepts unsigned ones); the status code.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> u16 {
        http(self.port, method, path, body).0
    }

    /// Deletes `key` from the bucket (through boto3, which moto installs: moto refuses an
    /// unsigned DELETE).
    pub fn delete(&self, key: &str) {
        let python = std::env::var("FPIPE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1').delete_object(Bucket='{BUCKET}', Key='{key}')",
            self.endpoint()
        );
        let ok = Command::new(python)
            .args(["-c", &script])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "deleting {key}");
    }

    /// GET `path`: (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        http(self.port, "GET", path, b"")
    }

    /// Keys under `prefix` in the bucket (ListObjectsV2; tests hold well under 1000).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let (status, body) = self.get(&format!("/{BUCKET}?list-type=2&prefix={prefix}"));
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        let mut out: Vec<String> = text
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect();
        out.sort();
        out
    }

    /// Environment for an `fpipe` talking to this server (`via`: a proxy's port instead).
    pub fn env(&self, via: Option<u16>) -> Vec<(String, String)> {
        let port = via.unwrap_or(self.port);
        [
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("FPIPE_REMOTE_RETRIES", "0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to moto");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// What the proxy does once a connection has carried its budget of bytes in one direction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Closes the connection.
    Cut,
    /// Stops forwarding but keeps the connection open (a hung network).
    Stall,
}

/// A TCP proxy to `target` that lets each connection carry at most `up` bytes to the server
/// and `down` bytes back, then applies `fault`. Counts what it forwarded.
pub struct Proxy {
    pub port: u16,
    pub faults: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(target: u16, up: u64, down: u64, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (faults.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let pipe = |from: TcpStream, to: TcpStream, budget: u64, f: Arc<AtomicU64>| {
                    std::thread::spawn(move || forward(from, to, budget, fault, f))
                };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    up,
                    f.clone(),
                );
                pipe(server, client, down, f.clone());
            }
        });
        Proxy { port, faults, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn forward(mut from: TcpStream, mut to: TcpStream, budget: u64, fault: Fault, f: Arc<AtomicU64>) {
    let mut left = budget;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let send = (n as u64).min(left) as usize;
        if to.write_all(&buf[..send]).is_err() {
            break;
        }
        left -= send as u64;
        if send < n {
            f.fetch_add(1, Ordering::SeqCst);
            if fault == Fault::Stall {
                // Hold both ends open, forwarding nothing, until the other side goes away.
                while from.read(&mut buf).is_ok_and(|n| n > 0) {}
            }
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
