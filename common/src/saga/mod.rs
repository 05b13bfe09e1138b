//! The saga's shared domain: what a client gets back ([`order`]), how card
//! data reaches payment-svc and no one else ([`card`]), and the rule every
//! step follows when a saga is rolled back ([`compensation`]).

pub mod card;
pub mod compensation;
pub mod order;
