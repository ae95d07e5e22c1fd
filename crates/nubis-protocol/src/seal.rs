//! TODO: seal
