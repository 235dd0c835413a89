//! Guardrails on the upstream side (SPEC §7): the state machines that decide whether a call
//! to an application's backend may go ahead, when a failed delivery is retried, what a
//! cached answer is still worth, and what an operator sees of them.
//!
//! Pure logic over a [`Clock`]: no I/O, no threads, no timers of their own. The server wires
//! them to routes, upstreams and the store; tests drive them with a [`ManualClock`].

pub mod bulkhead;
pub mod cache;
pub mod circuit;
pub mod clock;
pub mod ratelimit;
pub mod retry;

pub use clock::{Clock, ManualClock, SystemClock};
