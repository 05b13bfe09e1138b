//! The saga's shared domain: what a client gets back ([`order`]), how card
//! data reaches payment-svc and no one else ([`card`]), and the rule every
//! step follows when a saga is rolled back ([`compensation`]), and the
//! choreography itself: who reacts to what, and what undoes it
//! ([`choreography`]); and each service's view of one saga ([`timeline`]).

pub mod card;
pub mod choreography;
pub mod compensation;
pub mod order;
pub mod timeline;
