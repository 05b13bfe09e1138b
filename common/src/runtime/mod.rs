//! What turns a message handler and a few routes into a running service:
//! [`service`] wires the parts together and shuts them down in order;
//! [`http`] serves health, metrics and the escalation admin API, behind
//! [`auth`]'s bearer tokens, on [`server`];
//! [`config`], [`telemetry`], [`traces`] (OpenTelemetry export) and
//! [`shutdown`] support them.

pub mod auth;
pub mod config;
pub mod http;
pub mod openapi;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod traces;
