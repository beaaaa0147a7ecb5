//! A local Lambda Runtime API (the interface the real service offers a custom runtime), so tests run the
//! built `ami-share-lambda` binary exactly as Lambda would: the process polls `GET …/invocation/next`, gets
//! an event with its request id, and posts `…/response` or `…/error`.
//! <https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html>

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// What the function answered for one invocation (or at init).
#[derive(Debug, Clone)]
pub struct Answer {
    pub request_id: String,
    /// "response", "error" or "init-error".
    pub kind: String,
    pub body: Value,
}

pub struct RuntimeApi {
    pub address: String,
    events: Sender<(String, Value, Duration)>,
    answers: Receiver<Answer>,
    next_request: u64,
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let mut body = Vec::new();
    if let Some(length) = headers.get("content-length") {
        body.resize(length.parse().ok()?, 0);
        reader.read_exact(&mut body).ok()?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let mut trailer = String::new();
                    reader.read_line(&mut trailer).ok()?;
                    if trailer.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk[..size]);
        }
    }
    Some(Request { method, path, body })
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

fn serve(
    stream: TcpStream,
    events: Arc<Mutex<Receiver<(String, Value, Duration)>>>,
    answers: Sender<Answer>,
) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        let path = request.path.trim_start_matches("/2018-06-01/runtime/");
        if request.method == "GET" && path == "invocation/next" {
            let Ok((request_id, event, time_left)) = events.lock().unwrap().recv() else {
                return;
            };
            let deadline = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + time_left;
            let headers = [
                ("Content-Type", "application/json".to_string()),
                ("Lambda-Runtime-Aws-Request-Id", request_id),
                (
                    "Lambda-Runtime-Deadline-Ms",
                    deadline.as_millis().to_string(),
                ),
                (
                    "Lambda-Runtime-Invoked-Function-Arn",
                    "arn:aws:lambda:us-east-1:123456789012:function:ami-share".to_string(),
                ),
                (
                    "Lambda-Runtime-Trace-Id",
                    "Root=1-00000000-000000000000000000000000".to_string(),
                ),
            ];
            respond(
                &mut writer,
                "200 OK",
                &headers,
                event.to_string().as_bytes(),
            );
            continue;
        }
        let (request_id, kind) = if path == "init/error" {
            (String::new(), "init-error")
        } else if let Some(rest) = path.strip_prefix("invocation/") {
            match rest.rsplit_once('/') {
                Some((id, "response")) => (id.to_string(), "response"),
                Some((id, "error")) => (id.to_string(), "error"),
                _ => {
                    respond(&mut writer, "404 Not Found", &[], b"{}");
                    continue;
                }
            }
        } else {
            respond(&mut writer, "404 Not Found", &[], b"{}");
            continue;
        };
        let body = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        respond(&mut writer, "202 Accepted", &[], b"{\"status\":\"OK\"}");
        let _ = answers.send(Answer {
            request_id,
            kind: kind.to_string(),
            body,
        });
    }
}

impl RuntimeApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (event_tx, event_rx) = channel();
        let (answer_tx, answer_rx) = channel();
        let event_rx = Arc::new(Mutex::new(event_rx));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (events, answers) = (event_rx.clone(), answer_tx.clone());
                std::thread::spawn(move || serve(stream, events, answers));
            }
        });
        Self {
            address,
            events: event_tx,
            answers: answer_rx,
            next_request: 0,
        }
    }

    /// Delivers one event and waits for the function's answer (the invocation's deadline in 300 s).
    pub fn invoke(&mut self, event: Value) -> Answer {
        self.invoke_with(event, Duration::from_secs(300))
    }

    /// As [`RuntimeApi::invoke`], with the invocation's deadline `time_left` from now.
    pub fn invoke_with(&mut self, event: Value, time_left: Duration) -> Answer {
        self.next_request += 1;
        let request_id = format!("req-{:04}-0000-4000-8000-000000000000", self.next_request);
        self.events
            .send((request_id.clone(), event, time_left))
            .unwrap();
        let answer = self.wait();
        assert_eq!(
            answer.request_id, request_id,
            "answer for another request: {answer:?}"
        );
        answer
    }

    /// Waits for the next answer (an invocation's, or an init error).
    pub fn wait(&self) -> Answer {
        self.answers
            .recv_timeout(Duration::from_secs(60))
            .expect("the function answered within 60 s")
    }
}

/// The function process, its stdout (the JSON log) collected line by line.
pub struct Function {
    child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    /// The thread that reads stdout: done once the process closed it.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Function {
    /// Starts `binary` as Lambda would, against `api`, with extra environment.
    pub fn start(binary: &Path, api: &RuntimeApi, env: &[(&str, String)]) -> Self {
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", &api.address)
            .env("AWS_LAMBDA_FUNCTION_NAME", "ami-share")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/ami-share")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start the function");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let lines = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("function: {line}");
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// Waits for the process to exit (it must, within 30 s) and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Every line it wrote, read before the log is looked at.
                if let Some(reader) = self.reader.take() {
                    reader.join().unwrap();
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the function did not exit");
    }

    /// The log lines, parsed as JSON (a line that is not JSON fails the test: the log must be structured).
    pub fn json_log(&self) -> Vec<Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"))
            })
            .collect()
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The function binary under test: `AMI_SHARE_BOOTSTRAP` (CI: the `bootstrap` `sam build` made), else
/// the one cargo built.
pub fn binary() -> std::path::PathBuf {
    let binary = std::env::var_os("AMI_SHARE_BOOTSTRAP")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_ami-share-lambda").into());
    assert!(
        binary.is_file(),
        "no function binary at {}",
        binary.display()
    );
    println!("function binary: {}", binary.display());
    binary
}

/// A config file for the function, removed when dropped.
pub fn write_config(text: &str) -> tempfile_path::TempPath {
    tempfile_path::TempPath::with(text)
}

/// A file removed when dropped (no crate needed for this one use).
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn with(text: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("ami-share-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }
        pub fn env(&self) -> String {
            self.0.display().to_string()
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
