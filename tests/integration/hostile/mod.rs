//! The threat model, as tests: every federation member is a competitor, so each test here
//! attacks one endpoint or one piece of shared infrastructure the way a hostile member (or a
//! broken-into component of a site) would, with real servers and real daemons, and checks that
//! the attack changes nothing. Every refusal has its legitimate counterpart beside it, so no
//! test can pass by refusing everything.

mod bus;
mod chain;
mod files;
mod operators;
mod quota;
mod soak;
mod tokens;
