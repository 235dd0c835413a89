//! A zerodrop on this machine, seen from outside: the process and its data dir.
//!
//! - [`process`]: `zerodrop serve` as a child process: started with its flags, variables and
//!   data dir, its address read from its `listening` log line (within a bound), its log
//!   lines kept, stopped with SIGTERM, SIGINT or SIGKILL, waited for within a bound, and
//!   killed when dropped;
//! - [`secrets`]: the data dir's `secrets.json`, read into a typed struct (the one definition
//!   of that file's format; the server writes it with the same struct).
//!
//! The operator tools and the tests start servers through it; the server itself uses only
//! [`secrets`]. It must not link the server, the store or a client: it knows the server only
//! by its command line, its log lines and its files, as an operator does.

pub mod process;
pub mod secrets;

pub use process::{ServeChild, ServeCommand, listening_addr};
pub use secrets::SecretsFile;
