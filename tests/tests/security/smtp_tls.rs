//! Email to the relay over TLS (issue 24, item 11): `smtps://` and
//! STARTTLS (`smtp://…?tls=required`), against a local TLS relay with a CA
//! of its own; never to a relay whose certificate does not verify, never
//! in clear when TLS is required.

use notification_svc::transport::{EmailTransport as _, SmtpTransport};
use saga_tests::smtp::{SmtpSink, TlsMode};
use uuid::Uuid;

const FROM: &str = "orders@shop.example";

#[tokio::test(flavor = "multi_thread")]
async fn emails_go_over_tls_and_never_to_a_relay_that_does_not_verify() {
    let email =
        notification_svc::domain::confirmation(Uuid::now_v7(), "a@example.com", &[], 1500, "USD");
    for mode in [TlsMode::Implicit, TlsMode::StartTls] {
        let (sink, ca) = SmtpSink::start_tls(mode).await;
        let smtp = SmtpTransport::new(&sink.url, FROM, Some(ca.as_bytes())).unwrap();
        smtp.send(&email)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let received = sink.received();
        assert_eq!(received.len(), 1, "{mode:?}");
        assert!(received[0].subject().contains("confirmed"), "{received:?}");

        // The relay's CA not trusted: nothing is sent.
        let untrusting = SmtpTransport::new(&sink.url, FROM, None).unwrap();
        assert!(untrusting.send(&email).await.is_err(), "{mode:?}");
        assert_eq!(sink.received().len(), 1, "{mode:?}");
    }

    // TLS required, and a relay that does not offer STARTTLS: not in clear.
    let plain = SmtpSink::start().await;
    let smtp = SmtpTransport::new(&format!("{}?tls=required", plain.url), FROM, None).unwrap();
    assert!(smtp.send(&email).await.is_err());
    assert!(plain.received().is_empty());

    // A URL it cannot read is refused at start.
    assert!(SmtpTransport::new("smtp://relay:25?tls=maybe", FROM, None).is_err());
    assert!(SmtpTransport::new("http://relay", FROM, None).is_err());
}
