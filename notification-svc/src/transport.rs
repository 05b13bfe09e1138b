//! Email transports. The default one records and logs each email (the
//! `emails` table is the record of what was sent, whatever the transport);
//! set `SMTP_URL` (`smtps://host:port`, `smtp://host:port?tls=required`
//! for STARTTLS, or plain `smtp://host:port` for a local relay) to also
//! hand emails to an SMTP relay.

use futures_util::future::BoxFuture;
use lettre::message::Mailbox;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use tracing::{debug, info};

use crate::domain::Email;

/// Why an email could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The recipient will never accept it (the saga fails); the relay did
    /// not take it.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The relay did not take it now (down, refusing connections, or
    /// answering "try later"); try again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The exchange broke off before the relay's last answer (a timeout, a
    /// dropped connection): the relay may have taken the email. Try again
    /// later, and count it as possibly delivered.
    #[error("uncertain: {0}")]
    Uncertain(String),
}

impl SendError {
    /// True if the relay may have taken the email despite the error.
    pub fn may_have_delivered(&self) -> bool {
        matches!(self, SendError::Uncertain(_))
    }
}

/// Sends emails.
pub trait EmailTransport: Send + Sync + 'static {
    /// A short name recorded with each email (`log`, `smtp`).
    fn name(&self) -> &'static str;
    /// True if an email leaves this process when sent (so a crash after
    /// the send cannot take it back): the handler then records that it is
    /// sending, durably, before it sends.
    fn is_external(&self) -> bool {
        false
    }
    fn send<'a>(&'a self, email: &'a Email) -> BoxFuture<'a, Result<(), SendError>>;
}

/// Logs each email; the handler records it in the database.
pub struct LogTransport;

impl EmailTransport for LogTransport {
    fn name(&self) -> &'static str {
        "log"
    }

    fn send<'a>(&'a self, email: &'a Email) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            // The address is personal data: at debug level only.
            info!(order_id = %email.order_id, kind = email.kind.as_str(),
                  subject = %email.subject, "email sent (log transport)");
            debug!(order_id = %email.order_id, to = ?email.recipient, "email recipient");
            Ok(())
        })
    }
}

/// How long connecting to the relay may take before it counts as down.
pub const SMTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a whole SMTP exchange may take: the client library bounds only
/// the connection, and a relay that stops answering after DATA would
/// otherwise hold the sender for as long as it likes. Past this, the email
/// may have been taken (`SendError::Uncertain`).
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// SMTP to a relay: over TLS from the first byte (`smtps://`), upgraded
/// with STARTTLS (`smtp://…?tls=required`), or plain (`smtp://`: a local
/// MTA or mail sink only).
pub struct SmtpTransport {
    from: Mailbox,
    mailer: AsyncSmtpTransport<Tokio1Executor>,
}

/// How the connection to the relay is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// `smtps://` (port 465 by default): TLS from the first byte.
    ImplicitTls,
    /// `smtp://…?tls=required` (port 587 by default): STARTTLS, or no
    /// email at all.
    StartTls,
    /// `smtp://` (port 25 by default): no TLS.
    Plain,
}

impl SmtpTransport {
    /// `url` is `smtps://host[:port]`, `smtp://host[:port]?tls=required` or
    /// `smtp://host[:port]`; `ca_pem`, certificates (PEM) to trust besides
    /// the public roots (a relay with a private CA).
    pub fn new(url: &str, from: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<Self> {
        const USAGE: &str = "SMTP_URL must look like smtps://host[:port], smtp://host[:port]?tls=required or smtp://host[:port]";
        let (security, rest) = if let Some(rest) = url.strip_prefix("smtps://") {
            (SmtpSecurity::ImplicitTls, rest)
        } else if let Some(rest) = url.strip_prefix("smtp://") {
            match rest.split_once('?') {
                Some((rest, "tls=required")) => (SmtpSecurity::StartTls, rest),
                Some((_, query)) => anyhow::bail!("{USAGE} (unknown option {query:?})"),
                None => (SmtpSecurity::Plain, rest),
            }
        } else {
            anyhow::bail!(USAGE);
        };
        let rest = rest.trim_end_matches('/');
        let default_port = match security {
            SmtpSecurity::ImplicitTls => 465,
            SmtpSecurity::StartTls => 587,
            SmtpSecurity::Plain => 25,
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse()?),
            None => (rest, default_port),
        };
        // Short: a relay that does not answer must not hold a confirmation
        // past the saga's deadline (it is queued instead, see crate::queue).
        let builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(SMTP_TIMEOUT));
        let builder = if security == SmtpSecurity::Plain {
            builder
        } else {
            let mut tls = TlsParameters::builder(host.to_owned());
            if let Some(pem) = ca_pem {
                tls = tls.add_root_certificate(Certificate::from_pem(pem)?);
            }
            let tls = tls.build_rustls()?;
            builder.tls(match security {
                SmtpSecurity::ImplicitTls => Tls::Wrapper(tls),
                _ => Tls::Required(tls),
            })
        };
        Ok(Self {
            from: from.parse()?,
            mailer: builder.build(),
        })
    }
}

impl EmailTransport for SmtpTransport {
    fn name(&self) -> &'static str {
        "smtp"
    }

    fn is_external(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, email: &'a Email) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let to: Mailbox = email
                .recipient
                .parse()
                .map_err(|e| SendError::Rejected(format!("bad recipient address: {e}")))?;
            // One Message-ID per (order, kind): a copy re-sent after a crash
            // is recognisably the same email to the recipient's client.
            let message = Message::builder()
                .message_id(Some(format!("<{}@{}>", email.id, self.from.email.domain())))
                .from(self.from.clone())
                .to(to)
                .subject(email.subject.clone())
                .body(email.body.clone())
                .map_err(|e| SendError::Rejected(e.to_string()))?;
            let Ok(sent) = tokio::time::timeout(SEND_TIMEOUT, self.mailer.send(message)).await
            else {
                return Err(SendError::Uncertain(format!(
                    "the relay did not answer within {} s",
                    SEND_TIMEOUT.as_secs()
                )));
            };
            match sent {
                Ok(_) => Ok(()),
                Err(e) if e.is_permanent() => Err(SendError::Rejected(e.to_string())),
                // A 4xx answer, no connection at all, or no TLS session
                // (a certificate that does not verify, no STARTTLS): not
                // taken — nothing of the email was sent.
                Err(e) if e.is_transient() || e.is_tls() || never_connected(&e) => {
                    Err(SendError::Unavailable(e.to_string()))
                }
                Err(e) => Err(SendError::Uncertain(e.to_string())),
            }
        })
    }
}

/// True if the error shows that no connection to the relay was made (it
/// refused it, or its name does not resolve): the email cannot have gone.
fn never_connected(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::NotFound
            )
        {
            return true;
        }
        source = e.source();
    }
    false
}
