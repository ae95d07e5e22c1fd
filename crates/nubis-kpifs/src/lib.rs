//! nubis-kpifs (placeholder).
