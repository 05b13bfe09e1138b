//! A mail sink for tests: a minimal SMTP server on an ephemeral port that
//! accepts every email and keeps it, in arrival order.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An email the sink accepted.
#[derive(Debug, Clone)]
pub struct ReceivedEmail {
    pub recipients: Vec<String>,
    /// Headers and body, as sent.
    pub data: String,
}

impl ReceivedEmail {
    /// The value of the `Subject:` header.
    pub fn subject(&self) -> &str {
        self.data
            .lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or_default()
    }
}

/// Accepts SMTP connections until dropped.
pub struct SmtpSink {
    /// `smtp://127.0.0.1:<port>`, for `SMTP_URL`.
    pub url: String,
    received: Arc<Mutex<Vec<ReceivedEmail>>>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        Self::start_on("127.0.0.1:0").await
    }

    /// A sink on a given address (`127.0.0.1:<port>`): a relay that comes
    /// back where it was.
    pub async fn start_on(addr: &str) -> SmtpSink {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let url = format!("smtp://{}", listener.local_addr().expect("local addr"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let inbox = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(session(stream, inbox.clone()));
            }
        });
        SmtpSink {
            url,
            received,
            task,
        }
    }

    /// Every email accepted so far, oldest first.
    pub fn received(&self) -> Vec<ReceivedEmail> {
        self.received.lock().expect("sink lock").clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client's session: every command is accepted.
async fn session(stream: TcpStream, inbox: Arc<Mutex<Vec<ReceivedEmail>>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut recipients = Vec::new();
    if write.write_all(b"220 sink ESMTP\r\n").await.is_err() {
        return;
    }
    while let Ok(Some(line)) = lines.next_line().await {
        let command = line.to_ascii_uppercase();
        let reply: &[u8] = if command.starts_with("EHLO") || command.starts_with("HELO") {
            b"250 sink\r\n"
        } else if command.starts_with("RCPT TO:") {
            recipients.push(line[8..].trim().to_owned());
            b"250 OK\r\n"
        } else if command.starts_with("DATA") {
            if write.write_all(b"354 go ahead\r\n").await.is_err() {
                return;
            }
            let mut data = String::new();
            while let Ok(Some(l)) = lines.next_line().await {
                if l == "." {
                    break;
                }
                data.push_str(l.strip_prefix('.').unwrap_or(&l));
                data.push('\n');
            }
            inbox.lock().expect("sink lock").push(ReceivedEmail {
                recipients: std::mem::take(&mut recipients),
                data,
            });
            b"250 queued\r\n"
        } else if command.starts_with("QUIT") {
            let _ = write.write_all(b"221 bye\r\n").await;
            return;
        } else {
            // MAIL FROM, RSET, NOOP...
            if command.starts_with("RSET") {
                recipients.clear();
            }
            b"250 OK\r\n"
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}
