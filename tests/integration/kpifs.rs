//! Integration tests: kpifs.
