//! Time as the guardrails see it: [`zerodrop_core::clock`]'s time line (Unix milliseconds
//! moved only by real elapsed time, so a change of the system clock never ends a cooldown or a
//! lease early), which tests move by hand so that every transition is exact.

pub use zerodrop_core::clock::{Clock, ManualClock, SystemClock};
