//! Azure Blob Storage on loopback for the remote-cache tests: Azurite (npm `azurite`, the
//! emulator Microsoft maintains), started per test on a free port with one empty container,
//! and killed when the guard drops. object_store talks to it through its emulator mode
//! (`AZURE_STORAGE_USE_EMULATOR`, the well-known `devstoreaccount1` key).
//!
//! The server is `azurite-blob` from `FPIPE_TEST_AZURITE`, else from the PATH. Without it
//! the tests fail saying how to install it, unless `FPIPE_SKIP_AZURE_TESTS=1`.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const CONTAINER: &str = "fpipe-test";

/// A running Azurite blob server with one empty container.
pub struct Azurite {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// Creates a container with a SharedKey-signed request (the emulator's published key):
/// object_store reads and writes blobs but creates no containers.
const CREATE_CONTAINER: &str = r#"
import base64, email.utils, hashlib, hmac, sys, urllib.request
acct = "devstoreaccount1"
key = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
port, container = sys.argv[1], sys.argv[2]
date, ver = email.utils.formatdate(usegmt=True), "2021-08-06"
sts = "PUT" + "\n" * 12 + f"x-ms-date:{date}\nx-ms-version:{ver}\n/{acct}/{acct}/{container}\nrestype:container"
sig = base64.b64encode(hmac.new(key, sts.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/{acct}/{container}?restype=container", method="PUT",
    headers={"x-ms-date": date, "x-ms-version": ver, "Authorization": f"SharedKey {acct}:{sig}", "Content-Length": "0"})
print(urllib.request.urlopen(req).status)
"#;

impl Azurite {
    /// Starts the server, or `None` when Azurite is missing and `FPIPE_SKIP_AZURE_TESTS=1`.
    pub fn start() -> Option<Azurite> {
        let exe = std::env::var("FPIPE_TEST_AZURITE").unwrap_or_else(|_| "azurite-blob".into());
        let found = Command::new(&exe)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            if std::env::var("FPIPE_SKIP_AZURE_TESTS").as_deref() == Ok("1") {
                eprintln!("skipped: no Azurite (FPIPE_SKIP_AZURE_TESTS=1)");
                return None;
            }
            panic!(
                "the Azure tests need Azurite: `npm install -g azurite` or FPIPE_TEST_AZURITE=/path/to/azurite-blob (or set FPIPE_SKIP_AZURE_TESTS=1 to skip them)"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new(&exe)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--skipApiVersionCheck", "--silent"])
            .arg("--location")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite");
        let mut az = Azurite {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..1200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Ok(Some(st)) = az.child.try_wait() {
                panic!("azurite-blob exited at start: {st}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let python = std::env::var("FPIPE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .args(["-c", CREATE_CONTAINER, &port.to_string(), CONTAINER])
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "creating the test container: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(az)
    }

    /// Environment for an `fpipe` talking to this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
            (
                "AZURITE_BLOB_STORAGE_URL".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("FPIPE_REMOTE_RETRIES".into(), "0".into()),
        ]
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
