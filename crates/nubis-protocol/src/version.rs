//! TODO: version
