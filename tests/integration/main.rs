//! One integration-test binary, one module per capability.
