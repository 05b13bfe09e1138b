//! A mail sink for tests: a minimal SMTP server on an ephemeral port that
//! accepts every email and keeps it, in arrival order; [`DownRelay`], a
//! relay that is down (connections refused) on a port the test already
//! holds, until it comes up there; and [`SmtpSink::start_controlled`], a
//! sink whose behaviour the test switches (up, down, hanging);
//! [`SmtpSink::start_tls`], one that speaks TLS (from the first byte, or
//! after STARTTLS) with a certificate of a CA of its own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
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

/// How a TLS sink starts TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// From the first byte (`smtps://`).
    Implicit,
    /// After the client's STARTTLS (`smtp://…?tls=required`).
    StartTls,
}

impl SmtpSink {
    /// A sink that speaks TLS, with a certificate for `127.0.0.1` signed by
    /// a CA made for it; returns the sink (its `url` says how to reach it)
    /// and the CA's certificate (PEM), which the client must trust.
    pub async fn start_tls(mode: TlsMode) -> (SmtpSink, String) {
        let (acceptor, ca_pem) = tls_acceptor();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let url = match mode {
            TlsMode::Implicit => format!("smtps://{addr}"),
            TlsMode::StartTls => format!("smtp://{addr}?tls=required"),
        };
        let received = Arc::new(Mutex::new(Vec::new()));
        let inbox = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, inbox) = (acceptor.clone(), inbox.clone());
                tokio::spawn(async move {
                    let stream = match mode {
                        TlsMode::Implicit => stream,
                        TlsMode::StartTls => match before_starttls(stream).await {
                            Some(stream) => stream,
                            None => return,
                        },
                    };
                    // A client that does not trust the certificate ends here.
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    session(tls, inbox, false, mode == TlsMode::Implicit).await;
                });
            }
        });
        let sink = SmtpSink {
            url,
            received,
            mode: Arc::new(Mutex::new(RelayMode::Up)),
            task,
        };
        (sink, ca_pem)
    }

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
                        tokio::spawn(session(stream, inbox.clone(), false, true));
                    }
                    RelayMode::Down => drop(stream),
                    RelayMode::Hangs => {
                        tokio::spawn(session(stream, inbox.clone(), true, true));
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

/// A CA of its own, and a TLS acceptor with a certificate it signed for
/// `127.0.0.1` and `localhost`; returns the CA's certificate (PEM).
fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test mail relay CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("relay key");
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("relay params");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("relay certificate");
    // The process's one crypto provider (ring, as lettre's client).
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("relay TLS config");
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
}

/// The plain-text start of a STARTTLS session, up to the client's
/// STARTTLS (read a byte at a time: nothing of the handshake that follows
/// is consumed). `None` if the client never asks for it.
async fn before_starttls(mut stream: TcpStream) -> Option<TcpStream> {
    stream.write_all(b"220 sink ESMTP\r\n").await.ok()?;
    loop {
        let mut line = Vec::new();
        loop {
            let byte = stream.read_u8().await.ok()?;
            line.push(byte);
            if byte == b'\n' {
                break;
            }
        }
        let command = String::from_utf8_lossy(&line).to_ascii_uppercase();
        if command.starts_with("EHLO") {
            stream
                .write_all(b"250-sink\r\n250 STARTTLS\r\n")
                .await
                .ok()?;
        } else if command.starts_with("STARTTLS") {
            stream.write_all(b"220 go ahead\r\n").await.ok()?;
            return Some(stream);
        } else {
            // Anything else before TLS is refused.
            stream.write_all(b"530 STARTTLS first\r\n").await.ok()?;
        }
    }
}

/// One client's session: every command is accepted (if `hang_after_data`,
/// the email is kept and its acceptance never sent). `greet`: send the
/// greeting (not after STARTTLS, where the client speaks first).
async fn session<S>(
    stream: S,
    inbox: Arc<Mutex<Vec<ReceivedEmail>>>,
    hang_after_data: bool,
    greet: bool,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    let mut recipients = Vec::new();
    if greet && write.write_all(b"220 sink ESMTP\r\n").await.is_err() {
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
