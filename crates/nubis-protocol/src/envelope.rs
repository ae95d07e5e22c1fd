//! TODO: envelope
