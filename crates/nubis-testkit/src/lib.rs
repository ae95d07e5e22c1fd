//! Federation test kit.
