//! The trust boundaries, tested as an attacker would probe them: events
//! from a broker user that does not own them, forged control headers,
//! tokens on the HTTP API, bad input, card data at rest. See
//! docs/security.md for the threat model these tests prove.

mod broker;
mod card_data;
mod events;
mod http;
mod input;
mod reads;
mod replies;
mod smtp_tls;
