//! nubis-host (placeholder).
