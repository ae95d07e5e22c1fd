//! Integration tests: federation.
