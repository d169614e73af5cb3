//! The access log: one JSON object per http request or tcp connection, written by a thread of
//! its own. Workers format a line and hand it over through a bounded channel with `try_send`;
//! when the writer falls behind and the channel is full, the line is dropped and counted
//! (`fastlb_log_dropped_total`): logging never makes a worker wait.
//!
//! `reopen()` (SIGUSR1 in `fastlb serve`) makes the writer reopen its file at the next line or
//! within 200 ms, for logrotate's `create` mode.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines that may wait for the writer; beyond it lines are dropped.
const QUEUE_LINES: usize = 16 * 1024;
const WRITER_TICK: Duration = Duration::from_millis(200);

pub struct AccessLog {
    /// `stdout` or the file's path, as configured.
    pub target: String,
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: AtomicU64,
    reopen: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
}

enum Sink {
    Stdout(io::Stdout),
    File(PathBuf, BufWriter<File>),
}

fn open_file(path: &PathBuf) -> io::Result<BufWriter<File>> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    Ok(BufWriter::with_capacity(64 * 1024, file))
}

impl Sink {
    fn write(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.lock().write_all(line),
            Sink::File(_, w) => w.write_all(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.lock().flush(),
            Sink::File(_, w) => w.flush(),
        }
    }

    fn reopen(&mut self) {
        if let Sink::File(path, w) = self {
            let _ = w.flush();
            match open_file(path) {
                Ok(new) => *w = new,
                Err(e) => eprintln!("fastlb: access log {}: {e}", path.display()),
            }
        }
    }
}

impl AccessLog {
    /// Starts the writer for `target` ("stdout" or a file path, opened for append now so a
    /// bad path is an error at start).
    pub fn open(target: &str) -> io::Result<AccessLog> {
        Self::open_with_queue(target, QUEUE_LINES)
    }

    fn open_with_queue(target: &str, queue_lines: usize) -> io::Result<AccessLog> {
        let mut sink = if target == "stdout" {
            Sink::Stdout(io::stdout())
        } else {
            let path = PathBuf::from(target);
            Sink::File(path.clone(), open_file(&path)?)
        };
        let (tx, rx) = sync_channel(queue_lines);
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = reopen.clone();
        let writer = std::thread::Builder::new()
            .name("fastlb-access-log".into())
            .spawn(move || write_loop(&mut sink, rx, &flag))?;
        Ok(AccessLog {
            target: target.to_string(),
            tx: Some(tx),
            dropped: AtomicU64::new(0),
            reopen,
            writer: Some(writer),
        })
    }

    /// Hands a line (ending in a newline) to the writer, or drops and counts it.
    pub fn send(&self, line: Vec<u8>) {
        if let Some(tx) = &self.tx {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(line) {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
    }
}

impl Drop for AccessLog {
    /// Lets the writer write what is queued, then ends it.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn write_loop(sink: &mut Sink, rx: Receiver<Vec<u8>>, reopen: &AtomicBool) {
    loop {
        let first = rx.recv_timeout(WRITER_TICK);
        if reopen.swap(false, Relaxed) {
            sink.reopen();
        }
        match first {
            Ok(line) => {
                let _ = sink.write(&line);
                // Whatever else is queued goes out in the same buffered write.
                while let Ok(line) = rx.try_recv() {
                    let _ = sink.write(&line);
                }
                let _ = sink.flush();
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = sink.flush();
                return;
            }
        }
    }
}

/// Builds one JSON object line: `{"a":1,"b":"x"}\n`.
pub struct Line {
    buf: Vec<u8>,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(384);
        buf.push(b'{');
        Line { buf }
    }

    fn key(&mut self, key: &str) {
        if self.buf.len() > 1 {
            self.buf.push(b',');
        }
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    /// A string field; bytes that are not printable ASCII are escaped.
    pub fn str(&mut self, key: &str, value: &[u8]) -> &mut Self {
        self.key(key);
        self.buf.push(b'"');
        for &b in value {
            match b {
                b'"' => self.buf.extend_from_slice(b"\\\""),
                b'\\' => self.buf.extend_from_slice(b"\\\\"),
                0x20..=0x7e => self.buf.push(b),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    self.buf.extend_from_slice(b"\\u00");
                    self.buf.push(HEX[(b >> 4) as usize]);
                    self.buf.push(HEX[(b & 0xf) as usize]);
                }
            }
        }
        self.buf.push(b'"');
        self
    }

    pub fn display(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.key(key);
        let _ = write!(self.buf, "{value}");
        self
    }

    /// A string field from a Display that needs no escaping (addresses).
    pub fn quoted(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        self.key(key);
        let _ = write!(self.buf, "\"{value}\"");
        self
    }

    /// A string field, or null.
    pub fn opt_str(&mut self, key: &str, value: Option<&[u8]>) -> &mut Self {
        match value {
            Some(v) => self.str(key, v),
            None => self.null(key),
        }
    }

    pub fn null(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.buf.extend_from_slice(b"null");
        self
    }

    /// Milliseconds with microsecond precision, from microseconds; null for `None`.
    pub fn ms(&mut self, key: &str, us: Option<u64>) -> &mut Self {
        match us {
            Some(us) => self.display(key, format_args!("{}.{:03}", us / 1000, us % 1000)),
            None => self.null(key),
        }
    }

    /// `"time"`: now, as RFC 3339 UTC with milliseconds.
    pub fn time(&mut self) -> &mut Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.key("time");
        push_rfc3339(&mut self.buf, since);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(b"}\n");
        self.buf
    }
}

/// `"2026-11-26T19:55:01.123Z"` for a time since the Unix epoch.
fn push_rfc3339(out: &mut Vec<u8>, since_epoch: Duration) {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "\"{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z\"",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    );
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`):
/// a dozen lines of arithmetic, not worth a date crate.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
        let mut out = Vec::new();
        push_rfc3339(&mut out, Duration::from_millis(1_795_723_701_123));
        assert_eq!(out, b"\"2026-11-26T20:08:21.123Z\"");
    }

    #[test]
    fn lines_are_json_with_escapes() {
        let mut line = Line::new();
        line.str("path", b"/a\"b\\c\x01\xff")
            .display("status", 200)
            .ms("ttfb_ms", Some(1234))
            .ms("connect_ms", None)
            .opt_str("route", None);
        let text = String::from_utf8(line.finish()).unwrap();
        assert_eq!(
            text,
            "{\"path\":\"/a\\\"b\\\\c\\u0001\\u00ff\",\"status\":200,\"ttfb_ms\":1.234,\
             \"connect_ms\":null,\"route\":null}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}\u{ff}");
    }

    /// A writer that falls behind costs lines, never a wait: every line is written or counted.
    #[test]
    fn a_full_queue_drops_and_counts() {
        let path = std::env::temp_dir().join(format!("fastlb-drop-{}.log", std::process::id()));
        let log = AccessLog::open_with_queue(path.to_str().unwrap(), 1).unwrap();
        let sent = 200_000;
        for i in 0..sent {
            log.send(format!("{i}\n").into_bytes());
        }
        let dropped = log.dropped();
        drop(log);
        let written = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        std::fs::remove_file(&path).unwrap();
        assert!(dropped > 0, "a one-line queue kept up with {sent} lines");
        assert_eq!(written + dropped, sent);
    }

    #[test]
    fn reopen_follows_a_rename() {
        let dir = std::env::temp_dir().join(format!("fastlb-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::open(path.to_str().unwrap()).unwrap();
        log.send(b"one\n".to_vec());
        std::thread::sleep(Duration::from_millis(300));
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        log.reopen();
        std::thread::sleep(Duration::from_millis(400));
        log.send(b"two\n".to_vec());
        drop(log);
        assert_eq!(std::fs::read(dir.join("access.log.1")).unwrap(), b"one\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"two\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
