//! zerodrop's server: the transports (HTTP, WebSocket, SSE), the live hub, drain, metrics.
//!
//! Map: [`config`] (every setting) → [`server`] (start-up, listener, shutdown) builds an
//! [`app::App`] (shared state and the session rules) over a [`zerodrop_store::Store`] and a
//! [`live::Hub`] (fan-out in front of the log). [`conn`] accepts and times HTTP/1.1
//! connections, [`stall`] lets go of those whose client stopped reading, [`body`] reads
//! request bodies to their end; [`http`], [`ws`] and [`sse`] are thin transports over the
//! app (`ws` and `sse` over one connection core, `connection.rs`); [`metrics`] records every
//! figure; [`drain`] takes an instance out of service without dropping anything.

pub mod app;
pub mod auth;
pub mod body;
pub mod config;
pub mod conn;
pub(crate) mod connection;
pub mod deflate;
pub mod drain;
pub mod error;
pub mod guard;
pub mod http;
pub mod jwks;
pub mod live;
pub mod metrics;
pub mod ratelimit;
pub mod secrets;
pub mod server;
pub mod sse;
pub mod stall;
pub mod ws;

pub use config::{Config, ServeArgs};
pub use server::{Running, start};
