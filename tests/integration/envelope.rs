//! Integration tests: envelope.
