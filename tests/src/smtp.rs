//! A mail sink for tests: a minimal SMTP server on an ephemeral port that
//! accepts every email and keeps it, in arrival order; [`DownRelay`], a
//! relay that is down (connections refused) on a port the test already
//! holds, until it comes up there; and [`SmtpSink::start_controlled`], a
//! sink whose behaviour the test switches (up, down, hanging).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
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
    mode: Arc<Mutex<RelayMode>>,
    task: JoinHandle<()>,
}

/// What a controlled sink does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// An SMTP session that accepts every email.
    Up,
    /// Closes the connection at once, before its greeting.
    Down,
    /// Takes the email, then never gives its last answer (the client
    /// times out, not knowing the relay has it).
    Hangs,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        Self::start_on("127.0.0.1:0").await
    }

    /// A sink on a given address (`127.0.0.1:<port>`): a relay that comes
    /// back where it was. (To bring one up on a port nobody else can have
    /// taken meanwhile, see [`DownRelay`].)
    pub async fn start_on(addr: &str) -> SmtpSink {
        Self::serve(TcpListener::bind(addr).await.expect("bind"))
    }

    /// A sink on an ephemeral port whose behaviour [`SmtpSink::set_mode`]
    /// switches.
    pub async fn start_controlled() -> SmtpSink {
        Self::start().await
    }

    /// How the sink treats the next connections.
    pub fn set_mode(&self, mode: RelayMode) {
        *self.mode.lock().expect("sink lock") = mode;
    }

    fn serve(listener: TcpListener) -> SmtpSink {
        let url = format!("smtp://{}", listener.local_addr().expect("local addr"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(RelayMode::Up));
        let (inbox, now) = (received.clone(), mode.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mode = *now.lock().expect("sink lock");
                match mode {
                    RelayMode::Up => {
                        tokio::spawn(session(stream, inbox.clone(), false));
                    }
                    RelayMode::Down => drop(stream),
                    RelayMode::Hangs => {
                        tokio::spawn(session(stream, inbox.clone(), true));
                    }
                }
            }
        });
        SmtpSink {
            url,
            received,
            mode,
            task,
        }
    }

    /// Every email accepted so far, oldest first.
    pub fn received(&self) -> Vec<ReceivedEmail> {
        self.received.lock().expect("sink lock").clone()
    }
}

/// A mail relay that is down: a port of `127.0.0.1` bound by the test but
/// not listening, so that connecting to it is refused, as to a relay that
/// is not running — and that no other test (or anything else binding a
/// port) can take meanwhile, as binding port 0, reading the port and
/// closing the socket would let happen. [`DownRelay::start`] brings the
/// relay up on that very socket.
pub struct DownRelay {
    socket: TcpSocket,
    addr: SocketAddr,
}

impl DownRelay {
    /// Binds an ephemeral port, without listening on it.
    pub fn reserve() -> DownRelay {
        let socket = TcpSocket::new_v4().expect("a TCP socket");
        // No SO_REUSEADDR: nothing else may bind the port while it is held.
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let addr = socket.local_addr().expect("local addr");
        DownRelay { socket, addr }
    }

    /// `smtp://127.0.0.1:<port>`, for `SMTP_URL`.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// The relay comes up: it listens on the socket it held, and accepts
    /// every email as [`SmtpSink::start`] does.
    pub fn start(self) -> SmtpSink {
        SmtpSink::serve(self.socket.listen(128).expect("listen"))
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One client's session: every command is accepted (if `hang_after_data`,
/// the email is kept and its acceptance never sent).
async fn session(stream: TcpStream, inbox: Arc<Mutex<Vec<ReceivedEmail>>>, hang_after_data: bool) {
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
            if hang_after_data {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                return;
            }
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
