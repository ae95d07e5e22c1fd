//! TODO: message
