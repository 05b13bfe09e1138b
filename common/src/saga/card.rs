//! Card data hand-off: order-svc seals the card for payment-svc, and only
//! payment-svc can open it.
//!
//! A box (X25519 + XSalsa20-Poly1305, libsodium's) encrypts to payment-svc's
//! *public* key: order-svc holds only that public key, so it cannot read a
//! card back out of its own outbox (beyond the session described below).
//! The clear fields of a [`SealedCard`] (`brand`, `last4`) are the ones PCI
//! DSS allows to be shown.
//!
//! A sealed box (`crypto_box_seal`, a fresh key pair per card) costs two
//! X25519 operations to seal and one to open, which was a third of the four
//! services' CPU per saga. So order-svc seals with
//! a *session* key pair of its own, renewed every [`SESSION_LIFETIME`]: the
//! X25519 agreement with payment-svc's key is made once per session
//! (`crypto_box_beforenm`), each card gets a random 24-byte nonce, and the
//! box carries the session's public key, from which payment-svc derives the
//! same key (once per session, cached). What travels and what is stored
//! opens with payment-svc's secret key, as a sealed box does, or with the
//! session's key — which order-svc holds in memory only, until it renews it
//! at its first card after the minute (or stops), and which reveals
//! nothing it does not already see: the card arrives at order-svc in clear.
//! Boxes made the old way ([`SealScheme::SealedBox`]) still open.
//!
//! The box is bound to its order: what is sealed is the card *with* the
//! order id and amount ([`CardBinding`]), and payment-svc opens it only for
//! that order and that amount, so a sealed card copied out of one
//! `order.created` into another is refused.
//!
//! [`CardDetails`] never prints its number or CVV: its `Debug` is redacted so a
//! stray `?card` in a log line cannot leak it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use crypto_box::aead::{Aead as _, AeadCore as _, OsRng};
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Seed of the development key pair used when no key is configured. It is
/// public (it is in this file), so services log a warning when they use it.
const DEV_KEY_SEED: &str = "order-saga development card sealing key - never use in production";

/// Identifier written next to each sealed card, so keys can be rotated.
pub const DEV_KEY_ID: &str = "dev";

/// How long order-svc seals with one session key pair.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(60);

/// Session keys whose agreement payment-svc keeps at most (one per
/// order-svc replica and minute, in practice).
const SESSIONS_CACHED: usize = 64;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// The card as the client sent it. Never logged, never stored in clear.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CardDetails {
    /// Digits only (separators removed by validation).
    pub card_number: String,
    /// `MM/YY`.
    pub expiry_date: String,
    pub cvv: String,
}

impl fmt::Debug for CardDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CardDetails")
            .field("card_number", &format_args!("****{}", self.last4()))
            .field("expiry_date", &self.expiry_date)
            .field("cvv", &"***")
            .finish()
    }
}

impl CardDetails {
    pub fn last4(&self) -> &str {
        let n = self.card_number.len();
        &self.card_number[n.saturating_sub(4)..]
    }

    pub fn brand(&self) -> &'static str {
        brand_of(&self.card_number)
    }
}

/// The card as it travels in `order.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    description = "The card as it travels in `order.created`: sealed for payment-svc, which \
                   alone can open it. Only `brand` and `last4` are in clear."
)]
pub struct SealedCard {
    /// Which key sealed it (`dev`: the public development key).
    pub key_id: String,
    /// How `sealed` was made (absent in cards sealed before there was a
    /// choice: a sealed box).
    #[serde(default)]
    pub scheme: SealScheme,
    /// Base64 of the sealed box holding the JSON of [`CardDetails`].
    #[schemars(
        description = "Opaque: standard base64 of a box (X25519 + XSalsa20-Poly1305, made \
                       as `scheme` says) to payment-svc's public key, bound to this order's \
                       id and amount. Only payment-svc can open it (and order-svc, while it \
                       holds the session key it made it with); consumers must not interpret \
                       it.",
        pattern(r"^[A-Za-z0-9+/]+={0,2}$"),
        extend("contentEncoding" = "base64", "contentMediaType" = "application/octet-stream")
    )]
    pub sealed: String,
    /// The card's brand: `visa`, `mastercard`, `amex`, `discover`, `unknown`.
    pub brand: String,
    /// The card's last 4 digits.
    pub last4: String,
}

/// How a card's box is made; both are X25519 + XSalsa20-Poly1305 to
/// payment-svc's public key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SealScheme {
    /// libsodium's `crypto_box_seal`: a fresh ephemeral key pair per card.
    #[default]
    SealedBox,
    /// libsodium's `crypto_box` from order-svc's session key pair: the
    /// session's public key (32 bytes), a random nonce (24), the ciphertext.
    SessionBox,
}

/// The order a sealed card may be used for: sealed with the card, checked
/// when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardBinding {
    pub order_id: uuid::Uuid,
    pub amount_cents: i64,
}

/// What a sealed box holds.
#[derive(Serialize, Deserialize)]
struct BoundCard {
    card: CardDetails,
    #[serde(flatten)]
    binding: CardBinding,
}

/// Why a card could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("card sealing key is not valid base64 of 32 bytes")]
    BadKey,
    #[error("sealed card was made with key {0:?}, which this service does not hold")]
    UnknownKey(String),
    #[error("sealed card cannot be opened (corrupt, or sealed for another key)")]
    CannotOpen,
    #[error("sealed card was sealed for another order or amount")]
    WrongOrder,
}

/// Seals cards for payment-svc (held by order-svc).
#[derive(Clone)]
pub struct CardSealer {
    key_id: String,
    public: PublicKey,
    session: Arc<Mutex<Option<Session>>>,
}

/// order-svc's current session: its public key and the box agreed with
/// payment-svc's key.
struct Session {
    public: [u8; KEY_LEN],
    cipher: SalsaBox,
    started: Instant,
}

impl CardSealer {
    /// From a base64 public key; `None` gives the development key.
    pub fn new(public_key_b64: Option<&str>) -> Result<Self, CardError> {
        match public_key_b64 {
            None => Ok(Self::with_key(
                DEV_KEY_ID.to_owned(),
                dev_secret_key().public_key(),
            )),
            Some(b64) => {
                let public =
                    PublicKey::from_slice(&decode_key(b64)?).map_err(|_| CardError::BadKey)?;
                // The development pair set explicitly is still the
                // development pair.
                let key_id = if public == dev_secret_key().public_key() {
                    DEV_KEY_ID.to_owned()
                } else {
                    key_id_of(b64)
                };
                Ok(Self::with_key(key_id, public))
            }
        }
    }

    fn with_key(key_id: String, public: PublicKey) -> Self {
        Self {
            key_id,
            public,
            session: Arc::new(Mutex::new(None)),
        }
    }

    pub fn is_dev_key(&self) -> bool {
        self.key_id == DEV_KEY_ID
    }

    /// Seals `card` for use by the order `binding` names only.
    pub fn seal(&self, card: &CardDetails, binding: CardBinding) -> SealedCard {
        let bound = BoundCard {
            card: card.clone(),
            binding,
        };
        let plain = serde_json::to_vec(&bound).expect("a bound card serializes");
        let nonce = SalsaBox::generate_nonce(&mut OsRng);
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let session = match &mut *session {
            Some(s) if s.started.elapsed() < SESSION_LIFETIME => s,
            stale => stale.insert(Session::new(&self.public)),
        };
        let ciphertext = session
            .cipher
            .encrypt(&nonce, plain.as_slice())
            .expect("encrypting a small message cannot fail");
        let mut sealed = Vec::with_capacity(KEY_LEN + NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&session.public);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        SealedCard {
            key_id: self.key_id.clone(),
            scheme: SealScheme::SessionBox,
            sealed: B64.encode(sealed),
            brand: card.brand().to_owned(),
            last4: card.last4().to_owned(),
        }
    }
}

impl Session {
    fn new(payment_key: &PublicKey) -> Self {
        let secret = SecretKey::generate(&mut OsRng);
        Self {
            public: *secret.public_key().as_bytes(),
            cipher: SalsaBox::new(payment_key, &secret),
            started: Instant::now(),
        }
    }
}

/// Opens sealed cards (held by payment-svc only).
#[derive(Clone)]
pub struct CardOpener {
    key_id: String,
    secret: SecretKey,
    /// The boxes agreed with order-svc's session keys lately seen to open
    /// a card.
    sessions: Arc<Mutex<HashMap<[u8; KEY_LEN], Arc<SalsaBox>>>>,
}

impl CardOpener {
    /// From a base64 secret key; `None` gives the development key.
    pub fn new(secret_key_b64: Option<&str>) -> Result<Self, CardError> {
        match secret_key_b64 {
            None => Ok(Self::with_key(DEV_KEY_ID.to_owned(), dev_secret_key())),
            Some(b64) => {
                let secret =
                    SecretKey::from_slice(&decode_key(b64)?).map_err(|_| CardError::BadKey)?;
                let public_b64 = B64.encode(secret.public_key().as_bytes());
                let key_id = if secret.public_key() == dev_secret_key().public_key() {
                    DEV_KEY_ID.to_owned()
                } else {
                    key_id_of(&public_b64)
                };
                Ok(Self::with_key(key_id, secret))
            }
        }
    }

    fn with_key(key_id: String, secret: SecretKey) -> Self {
        Self {
            key_id,
            secret,
            sessions: Arc::default(),
        }
    }

    pub fn is_dev_key(&self) -> bool {
        self.key_id == DEV_KEY_ID
    }

    /// The base64 public key that order-svc must be configured with.
    pub fn public_key_b64(&self) -> String {
        B64.encode(self.secret.public_key().as_bytes())
    }

    /// Opens a sealed card for the order `binding` names: refused if it was
    /// sealed for another order or amount.
    pub fn open(&self, card: &SealedCard, binding: CardBinding) -> Result<CardDetails, CardError> {
        if card.key_id != self.key_id {
            return Err(CardError::UnknownKey(card.key_id.clone()));
        }
        let bytes = B64
            .decode(&card.sealed)
            .map_err(|_| CardError::CannotOpen)?;
        let plain = match card.scheme {
            SealScheme::SealedBox => self.secret.unseal(&bytes).ok(),
            SealScheme::SessionBox => self.open_session_box(&bytes),
        }
        .ok_or(CardError::CannotOpen)?;
        let bound: BoundCard = serde_json::from_slice(&plain).map_err(|_| CardError::CannotOpen)?;
        if bound.binding != binding {
            return Err(CardError::WrongOrder);
        }
        Ok(bound.card)
    }
}

impl CardOpener {
    /// Opens a [`SealScheme::SessionBox`]: session key ‖ nonce ‖ ciphertext.
    fn open_session_box(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        if bytes.len() < KEY_LEN + NONCE_LEN {
            return None;
        }
        let (session, rest) = bytes.split_at(KEY_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let session: [u8; KEY_LEN] = session.try_into().ok()?;
        let nonce = Nonce::from_slice(nonce);
        let cached = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&session)
            .cloned();
        if let Some(cipher) = cached {
            return cipher.decrypt(nonce, ciphertext).ok();
        }
        // A key agreement, kept only once it has opened a card: boxes that
        // open nothing cannot crowd out the sessions in use.
        let cipher = SalsaBox::new(&PublicKey::from(session), &self.secret);
        let plain = cipher.decrypt(nonce, ciphertext).ok()?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.len() >= SESSIONS_CACHED {
            sessions.clear();
        }
        sessions.insert(session, Arc::new(cipher));
        Some(plain)
    }
}

/// A fresh key pair `(secret_b64, public_b64)` for configuring production.
pub fn generate_key_pair() -> (String, String) {
    let secret = SecretKey::generate(&mut OsRng);
    (
        B64.encode(secret.to_bytes()),
        B64.encode(secret.public_key().as_bytes()),
    )
}

fn dev_secret_key() -> SecretKey {
    SecretKey::from_bytes(Sha256::digest(DEV_KEY_SEED.as_bytes()).into())
}

fn decode_key(b64: &str) -> Result<Vec<u8>, CardError> {
    let bytes = B64.decode(b64.trim()).map_err(|_| CardError::BadKey)?;
    if bytes.len() != 32 {
        return Err(CardError::BadKey);
    }
    Ok(bytes)
}

/// A short, stable id for a public key: the first 8 hex digits of its SHA-256.
fn key_id_of(public_b64: &str) -> String {
    let digest = Sha256::digest(public_b64.trim().as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A message body with its card data taken out, for keeping it at rest
/// (parking): an order dict's `payment_info` keeps only the last 4 digits
/// of the number and loses the CVV; an event's sealed card (which holds the
/// CVV, encrypted) is removed. A body that cannot be read as JSON is
/// replaced by a note, since it cannot be searched for card data. Bodies
/// without card data come back as they are.
pub fn redact_message(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(body) else {
        let note = serde_json::json!({
            "redacted": format!("a body of {} bytes that is not JSON was removed: it may hold card data", body.len()),
        });
        return Cow::Owned(note.to_string().into_bytes());
    };
    if !redact_value(&mut value, 0) {
        return Cow::Borrowed(body);
    }
    let value = match value {
        serde_json::Value::Object(mut map) => {
            map.insert("redacted".into(), "card data removed before parking".into());
            serde_json::Value::Object(map)
        }
        other => serde_json::json!({"redacted": "card data removed before parking", "body": other}),
    };
    Cow::Owned(value.to_string().into_bytes())
}

/// What a field's name says it holds, whatever its spelling (`cardNumber`,
/// `card-number`, `PAN`, `CVC`…).
enum CardField {
    /// The card number: only its last 4 digits are kept.
    Number,
    /// A secret (the CVV, a sealed card): removed.
    Secret,
}

fn card_field(key: &str) -> Option<CardField> {
    let name: String = key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match name.as_str() {
        "cardnumber"
        | "cardno"
        | "pan"
        | "ccnumber"
        | "creditcardnumber"
        | "creditcard"
        | "cardnum"
        | "primaryaccountnumber" => Some(CardField::Number),
        "cvv"
        | "cvv2"
        | "cvc"
        | "cvc2"
        | "cid"
        | "csc"
        | "securitycode"
        | "cardsecuritycode"
        | "cardverificationvalue"
        | "sealed" => Some(CardField::Secret),
        _ => None,
    }
}

/// Removes the card data of `value`, wherever it is: fields named for it
/// (any spelling, any depth), card numbers in text or as JSON numbers
/// (13 to 19 digits passing the Luhn check), and JSON documents written
/// inside strings (a body encoded twice). True if anything changed.
fn redact_value(value: &mut serde_json::Value, depth: usize) -> bool {
    use serde_json::Value;
    if depth > 32 {
        *value = Value::String("[removed: nested too deep to search for card data]".into());
        return true;
    }
    match value {
        Value::Object(map) => {
            let mut changed = false;
            let mut secrets = Vec::new();
            for (key, field) in map.iter_mut() {
                match card_field(key) {
                    Some(CardField::Number) => {
                        let digits: String = match field {
                            Value::String(s) => s.chars().filter(char::is_ascii_digit).collect(),
                            Value::Number(n) => n.to_string(),
                            _ => String::new(),
                        };
                        let last4 = &digits[digits.len().saturating_sub(4)..];
                        *field = Value::String(format!("****{last4}"));
                        changed = true;
                    }
                    Some(CardField::Secret) => secrets.push(key.clone()),
                    None => changed |= redact_value(field, depth + 1),
                }
            }
            for key in secrets {
                map.remove(&key);
                changed = true;
            }
            changed
        }
        Value::Array(items) => items.iter_mut().fold(false, |changed, item| {
            redact_value(item, depth + 1) | changed
        }),
        Value::String(text) => {
            // A JSON document in a string: searched as one.
            if text.trim_start().starts_with(['{', '['])
                && let Ok(mut inner) = serde_json::from_str::<Value>(text)
            {
                if redact_value(&mut inner, depth + 1) {
                    *text = inner.to_string();
                    return true;
                }
                return false;
            }
            match mask_card_numbers(text) {
                Some(masked) => {
                    *text = masked;
                    true
                }
                None => false,
            }
        }
        Value::Number(n) => {
            let digits = n.to_string();
            if (13..=19).contains(&digits.len())
                && digits.chars().all(|c| c.is_ascii_digit())
                && luhn_valid(&digits)
            {
                *value = Value::String(format!("****{}", &digits[digits.len() - 4..]));
                true
            } else {
                false
            }
        }
        Value::Bool(_) | Value::Null => false,
    }
}

/// `text` with every card number in it (13 to 19 digits, perhaps grouped
/// by spaces or dashes, passing the Luhn check) masked but for its last 4
/// digits, wherever it sits in a longer run of digits (an expiry date or a
/// CVV written right after it); `None` if it has none.
fn mask_card_numbers(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // A run of digits, single spaces or dashes between them.
        let mut positions = Vec::new();
        let mut j = i;
        while j < chars.len() {
            if chars[j].is_ascii_digit() {
                positions.push(j);
                j += 1;
            } else if matches!(chars[j], ' ' | '-')
                && chars.get(j + 1).is_some_and(char::is_ascii_digit)
            {
                j += 1;
            } else {
                break;
            }
        }
        let end = j;
        let digits: String = positions.iter().map(|&p| chars[p]).collect();
        // Every window of 13 to 19 digits, longest first, left to right.
        let mut masked: Vec<(usize, usize)> = Vec::new();
        let mut start = 0;
        while start + 13 <= digits.len() {
            let found = (13..=19)
                .rev()
                .filter(|len| start + len <= digits.len())
                .find(|len| luhn_valid(&digits[start..start + len]));
            match found {
                Some(len) => {
                    masked.push((start, start + len));
                    start += len;
                }
                None => start += 1,
            }
        }
        let mut at = i;
        for (from, to) in &masked {
            out.extend(&chars[at..positions[*from]]);
            out.push_str("****");
            out.push_str(&digits[to - 4..*to]);
            at = positions[to - 1] + 1;
        }
        out.extend(&chars[at..end]);
        changed |= !masked.is_empty();
        i = end;
    }
    changed.then_some(out)
}

/// `MM/YY` (or `MM/YYYY`) → (year, month).
pub fn parse_expiry(s: &str) -> Option<(i32, u32)> {
    let (m, y) = s.split_once('/')?;
    let month: u32 = m.trim().parse().ok().filter(|m| (1..=12).contains(m))?;
    let y = y.trim();
    let year: i32 = match y.len() {
        2 => 2000 + y.parse::<i32>().ok()?,
        4 => y.parse().ok()?,
        _ => return None,
    };
    Some((year, month))
}

/// Card brand from the number's prefix (enough for receipts and logs).
pub fn brand_of(number: &str) -> &'static str {
    let two: u32 = number.get(..2).and_then(|p| p.parse().ok()).unwrap_or(0);
    let four: u32 = number.get(..4).and_then(|p| p.parse().ok()).unwrap_or(0);
    match () {
        _ if number.starts_with('4') => "visa",
        _ if (51..=55).contains(&two) || (2221..=2720).contains(&four) => "mastercard",
        _ if two == 34 || two == 37 => "amex",
        _ if number.starts_with("6011") || two == 65 => "discover",
        _ => "unknown",
    }
}

/// The Luhn checksum every real card number satisfies.
pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0;
    for (i, c) in digits.chars().rev().enumerate() {
        let Some(mut d) = c.to_digit(10) else {
            return false;
        };
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    !digits.is_empty() && sum % 10 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: CardBinding = CardBinding {
        order_id: uuid::Uuid::from_u128(7),
        amount_cents: 2000,
    };

    fn card() -> CardDetails {
        CardDetails {
            card_number: "4242424242424242".into(),
            expiry_date: "12/30".into(),
            cvv: "123".into(),
        }
    }

    #[test]
    fn a_card_sealed_with_the_dev_key_opens_with_the_dev_key() {
        let sealed = CardSealer::new(None).unwrap().seal(&card(), ORDER);
        assert_eq!(sealed.last4, "4242");
        assert_eq!(sealed.brand, "visa");
        assert!(!sealed.sealed.contains("4242424242424242"));
        assert_eq!(
            CardOpener::new(None).unwrap().open(&sealed, ORDER).unwrap(),
            card()
        );
    }

    #[test]
    fn cards_of_one_session_share_its_key_but_never_a_nonce() {
        let sealer = CardSealer::new(None).unwrap();
        let opener = CardOpener::new(None).unwrap();
        let boxes: Vec<Vec<u8>> = (0..3)
            .map(|_| {
                let sealed = sealer.seal(&card(), ORDER);
                assert_eq!(sealed.scheme, SealScheme::SessionBox);
                assert_eq!(opener.open(&sealed, ORDER).unwrap(), card());
                B64.decode(&sealed.sealed).unwrap()
            })
            .collect();
        let session = &boxes[0][..KEY_LEN];
        let nonces: std::collections::HashSet<&[u8]> = boxes
            .iter()
            .map(|b| {
                assert_eq!(&b[..KEY_LEN], session);
                &b[KEY_LEN..KEY_LEN + NONCE_LEN]
            })
            .collect();
        assert_eq!(nonces.len(), 3);
        // Another process (a replica, a restart) has its own session.
        let other = CardSealer::new(None).unwrap().seal(&card(), ORDER);
        assert_ne!(&B64.decode(&other.sealed).unwrap()[..KEY_LEN], session);
        assert_eq!(opener.open(&other, ORDER).unwrap(), card());
    }

    #[test]
    fn a_card_sealed_before_sessions_still_opens() {
        let plain = serde_json::to_vec(&BoundCard {
            card: card(),
            binding: ORDER,
        })
        .unwrap();
        let sealed = dev_secret_key()
            .public_key()
            .seal(&mut OsRng, &plain)
            .unwrap();
        let json = serde_json::json!({
            "key_id": DEV_KEY_ID, "sealed": B64.encode(sealed), "brand": "visa", "last4": "4242",
        });
        let old: SealedCard = serde_json::from_value(json).unwrap();
        assert_eq!(old.scheme, SealScheme::SealedBox);
        assert_eq!(
            CardOpener::new(None).unwrap().open(&old, ORDER).unwrap(),
            card()
        );
    }

    #[test]
    fn a_box_altered_in_any_part_or_under_the_wrong_scheme_is_refused() {
        let opener = CardOpener::new(None).unwrap();
        let sealed = CardSealer::new(None).unwrap().seal(&card(), ORDER);
        let bytes = B64.decode(&sealed.sealed).unwrap();
        for at in [0, KEY_LEN, KEY_LEN + NONCE_LEN, bytes.len() - 1] {
            let mut altered = bytes.clone();
            altered[at] ^= 1;
            let card = SealedCard {
                sealed: B64.encode(&altered),
                ..sealed.clone()
            };
            assert!(matches!(
                opener.open(&card, ORDER),
                Err(CardError::CannotOpen)
            ));
        }
        let truncated = SealedCard {
            sealed: B64.encode(&bytes[..KEY_LEN + NONCE_LEN - 1]),
            ..sealed.clone()
        };
        assert!(matches!(
            opener.open(&truncated, ORDER),
            Err(CardError::CannotOpen)
        ));
        let mislabelled = SealedCard {
            scheme: SealScheme::SealedBox,
            ..sealed
        };
        assert!(matches!(
            opener.open(&mislabelled, ORDER),
            Err(CardError::CannotOpen)
        ));
    }

    #[test]
    fn a_configured_key_pair_round_trips_and_rejects_other_keys() {
        let (secret, public) = generate_key_pair();
        let sealed = CardSealer::new(Some(&public)).unwrap().seal(&card(), ORDER);
        let opener = CardOpener::new(Some(&secret)).unwrap();
        assert_eq!(opener.public_key_b64(), public);
        assert_eq!(opener.open(&sealed, ORDER).unwrap(), card());
        assert!(matches!(
            CardOpener::new(None).unwrap().open(&sealed, ORDER),
            Err(CardError::UnknownKey(_))
        ));
    }

    #[test]
    fn a_sealed_card_opens_only_for_its_own_order_and_amount() {
        let sealed = CardSealer::new(None).unwrap().seal(&card(), ORDER);
        let opener = CardOpener::new(None).unwrap();
        let other_order = CardBinding {
            order_id: uuid::Uuid::from_u128(8),
            ..ORDER
        };
        let other_amount = CardBinding {
            amount_cents: 1,
            ..ORDER
        };
        for binding in [other_order, other_amount] {
            assert!(matches!(
                opener.open(&sealed, binding),
                Err(CardError::WrongOrder)
            ));
        }
    }

    #[test]
    fn keys_made_with_openssl_work() {
        // `openssl genpkey -algorithm x25519`, raw halves in base64 (README).
        let secret = "+KWETgfF3Jz2PufetjXvEKtVTr8kJG98jPeCIIdf1kU=";
        let public = "6DvO4ZGjAOhbgcnBYKRSsaSbZaD3KQcjqzUAAnfp5Vs=";
        let opener = CardOpener::new(Some(secret)).unwrap();
        assert_eq!(opener.public_key_b64(), public);
        let sealed = CardSealer::new(Some(public)).unwrap().seal(&card(), ORDER);
        assert_eq!(opener.open(&sealed, ORDER).unwrap(), card());
    }

    #[test]
    fn the_development_pair_set_explicitly_is_still_the_development_pair() {
        let dev_secret = B64.encode(dev_secret_key().to_bytes());
        let dev_public = B64.encode(dev_secret_key().public_key().as_bytes());
        assert!(CardSealer::new(Some(&dev_public)).unwrap().is_dev_key());
        assert!(CardOpener::new(Some(&dev_secret)).unwrap().is_dev_key());
        let (secret, public) = generate_key_pair();
        assert!(!CardSealer::new(Some(&public)).unwrap().is_dev_key());
        assert!(!CardOpener::new(Some(&secret)).unwrap().is_dev_key());
    }

    #[test]
    fn redaction_keeps_no_number_cvv_or_sealed_card() {
        let order = br#"{"customer_id": "c", "payment_info":
            {"card_number": "4242 4242 4242 4242", "expiry_date": "12/30", "cvv": "987"}}"#;
        let out = String::from_utf8(redact_message(order).into_owned()).unwrap();
        assert!(
            !out.contains("4242 4242") && !out.contains("4242424242424242"),
            "{out}"
        );
        assert!(!out.contains("987"), "{out}");
        assert!(out.contains("****4242"), "{out}");

        let sealed = CardSealer::new(None).unwrap().seal(&card(), ORDER);
        let event = serde_json::json!({"event_type": "order.created", "data": {"payment": sealed}});
        let body = event.to_string();
        let out = String::from_utf8(redact_message(body.as_bytes()).into_owned()).unwrap();
        assert!(!out.contains(&sealed.sealed), "{out}");
        assert!(out.contains("\"last4\":\"4242\""), "{out}");

        let garbage = b"card 4242424242424242 cvv 987 {";
        let out = String::from_utf8(redact_message(garbage).into_owned()).unwrap();
        assert!(
            !out.contains("4242424242424242") && !out.contains("987 "),
            "{out}"
        );

        // Other spellings, a number as a JSON number, a body encoded twice,
        // a number in free text, nested anywhere.
        let variants = [
            r#"{"payment_info": {"cardNumber": "4242-4242-4242-4242", "CVC": "987"}}"#,
            r#"{"payment_info": {"card_number": 4242424242424242, "cvv": 987}}"#,
            r#"{"order": {"payment": {"PAN": "4242424242424242", "security_code": "987"}}}"#,
            r#"[{"payment_info": {"card number": "4242 4242 4242 4242", "Cvv2": "987"}}]"#,
            r#"{"note": "card 4242 4242 4242 4242 exp 12/30"}"#,
            r#"{"anything": 4242424242424242}"#,
        ];
        let twice = serde_json::Value::String(variants[0].to_owned()).to_string();
        for body in variants.iter().copied().chain([twice.as_str()]) {
            let out = String::from_utf8(redact_message(body.as_bytes()).into_owned()).unwrap();
            let digits: String = out.chars().filter(char::is_ascii_digit).collect();
            assert!(!digits.contains("4242424242"), "{body} → {out}");
            assert!(!out.contains("987"), "{body} → {out}");
            assert!(out.contains("****4242"), "{body} → {out}");
        }

        // A number run into other digits (an expiry, a CVV in free text):
        // the number is found within the run.
        for body in [
            r#"{"note": "4242 4242 4242 4242 12/30 987"}"#,
            r#"{"note": "4242424242424242 987"}"#,
        ] {
            let out = String::from_utf8(redact_message(body.as_bytes()).into_owned()).unwrap();
            let digits: String = out.chars().filter(char::is_ascii_digit).collect();
            assert!(!digits.contains("4242424242"), "{body} → {out}");
            assert!(out.contains("****4242"), "{body} → {out}");
        }

        let plain = br#"{"event_type": "payment.completed", "data": {}}"#;
        assert!(matches!(
            redact_message(plain),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn debug_output_never_shows_the_number_or_cvv() {
        let text = format!("{:?}", card());
        assert!(!text.contains("4242424242424242"));
        assert!(!text.contains("123"));
        assert!(text.contains("****4242"));
    }

    #[test]
    fn expiry_dates_parse_in_both_year_forms() {
        assert_eq!(parse_expiry("12/24"), Some((2024, 12)));
        assert_eq!(parse_expiry("01/2031"), Some((2031, 1)));
        assert_eq!(parse_expiry("13/24"), None);
        assert_eq!(parse_expiry("1224"), None);
    }

    #[test]
    fn luhn_accepts_published_test_cards_and_rejects_typos() {
        for n in ["4242424242424242", "4000000000000002", "5555555555554444"] {
            assert!(luhn_valid(n), "{n}");
        }
        assert!(!luhn_valid("4242424242424241"));
        assert!(!luhn_valid(""));
    }
}
