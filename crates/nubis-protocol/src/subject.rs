//! TODO: subject
