//! The download path against HTTP servers the test starts on 127.0.0.1: a mirror that serves
//! damaged files, one that answers 404, and one that serves the real MNIST files.

mod common;

use pstrain::data::download::{download_mnist, FileStatus, MNIST_FILES};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
enum Behaviour {
    Serve,
    Corrupt,
    NotFound,
}

/// A tiny HTTP/1.1 server over `root`, stopped when the returned guard drops.
struct Mirror {
    url: String,
    stop: Arc<AtomicBool>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn start_mirror(root: PathBuf, behaviour: Behaviour) -> Mirror {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/mnist/", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = answer(stream, &root, behaviour);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Mirror { url, stop }
}

fn answer(
    mut stream: TcpStream,
    root: &std::path::Path,
    behaviour: Behaviour,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? <= 2 {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let name = path.rsplit('/').next().unwrap_or("");
    let body = match (behaviour, std::fs::read(root.join(name))) {
        (Behaviour::NotFound, _) | (_, Err(_)) => None,
        (Behaviour::Serve, Ok(bytes)) => Some(bytes),
        (Behaviour::Corrupt, Ok(gz)) => {
            // A well-formed gzip of altered content: only the checksum can catch it.
            let mut raw = Vec::new();
            flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut raw)?;
            let n = raw.len();
            raw[n / 2] ^= 0x55;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&raw)?;
            Some(enc.finish()?)
        }
    };
    match body {
        Some(body) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(&body)?;
        }
        None => stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 64];
    let _ = reader.read(&mut sink);
    Ok(())
}

#[test]
fn falls_back_past_bad_mirrors_verifies_and_keeps_good_files() {
    let real = common::mnist_dir();
    let bad = start_mirror(real.clone(), Behaviour::Corrupt);
    let missing = start_mirror(real.clone(), Behaviour::NotFound);
    let good = start_mirror(real, Behaviour::Serve);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mnist");
    let mirrors = vec![bad.url.clone(), missing.url.clone(), good.url.clone()];

    let statuses = download_mnist(&target, &mirrors, false).unwrap();
    assert_eq!(statuses.len(), 4);
    for (status, spec) in statuses.iter().zip(MNIST_FILES) {
        match status {
            FileStatus::Downloaded { path, mirror } => {
                assert_eq!(mirror, &good.url);
                assert!(path.ends_with(format!("{}.gz", spec.stem)));
            }
            other => panic!("expected a download, got {other:?}"),
        }
    }
    let data = pstrain_compute::mnist::load_dir(&target).unwrap();
    assert_eq!((data.train.len(), data.test.len()), (60_000, 10_000));

    // A second run finds every file present and verified, and fetches nothing.
    let again = download_mnist(&target, std::slice::from_ref(&missing.url), false).unwrap();
    assert!(again.iter().all(|s| matches!(s, FileStatus::Present(_))));
}

#[test]
fn all_mirrors_failing_is_a_clear_error() {
    let real = common::mnist_dir();
    let bad = start_mirror(real, Behaviour::Corrupt);
    let dir = tempfile::tempdir().unwrap();
    let err = download_mnist(
        dir.path(),
        &[bad.url.clone(), "http://127.0.0.1:9/".into()],
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(err.contains("Offline?"), "{err}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing half-written"
    );
}

#[test]
fn train_downloads_into_the_default_folder_first() {
    let good = start_mirror(common::mnist_dir(), Behaviour::Serve);
    let cwd = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::pstrain_bin())
        .current_dir(cwd.path())
        .env_remove("PSTRAIN_DATA_DIR")
        .args([
            "train",
            "--model",
            "convnet",
            "--optimizer",
            "sgd",
            "--iterations",
            "20",
            "--eval-every",
            "0",
            "--mirror",
            &good.url,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("downloading"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("on 10000 test images"));
    let data_dir = cwd.path().join("data/mnist");
    assert!(pstrain_compute::mnist::missing_files(&data_dir).is_empty());
}
