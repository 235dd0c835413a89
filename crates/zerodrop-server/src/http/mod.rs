//! The HTTP API (SPEC §3), one file per job: [`router`](mod@router) assembles every route
//! and layer, [`extract`] turns a request into what a handler needs (credentials, validated
//! paths, queries and bodies, each refusal a typed error), [`v1`] holds the `/v1` handlers,
//! [`streams`] those on streams as a whole (batch, erase, close), [`ds`] the Durable Streams
//! protocol under `/ds/`, and [`admin`] the operator's (health, metrics, `/admin`). The WebSocket and SSE handlers
//! (`ws.rs`, `sse/`) and the guardrails' routes (`guard/routes.rs`) use the same
//! extractors.
//!
//! Must not: hold state or decide a session rule (both are the app's). Only
//! [`router`](mod@router) imports the handlers, and only start-up imports it.

pub mod admin;
pub mod ds;
pub mod extract;
pub mod router;
pub mod streams;
pub mod v1;

pub use router::{INSTANCE_HEADER, MAX_HEADER_BYTES, MAX_URI_BYTES, router};
pub use v1::MAX_PAGE;
